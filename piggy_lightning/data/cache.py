"""Tokenized chat data cached on disk: each set of rows is templated and tokenized once (``datasets.map``) and reloaded
by every later setup, rank and run.

An entry is keyed by a digest of everything its tokens depend on: the validated rows themselves, after any
transforms (their source names, row numbers, messages and the system prompt a transform set: any change to the
data is a new entry), the tokenizer (its serialized vocabulary, merges, normalizer and added tokens) and chat
template, the encoding settings (template arguments, ``postfix_exclude``, ``drop_system``, ``max_length``,
``truncation``, ``skip_invalid``, the transforms' class paths and arguments, the data module's ``version``) and the
source code of the encoding itself (``spans.py``, ``data/io.py``, ``data/chat.py``, ``data/encoding.py``, this
file), so a change to any of them encodes again instead of reusing stale tokens. The transforms' own code is not
part of the key: what they do shows in the rows. An entry is a directory: ``examples.parquet``, the Arrow table of
the kept examples (``pos``, the example's index in the encoded rows; ``input_ids``; ``spans`` as indices into
:data:`SPAN_LABELS`), and ``report.json``, what the encoding truncated, dropped or skipped, so that the same
warnings are logged on every load. Loading needs only ``pyarrow``; importing ``datasets`` for ``map`` costs about
0.5-0.8 s of CPU, which a cached run does not pay.

Entries live in the data module's ``cache_dir``, else in ``$PIGGY_CACHE/tokenized`` (default
``~/.cache/piggy_lightning/tokenized``). Each is written to a temporary directory and renamed, so a killed or
concurrent writer never leaves half an entry, and two ranks that encode the same new source at once (e.g. a retain
set read in ``setup``) end up reading one entry.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from piggy_lightning.data.io import ChatRow
from piggy_lightning.spans import SPAN_NAMES, TokenizedChat

log = logging.getLogger(__name__)
SPAN_LABELS = (*SPAN_NAMES, "other")
_PACKAGE = Path(__file__).parents[1]
_ENCODING_CODE = ("spans.py", "data/io.py", "data/chat.py", "data/encoding.py", "data/cache.py")


def cache_root(cache_dir: str | None) -> Path:
    """The directory of tokenized entries (see the module docstring)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("PIGGY_CACHE", Path.home() / ".cache" / "piggy_lightning")) / "tokenized"


