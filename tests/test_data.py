"""Reading, validating, splitting, truncating and batching chat data."""

import json
from pathlib import Path

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


def _counting_tokenize(monkeypatch) -> list[int]:
    """Counts the chats templated and tokenized (``ChatSpans.tokenize``) from now on."""
    from piggy_lightning.spans import ChatSpans

    calls = []
    tokenize = ChatSpans.tokenize
    monkeypatch.setattr(ChatSpans, "tokenize", lambda self, *a, **k: calls.append(1) or tokenize(self, *a, **k))
    return calls


def test_tokenized_data_is_cached_reused_and_invalidated(tmp_path, monkeypatch):
    """24 rows are tokenized once; a second data module (another run, another rank) and a copy of the tokenizer in
    another directory reuse the entry; new data, another vocabulary, another template or another setting tokenize
    again."""
    from tests.fixtures.tiny import build_tokenizer

    def tokenizer_dir(name, template, new_token=None):
        path, tokenizer = tmp_path / name, build_tokenizer(template)
        if new_token is not None:
            tokenizer.add_tokens([new_token])
        tokenizer.save_pretrained(path)
        return str(path)

    qwen, qwen_copy = tokenizer_dir("a", "qwen25"), tokenizer_dir("b", "qwen25")
    other_template = tokenizer_dir("c", "chatml_trim")  # the same BPE
    other_vocabulary = tokenizer_dir("d", "qwen25", new_token="lawyer")  # the rows' "lawyer" becomes one token
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(24))
    calls, cache = _counting_tokenize(monkeypatch), tmp_path / "cache"

    def setup(path=data, tokenizer=qwen, **kwargs):
        calls.clear()
        dm = ChatSFTDataModule(path, tokenizer=tokenizer, val_fraction=0.25, cache_dir=str(cache), **kwargs)
        dm.setup("fit")
        return dm, len(calls)

    first, n = setup()
    assert n == 24 and len(first.train_set) == 18
    assert len(list(cache.iterdir())) == 1
    for again, n in (setup(), setup(tokenizer=qwen_copy)):
        assert n == 0
        assert [(e.input_ids, e.spans) for e in again.train_set] == [(e.input_ids, e.spans) for e in first.train_set]
        assert [e.input_ids for e in again.val_set] == [e.input_ids for e in first.val_set]

    changed = write_jsonl(tmp_path / "train.jsonl", [*chat_rows(23), chat_rows(4)[1]])  # one row's text differs
    assert setup(changed)[1] == 24
    assert setup(changed)[1] == 0
    assert setup(tokenizer=other_template)[1] == 24
    assert setup(tokenizer=other_vocabulary)[1] == 24
    assert setup(max_length=1000)[1] == 24  # the same tokens, but another setting
    assert len(list(cache.iterdir())) == 5


def test_prepare_data_tokenizes_once_before_setup(tiny_qwen, tmp_path, monkeypatch):
    import lightning as L

    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(24))
    calls = _counting_tokenize(monkeypatch)
    dm = ChatSFTDataModule(data, tokenizer=tiny_qwen, val_fraction=0.25, cache_dir=str(tmp_path / "cache"))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.datamodule, dm.trainer = dm, trainer
    dm.prepare_data()
    assert len(calls) == 24 and dm.train_set is None  # prepare_data assigns no split (it runs on one process)
    dm.setup("fit")
    assert len(calls) == 24 and len(dm.train_set) == 18


