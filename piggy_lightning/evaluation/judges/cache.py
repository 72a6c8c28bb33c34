"""An on-disk judge cache: a repeated evaluation makes no new judge requests.

Entries are keyed by the judge's :attr:`~piggy_lightning.evaluation.judges.base.Judge.identity`, the metric, the
exact prompt template and the (question, answer) pair, hashed with SHA-256. Failed judgements are never cached, so
a rerun retries them. Storage is one SQLite file (stdlib ``sqlite3``), safe to share between runs and between the
ranks of a sharded evaluation (on a local or other lock-respecting file system).

Judgements are committed as the judge returns them (``Judge.iter_judgements``: one at a time for the HTTP judge,
per batch for the local judge), so a run killed while judging re-asks only the requests that had not been answered.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from piggy_lightning.evaluation.judges.base import Judge, Judgement, JudgeRequest


class JudgeCache:
    """Judgements stored by request identity.

    Args:
        path: The SQLite file; created with its parent directories when missing.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        self.hits = 0
        self.misses = 0

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # the ranks of a sharded evaluation share one file: a writer waits for another's commit (SQLite locks
            # the file), up to a minute, instead of failing at once with "database is locked"
            self._db = sqlite3.connect(self.path, timeout=60)
            # A commit per judgement: NORMAL skips the extra fsyncs of FULL; a committed row still survives a killed
            # process (only an OS crash or power loss can lose the last commits).
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS judgements (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        return self._db

    @staticmethod
    def key(identity: str, request: JudgeRequest) -> str:
        """The cache key of ``request`` judged by the judge named ``identity``."""
        parts = [identity, request.metric, request.prompt_template or "", request.question, request.answer]
        return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()

    def get(self, keys: Sequence[str]) -> dict[str, Judgement]:
        """The cached judgements among ``keys``."""
        found: dict[str, Judgement] = {}
        db = self._conn()
        for i in range(0, len(keys), 500):  # SQLite limits the number of bound parameters
            chunk = list(keys[i : i + 500])
            marks = ",".join("?" * len(chunk))
            for key, value in db.execute(f"SELECT key, value FROM judgements WHERE key IN ({marks})", chunk):
                found[key] = Judgement(**json.loads(value))
        return found

    def put(self, items: dict[str, Judgement]) -> None:
        """Store judgements; ``failed`` ones are skipped so that they are retried next time."""
        rows = [
            (key, json.dumps({"score": j.score, "status": j.status, "raw": j.raw, "meta": j.meta}))
            for key, j in items.items()
            if j.status != "failed"
        ]
        db = self._conn()
        with db:
            db.executemany("INSERT OR REPLACE INTO judgements (key, value) VALUES (?, ?)", rows)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def judge_with_cache(judge: Judge, requests: Sequence[JudgeRequest], cache: JudgeCache | None) -> list[Judgement]:
    """Judge ``requests``, asking ``judge`` only for those not already in ``cache``.

    Args:
        judge: The judge.
        requests: Requests with their prompt templates resolved (the template is part of the key).
        cache: The cache, or None to always ask the judge.
    """
    if cache is None:
        return judge.judge(requests)
    keys = [JudgeCache.key(judge.identity, r) for r in requests]
    found = cache.get(keys)
    todo = [i for i, k in enumerate(keys) if k not in found]
    unique: dict[str, int] = {}
    for i in todo:
        unique.setdefault(keys[i], i)  # identical requests are asked once
    cache.hits += len(requests) - len(todo)
    cache.misses += len(unique)
    asked = list(unique)  # keys of the requests sent, in order
    for group in judge.iter_judgements([requests[i] for i in unique.values()]):
        new = {asked[i]: verdict for i, verdict in group}
        cache.put(new)  # committed now: a kill later loses none of these
        found.update(new)
    missing = [k for k in asked if k not in found]
    if missing:
        raise RuntimeError(f"{type(judge).__name__}.iter_judgements returned no judgement for {len(missing)} requests")
    return [found[k] for k in keys]