@functools.cache
def _code_digest() -> str:
    h = hashlib.sha256()
    for name in _ENCODING_CODE:
        h.update((_PACKAGE / name).read_bytes())
    return h.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    """A digest of what a tokenizer does to text: its serialized pipeline (or vocabulary) and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pipeline = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    parts = [type(tokenizer).__name__, pipeline, tokenizer.chat_template]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def _row_data(rows: list[ChatRow]) -> dict[str, list]:
    return {
        "pos": list(range(len(rows))), "source": [r.source for r in rows], "row": [r.row for r in rows],
        "messages": [r.messages for r in rows], "system": [r.system for r in rows],
    }  # fmt: skip


def entry_key(rows: list[ChatRow], tokenizer: Any, settings: dict[str, Any]) -> str:
    """The cache key of encoding ``rows`` with ``tokenizer`` under ``settings``."""
    h = hashlib.sha256()
    for part in (_code_digest(), tokenizer_digest(tokenizer), json.dumps(settings, sort_keys=True, default=str)):
        h.update(part.encode())
    data = _row_data(rows)
    h.update(json.dumps([data["source"], data["row"], data["messages"], data["system"]], ensure_ascii=False).encode())
    return h.hexdigest()[:24]


def tokenize_rows(label: str, rows: list[ChatRow], encode_row: Callable[[dict], dict]) -> tuple[Any, dict[str, Any]]:
    """Encode validated rows with ``datasets.map``: an entry's Arrow table of kept examples and its report.

    Args:
        label: The rows' source names, for the report and the progress bar.
        rows: The validated (and transformed) rows.
        encode_row: ``{"pos", "source", "row", "messages", "system"} -> {"input_ids", "spans", "status", "field",
            "problem", "n_unk", "n_text"}`` (``encoding.RowEncoder``); errors it raises stop the encoding,
            and nothing is cached.
    """
    import datasets

    ints, text = datasets.Value("int64"), datasets.Value("string")
    features = datasets.Features({
        "pos": ints, "source": text, "row": ints, "input_ids": datasets.List(datasets.Value("int32")),
        "spans": datasets.List(datasets.Value("uint8")), "status": text, "field": text, "problem": text,
        "n_unk": ints, "n_text": ints,
    })  # fmt: skip
    table = datasets.Dataset.from_dict(_row_data(rows))
    # in memory, so datasets caches nothing itself; a fixed fingerprint spares it hashing encode_row (a tokenizer)
    mapped = table.map(
        encode_row, remove_columns=["messages", "system"], features=features, new_fingerprint="piggy-tokenized",
        desc=f"Tokenizing {', '.join(sorted({Path(r.source).name for r in rows}))}",
    )  # fmt: skip
    info = mapped.select_columns(["source", "row", "status", "field", "problem", "n_unk", "n_text"]).to_dict()
    status = info["status"]
    kept = [i for i, s in enumerate(status) if s in ("kept", "truncated")]
    misfits = zip(info["source"], info["row"], status, info["field"], info["problem"], strict=True)
    report = {
        "source": label, "kept": len(kept), "truncated": status.count("truncated"), "dropped": status.count("dropped"),
        "n_unk": sum(info["n_unk"]), "n_text": sum(info["n_text"]),
        "misfits": [[source, row, field, problem] for source, row, s, field, problem in misfits if s == "misfit"],
    }  # fmt: skip
    return mapped.select(kept).select_columns(["pos", "input_ids", "spans"]).with_format("arrow")[:], report


def encode_cached(
    label: str,
    rows: list[ChatRow],
    encode_row: Callable[[dict], dict],
    tokenizer: Any,
    settings: dict[str, Any],
    cache_dir: str | None,
) -> tuple[list[TokenizedChat], list[int], dict[str, Any]]:
    """``rows`` tokenized, from their entry if there is one (else encoded with :func:`tokenize_rows` and saved).

    Returns the kept examples, each one's index in ``rows``, and the encoding's report.
    """
    path = cache_root(cache_dir) / entry_key(rows, tokenizer, settings)
    entry = load_entry(path)
    if entry is None:
        entry = tokenize_rows(label, rows, encode_row)
        if entry[1]["kept"]:
            save_entry(path, *entry)
    table, report = entry
    return *to_examples(table), report


def to_examples(table: Any) -> tuple[list[TokenizedChat], list[int]]:
    """The ``TokenizedChat`` of every row of an entry's Arrow table, and each one's index in the encoded rows."""
    ids, spans = table.column("input_ids").to_pylist(), table.column("spans").to_pylist()
    examples = [TokenizedChat(i, [SPAN_LABELS[c] for c in s]) for i, s in zip(ids, spans, strict=True)]
    return examples, table.column("pos").to_pylist()


def load_entry(path: Path) -> tuple[Any, dict[str, Any]] | None:
    """An entry's table and report, or None if there is no complete entry at ``path``."""
    report = path / "report.json"
    if not report.is_file():
        return None
    import pyarrow.parquet as pq

    return pq.read_table(path / "examples.parquet"), json.loads(report.read_text())


def save_entry(path: Path, table: Any, report: dict[str, Any]) -> None:
    """Write an entry atomically; an unwritable cache only costs a warning (the data is encoded again next time)."""
    import pyarrow.parquet as pq

    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, tmp / "examples.parquet")
        (tmp / "report.json").write_text(json.dumps(report))
        os.replace(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (path / "report.json").is_file():  # else another process wrote the same entry first
            log.warning("could not cache the tokenized %s in %s (%s): it is encoded again next time",
                        report.get("source"), path, e)  # fmt: skip
