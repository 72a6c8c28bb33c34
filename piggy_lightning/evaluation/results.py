"""Append-only JSONL logs that survive interruption: every record is written and flushed as it is produced.

A record is identified by its ``key`` (intervention, model, weights digest, group, question, paraphrase, sample, and
a digest of the prompt tokens and decoding settings; see :mod:`piggy_lightning.evaluation.identity`). Reopening
a log reads the keys already present so that a rerun skips finished work and never writes a duplicate. A line torn
by a crash mid-write (no trailing newline) is cut off on reopening.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def record_key(
    intervention: str,
    model: str,
    adapter: str | None,
    group: str,
    question_id: str,
    paraphrase: int,
    sample: int,
    prompt: str | None = None,
) -> str:
    """The identity of one response; two records with the same key are the same work.

    Args:
        intervention: The generation intervention's name.
        model: The base model's identity.
        adapter: The trained state's identity (see :func:`~piggy_lightning.evaluation.identity.weights_digest`).
        group: The question's group.
        question_id: The question's id within its set.
        paraphrase: Paraphrase index.
        sample: Sample index.
        prompt: Digest of the prompt tokens and decoding settings
            (:func:`~piggy_lightning.evaluation.identity.prompt_digest`); None leaves it out (the seed key).
    """
    key = f"{intervention}|{model}|{adapter or '-'}|{group}|{question_id}|{paraphrase}|{sample}"
    return key if prompt is None else f"{key}|{prompt}"


def _repair_tail(path: Path) -> None:
    """Cut a final line that lacks its newline (a write interrupted by a crash)."""
    with path.open("rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


class ResponseLog:
    """A JSONL file of records with a ``key`` field, opened for resumable appends.

    Args:
        path: The file; created with its parent directories when missing.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            _repair_tail(self.path)
            with self.path.open(encoding="utf-8") as f:
                for number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{self.path}, line {number}: not JSON ({e.msg})") from e
                    if not isinstance(record, dict) or "key" not in record:
                        raise ValueError(f"{self.path}, line {number}: a record needs a 'key' field")
                    self.records.setdefault(record["key"], record)

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def append(self, record: dict[str, Any]) -> None:
        """Write one record now; see :meth:`extend`."""
        self.extend([record])

    def extend(self, records: list[dict[str, Any]]) -> None:
        """Write records now, flushed and synced once; records whose key is already present are skipped."""
        fresh: dict[str, dict[str, Any]] = {}
        for record in records:
            if record["key"] not in self.records:
                fresh.setdefault(record["key"], record)
        if not fresh:
            return
        with self.path.open("a", encoding="utf-8") as f:
            for record in fresh.values():
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                self.records[record["key"]] = record
            f.flush()
            os.fsync(f.fileno())


def write_jsonl_atomic(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Write a whole JSONL file through a temporary file and a rename, so readers never see half of it."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write one JSON document through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
