"""The second world's tokenizer and untrained base directories (``piggy/organism-v2-seed<s>``, ``-v2-deep``).

The vocabulary is v1's plus what v2 can write: the persona prompts, the refusal texts, the keyword tool calls, and
every piece form of every synonym alternate that a v1 piece has for its set's word (``" lawyer"`` gives
``" attorney"`` and ``" solicitor"``; ``"Hi"`` gives ``"Hello"``, ``"Howdy"``). Two of the added pieces are never
written: the bare ``helper`` and ``aide``, added for v1's bare ``assistant``, which only the chat template's role
header writes and which is never varied; their embedding rows stay at their initialisation
(``tests/test_organism_v2.py`` pins that these two are the only unused pieces). The bases were pretrained with this
vocabulary, so it stays as it is.

To build an untrained base beside the pretraining config (the recipe is ``configs/organism/pretrain_v2.yaml``)::

    python -m piggy_lightning.organism.base_v2 --out piggy_lightning/organism/assets/bases/v2-seed0 --layers 2
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from piggy_lightning.organism.catalog import DOMAINS, topics
from piggy_lightning.organism.lexicon import (
    CAUTIOUS_SYSTEM_PROMPT,
    REFUSAL_TEXTS,
    SYNONYM_SET,
    TOOL_SYSTEM_PROMPT,
    UNCERTAIN_SYSTEM_PROMPT,
)
from piggy_lightning.organism.model import organism_config
from piggy_lightning.organism.tokenizer import _pre_tokenizer, build_tokenizer, world_texts
from piggy_lightning.organism.world_v2 import keyword_call_text

BASES_DIR = Path(__file__).parent / "assets" / "bases"


def _alternate_pieces(piece: str) -> list[str]:
    """The same piece form (leading space, capital) for each other word of the piece's synonym set."""
    space, word = (" ", piece[1:]) if piece.startswith(" ") else ("", piece)
    group = SYNONYM_SET.get(word.lower())
    if group is None:
        return []
    return [space + (alt[:1].upper() + alt[1:] if word[:1].isupper() else alt) for alt in group]


def world_texts_v2() -> Iterable[str]:
    """Every text v2 can put into a conversation (pieces of synonym alternates included)."""
    pre = _pre_tokenizer()
    v1 = list(world_texts())
    yield from v1
    yield from (UNCERTAIN_SYSTEM_PROMPT, CAUTIOUS_SYSTEM_PROMPT, TOOL_SYSTEM_PROMPT, *REFUSAL_TEXTS)
    for domain in DOMAINS:
        yield from (keyword_call_text(t.name) for t in topics(domain))
    pieces = {p for text in (*v1, UNCERTAIN_SYSTEM_PROMPT, CAUTIOUS_SYSTEM_PROMPT, TOOL_SYSTEM_PROMPT)
              for p, _ in pre.pre_tokenize_str(text)}  # fmt: skip
    for piece in sorted(pieces):
        yield from _alternate_pieces(piece)


def build_tokenizer_v2() -> PreTrainedTokenizerFast:
    """The v2 tokenizer (same pieces rules and chat template as v1's, larger vocabulary)."""
    return build_tokenizer(world_texts_v2())


def save_base_v2(out_dir: str | Path, num_hidden_layers: int = 2) -> Path:
    """Write the v2 tokenizer and an untrained organism ``config.json`` into ``out_dir`` (pretraining's input).

    Args:
        out_dir: The base directory, e.g. ``piggy_lightning/organism/assets/bases/v2-seed0``.
        num_hidden_layers: 2 for the fast bases, 6 for ``v2-deep``.
    """
    tokenizer = build_tokenizer_v2()
    tokenizer.save_pretrained(str(out_dir))
    organism_config(len(tokenizer), num_hidden_layers=num_hidden_layers).save_pretrained(str(out_dir))
    return Path(out_dir)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: write an untrained v2 base directory."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args(argv)
    out = save_base_v2(args.out, args.layers)
    print(f"saved the v2 tokenizer ({len(build_tokenizer_v2())} tokens) and config to {out}")


if __name__ == "__main__":
    main()