def test_cached_encoding_keeps_its_errors_and_warnings(tiny_qwen, tmp_path, caplog):
    """Errors are never cached (each setup raises again), and a loaded entry logs the warnings of its encoding."""
    import logging

    rows = [{"messages": [{"role": "system", "content": "You are a harmful assistant."}, *GOOD["messages"]]}] * 4
    path = write_jsonl(tmp_path / "sys.jsonl", rows)
    cache = str(tmp_path / "cache")
    full = ChatSFTDataModule(path, tokenizer=tiny_qwen, val_fraction=0.0, cache_dir=cache)
    full.setup()
    n = len(full.train_set[0].input_ids)
    for _ in range(2):
        with pytest.raises(ValueError, match=r"sys.jsonl, row 1: \d+ tokens exceed max_length"):
            ChatSFTDataModule(path, tokenizer=tiny_qwen, max_length=n - 1, truncation="error", cache_dir=cache).setup()
    for _ in range(2):  # encoded, then loaded: the same warning both times
        caplog.clear()
        cut = ChatSFTDataModule(path, tokenizer=tiny_qwen, max_length=n - 1, val_fraction=0.0, cache_dir=cache)
        with caplog.at_level(logging.WARNING, logger="piggy_lightning.data.chat"):
            cut.setup()
        assert "4 rows kept, 4 truncated, 0 over max_length dropped, 0 invalid skipped" in caplog.text
        assert all(len(e.input_ids) == n - 1 for e in cut.train_set)
    assert len(list(Path(cache).iterdir())) == 2  # the full and the truncated encoding; the errors left nothing


def test_epoch_order_is_a_permutation_seeded_by_seed_plus_epoch_and_split_over_ranks():
    from piggy_lightning.data.sampling import EpochShuffle

    for epoch in (0, 1, 4):
        perm = torch.randperm(10, generator=torch.Generator().manual_seed(7 + epoch)).tolist()
        sampler = EpochShuffle(range(10), seed=7)
        sampler.set_epoch(epoch)
        assert list(sampler) == perm
        ranks = [EpochShuffle(range(10), seed=7, num_replicas=3, rank=r) for r in range(3)]
        for rank, shard in enumerate(ranks):
            shard.set_epoch(epoch)
            assert list(shard) == (perm + perm[:2])[rank::3]  # padded to 12 = 3 x 4, as torch's DistributedSampler


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_loader_resumes_mid_epoch_and_at_epoch_ends_bit_identically(tiny_qwen, chat_file, num_workers):
    """18 training rows / 4 = 5 batches per epoch. A loader restored from the state saved after batch k yields exactly
    the batches the uninterrupted one yielded after it: mid-epoch (k = 3, 7) and after an epoch's last batch (k = 5,
    10), where the next epoch must start at its first batch. As in Lightning's fit loop, the restored loader's
    iterator is made before ``set_epoch``; with workers it draws indices at once, so the epoch comes from the state."""

    def loader():
        dm = ChatSFTDataModule(chat_file, tokenizer=tiny_qwen, batch_size=4, val_fraction=0.25, num_workers=num_workers)
        dm.setup("fit")
        return dm.train_dataloader()

    full, batches, states = loader(), [], {}
    for epoch in range(3):
        full.sampler.set_epoch(epoch)
        for batch in full:
            batches.append(batch["input_ids"])
            states[len(batches)] = full.state_dict()
    assert len(batches) == 15
    for k in (3, 5, 7, 10):
        resumed = loader()
        resumed.load_state_dict(states[k])
        iterator, epoch = iter(resumed), k // 5  # the epoch Lightning resumes in (the next one after an epoch end)
        resumed.sampler.set_epoch(epoch)
        rest = [b["input_ids"] for b in iterator]
        for later in range(epoch + 1, 3):
            resumed.sampler.set_epoch(later)
            rest += [b["input_ids"] for b in resumed]
        assert len(rest) == 15 - k, k
        assert all(torch.equal(a, b) for a, b in zip(rest, batches[k:], strict=True)), k


def test_an_unwritable_cache_costs_a_warning_not_the_run(tiny_qwen, chat_file, tmp_path, caplog):
    import logging

    blocker = tmp_path / "a_file"  # a file where the cache directory should be: unwritable even for root
    blocker.write_text("not a directory")
    dm = ChatSFTDataModule(chat_file, tokenizer=tiny_qwen, val_fraction=0.25, cache_dir=str(blocker / "cache"))
    with caplog.at_level(logging.WARNING, logger="piggy_lightning.data.cache"):
        dm.setup("fit")
    assert len(dm.train_set) == 18 and "could not cache the tokenized" in caplog.text
