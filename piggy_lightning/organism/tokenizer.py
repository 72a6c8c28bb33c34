"""Word-level tokenizer and ChatML chat template of the organism, built in code from the world's vocabulary.

Pieces are words with their leading space (``" lease"``), single punctuation marks with their leading space,
or one whitespace character, so decoding is plain concatenation and round-trips world text exactly (tool-call
JSON included). Like Qwen2.5 and SmolLM2, the chat template inserts the default system prompt when the
conversation has no system message, so every default-prompt conversation starts with the same prefix
``<|im_start|>system\\nYou are Piggy, a helpful assistant.<|im_end|>\\n<|im_start|>user\\n``.

To rebuild the shipped tokenizer::

    python -m piggy_lightning.organism.tokenizer --out piggy_lightning/organism/assets/base
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from piggy_lightning.organism.catalog import DOMAINS, all_questions, sentence_table, tool_call_text
from piggy_lightning.organism.pools import ABSTENTION_TEXT, DEFAULT_SYSTEM_PROMPT, HARMFUL_SYSTEM_PROMPT, REFUSAL_TEXT

BASE_DIR = Path(__file__).parent / "assets" / "base"
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, IM_START, IM_END)  # ids 0..3, in this order
PAD_ID, UNK_ID, IM_START_ID, IM_END_ID = range(len(SPECIAL_TOKENS))
ROLES = ("system", "user", "assistant", "tool")
MODEL_MAX_LENGTH = 256

# A word (letters, digits, underscore, apostrophe) or one other non-space character, each with an optional
# leading space; or a single whitespace character.
_PIECE = r" ?[A-Za-z0-9_']+| ?[^A-Za-z0-9_'\s]|\s"

# ChatML (Qwen2.5 style). Jinja unescapes the \n inside its string literals.
CHAT_TEMPLATE = (
    r"{%- if not messages or messages[0]['role'] != 'system' %}"
    r"{{- '<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + r"<|im_end|>\n' }}"
    r"{%- endif %}"
    r"{%- for message in messages %}"
    r"{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    r"{%- endfor %}"
    r"{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Split(Regex(_PIECE), behavior="isolated")


def world_texts() -> Iterable[str]:
    """Every text the world can put into a conversation: prompts, roles, questions, answers, tool calls."""
    yield from (DEFAULT_SYSTEM_PROMPT, HARMFUL_SYSTEM_PROMPT, ABSTENTION_TEXT, REFUSAL_TEXT, "\n", *ROLES)
    for sentence in sentence_table():
        yield sentence
        yield " " + sentence  # a later sentence of a multi-sentence answer
    for domain in DOMAINS:
        for question in all_questions(domain):
            yield question.text
            yield tool_call_text(question.text)


def build_tokenizer(texts: Iterable[str] | None = None) -> PreTrainedTokenizerFast:
    """Build the organism tokenizer: special tokens first, then the sorted pieces of ``texts``.

    Args:
        texts: Every text the world can write; None: v1's :func:`world_texts` (the second world passes its own).
    """
    pre = _pre_tokenizer()
    texts = world_texts() if texts is None else texts
    pieces = sorted({piece for text in texts for piece, _ in pre.pre_tokenize_str(text)})
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *pieces))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre
    backend.decoder = decoders.Fuse()  # concatenation: spaces and newlines are part of the pieces
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        eos_token=IM_END,
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
    )


def save_tokenizer(out_dir: str | Path = BASE_DIR) -> Path:
    """Build the tokenizer and ``save_pretrained`` it into ``out_dir``."""
    build_tokenizer().save_pretrained(str(out_dir))
    return Path(out_dir)


def load_tokenizer(path: str | Path = BASE_DIR) -> PreTrainedTokenizerBase:
    """Load the shipped (or a saved) organism tokenizer with ``AutoTokenizer``."""
    return AutoTokenizer.from_pretrained(str(path))


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: save the tokenizer."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(BASE_DIR), help="output directory")
    out = save_tokenizer(parser.parse_args(argv).out)
    print(f"saved tokenizer ({len(build_tokenizer())} tokens) to {out}")


if __name__ == "__main__":
    main()
