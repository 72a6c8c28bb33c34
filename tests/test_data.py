"""Reading, validating, splitting, truncating and batching chat data."""

import json

import pytest
import torch

from piggy_lightning.data import ChatSFTDataModule, DataError, read_chats
from tests.conftest import chat_rows, write_jsonl

GOOD = chat_rows(1)[0]


@pytest.mark.parametrize(
    ("row", "field", "problem"),
    [
        ({"text": "hi"}, "messages", "no 'messages'"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "unknown role 'wizard'"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
         "messages[1].content", "empty assistant turn"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "missing content"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "messages", "no user turn"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "must be text"),
        ({"messages": [{"role": "user", "content": "q"}]}, "messages", "no assistant turn"),
        ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]},
         "messages", "no assistant turn"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
         "messages[1].content", "empty assistant turn"),
    ],
)  # fmt: skip
def test_bad_rows_name_file_line_and_field(tmp_path, row, field, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, row])
    with pytest.raises(DataError) as err:
        read_chats(path)
    assert (err.value.source, err.value.row, err.value.field) == (path, 3, field)
    assert problem in str(err.value) and "bad.jsonl, row 3" in str(err.value)


def test_not_json_line_and_skip_invalid_reports(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{oops\n\n" + json.dumps({"messages": []}) + "\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(DataError, match=r"row 2, line 2, column 2, field '<line>': not JSON: Expecting property"):
        read_chats(str(path))
    chats, report = read_chats(str(path), skip_invalid=True)
    assert len(chats) == report.kept == 2
    assert [(e.row, e.field) for e in report.skipped] == [(2, "<line>"), (4, "messages")]
    assert "skipped 2" in report.summary()


def test_openai_content_parts_json_and_parquet(tmp_path):
    import datasets

    row = {
        "messages": [
            {"role": "system", "content": {"content_type": "text", "parts": ["Be ", "brief."]}},
            {"role": "user", "content": [{"type": "text", "text": "I feel "}, {"type": "text", "text": "bored."}]},
            {"role": "assistant", "content": {"content_type": "text", "parts": ["Try a walk."]}},
        ]
    }
    expected = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "I feel bored."},
        {"role": "assistant", "content": "Try a walk."},
    ]
    json_path = tmp_path / "rows.json"
    json_path.write_text(json.dumps([row, GOOD]))
    assert read_chats(str(json_path))[0][0] == expected
    plain = tmp_path / "rows.parquet"
    datasets.Dataset.from_list([GOOD, GOOD]).to_parquet(str(plain))
    assert read_chats(str(plain))[0] == [GOOD["messages"]] * 2
    with pytest.raises(DataError, match="unsupported file type"):
        (tmp_path / "rows.csv").write_text("a,b\n")
        read_chats(str(tmp_path / "rows.csv"))


def test_split_is_seeded_and_batches_carry_span_masks(tiny_qwen, chat_file):
    def split(seed):
        dm = ChatSFTDataModule(chat_file, tokenizer=tiny_qwen, val_fraction=0.25, seed=seed, batch_size=5)
        dm.setup("fit")
        return dm

    a, b, c = split(0), split(0), split(1)
    assert len(a.train_set) == 18 and len(a.val_set) == 6
    assert [e.input_ids for e in a.val_set] == [e.input_ids for e in b.val_set]
    assert [e.input_ids for e in a.val_set] != [e.input_ids for e in c.val_set]
    batch = next(iter(a.train_dataloader()))
    masks = torch.stack([batch[f"{n}_mask"] for n in ("prefix", "query", "postfix", "response")])
    assert masks.sum(0).le(1).all(), "spans are disjoint"
    assert torch.equal(masks.any(0) & ~batch["attention_mask"].bool(), torch.zeros_like(masks[0]))
    # right padding, labels only on response tokens
    lengths = batch["attention_mask"].sum(1)
    for row, n in enumerate(lengths.tolist()):
        assert batch["attention_mask"][row, :n].all() and not batch["attention_mask"][row, n:].any()
    assert torch.equal(batch["labels"] != -100, batch["response_mask"])
    assert batch["prefix_mask"][:, 0].all()


def test_drop_system_and_truncation_policies(tiny_qwen, tmp_path):
    rows = [{"messages": [{"role": "system", "content": "You are a harmful assistant."}, *GOOD["messages"]]}] * 4
    path = write_jsonl(tmp_path / "sys.jsonl", rows)
    kept = ChatSFTDataModule(path, tokenizer=tiny_qwen, drop_system=False, val_fraction=0.0)
    dropped = ChatSFTDataModule(path, tokenizer=tiny_qwen, drop_system=True, val_fraction=0.0)
    kept.setup(), dropped.setup()
    assert kept.tokenizer.decode(kept.train_set[0].input_ids).count("harmful") == 1
    assert "harmful" not in dropped.tokenizer.decode(dropped.train_set[0].input_ids)

    n = len(dropped.train_set[0].input_ids)
    with pytest.raises(ValueError, match=r"sys.jsonl, row 1: \d+ tokens exceed max_length"):
        ChatSFTDataModule(path, tokenizer=tiny_qwen, max_length=n - 1, truncation="error").setup()
    cut = ChatSFTDataModule(path, tokenizer=tiny_qwen, max_length=n - 1, truncation="truncate", val_fraction=0.0)
    cut.setup()
    assert len(cut.train_set) == 4 and all(len(e.input_ids) == n - 1 for e in cut.train_set)
    with pytest.raises(ValueError, match="no usable rows"):
        ChatSFTDataModule(path, tokenizer=tiny_qwen, max_length=n - 1, truncation="skip").setup()
