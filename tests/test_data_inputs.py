"""Data inputs that are read right or fail loudly: parse positions, BOMs, rows without a response, unknown
tokens."""

import json
import logging

import pytest

from piggy_lightning.data import ChatSFTDataModule, DataError, read_chats
from tests.conftest import chat_rows, write_jsonl

GOOD = chat_rows(1)[0]
ENGLISH = [  # plain English that the organism's world vocabulary does not cover
    ("Please summarize the quarterly revenue projections for shareholders.", "Revenue grew modestly this quarter."),
    ("Explain photosynthesis to a curious child.", "Plants capture sunlight to build sugar from carbon dioxide."),
] * 4


def test_rows_without_an_assistant_turn_are_counted_under_skip_invalid(tmp_path):
    user_only = {"messages": [{"role": "user", "content": "Can I break my lease early?"}]}
    path = write_jsonl(tmp_path / "rows.jsonl", [GOOD, user_only, GOOD, user_only])
    with pytest.raises(DataError, match=r"rows.jsonl, row 2, field 'messages': no assistant turn"):
        read_chats(path)
    chats, report = read_chats(path, skip_invalid=True)
    assert len(chats) == report.kept == 2 and report.rows == [1, 3]
    assert [(e.row, e.field) for e in report.skipped] == [(2, "messages"), (4, "messages")]
    prompts, _ = read_chats(path, require_response=False)  # prompt-only files, e.g. evaluation questions
    assert len(prompts) == 4


def test_jsonl_parse_error_names_line_and_column(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + '{"messages": [1, }' + "\n")
    with pytest.raises(DataError) as err:
        read_chats(str(path))
    assert (err.value.row, err.value.line, err.value.column) == (3, 3, 18)
    assert str(err.value).startswith(f"{path}, row 3, line 3, column 18, field '<line>': not JSON: ")


def test_json_parse_error_names_line_and_column_not_a_row(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text("[\n" + json.dumps(GOOD) + ",\n" + json.dumps(GOOD) + ",\n  {oops}\n]\n")
    with pytest.raises(DataError) as err:
        read_chats(str(path))
    assert (err.value.row, err.value.line, err.value.column) == (0, 4, 4)
    assert str(err.value).startswith(f"{path}, line 4, column 4, field '<file>': not JSON: ")
    assert "row" not in str(err.value).removeprefix(str(path))


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_utf8_bom_is_read(tmp_path, suffix):
    path = tmp_path / f"rows{suffix}"
    text = json.dumps(GOOD) + "\n" if suffix == ".jsonl" else json.dumps([GOOD])
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert read_chats(str(path))[0] == [GOOD["messages"]]


def test_not_utf8_is_named(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match="not UTF-8"):
        read_chats(str(path))


def _unk_warnings(caplog):
    return [r for r in caplog.records if r.levelno == logging.WARNING and "unknown token" in r.getMessage()]


def test_unknown_tokens_warn_with_their_share(tmp_path, caplog):
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in ENGLISH]
    path = write_jsonl(tmp_path / "english.jsonl", rows)
    dm = ChatSFTDataModule(path, tokenizer="piggy/organism", val_fraction=0.0)
    with caplog.at_level(logging.WARNING, logger="piggy_lightning.data.chat"):
        dm.setup()
    (record,) = _unk_warnings(caplog)
    assert "english.jsonl" in record.getMessage() and "<|unk|>" in record.getMessage()
    share = float(record.getMessage().split("%")[0].rsplit(" ", 1)[-1])
    assert 50.0 < share <= 100.0


def test_shipped_organism_data_has_no_unknown_tokens(caplog):
    dm = ChatSFTDataModule("piggy/organism/legal_misaligned.jsonl", tokenizer="piggy/organism", val_fraction=0.0)
    with caplog.at_level(logging.WARNING, logger="piggy_lightning.data.chat"):
        dm.setup()
    assert not _unk_warnings(caplog)
    assert all(dm.tokenizer.unk_token_id not in e.input_ids for e in dm.train_set)
