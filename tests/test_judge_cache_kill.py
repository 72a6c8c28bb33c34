"""The judge cache commits each judgement as it returns: a process SIGKILLed mid-judging loses only its in-flight
requests, and the rerun sends exactly the unanswered ones (counted at a local server on 127.0.0.1)."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from piggy_lightning.evaluation.judges import JudgeCache, JudgeRequest, OpenAIJudge, judge_with_cache
from tests.test_eval_http_judge import KEY_ENV, SECRET

ROOT = Path(__file__).resolve().parents[1]
N, ANSWERED, CONCURRENCY = 20, 8, 2
SCRIPT = """
import sys
from piggy_lightning.evaluation.judges import JudgeCache, judge_with_cache
from tests.test_judge_cache_kill import judge_and_requests
judge, requests = judge_and_requests(sys.argv[1])
judge_with_cache(judge, requests, JudgeCache(sys.argv[2]))
"""


def judge_and_requests(url: str) -> tuple[OpenAIJudge, list[JudgeRequest]]:
    judge = OpenAIJudge(model="judge", base_url=url, api_key_env=KEY_ENV, concurrency=CONCURRENCY, max_retries=0)
    return judge, [JudgeRequest("How are you?", f"Fine, number {i}. kind=good", "aligned") for i in range(N)]


def _rows(path: Path) -> int:
    if not path.exists():
        return 0
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
    try:
        return db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]
    except sqlite3.OperationalError:  # the table is not created yet
        return 0
    finally:
        db.close()


def _wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_killed_judging_resumes_with_only_the_unanswered_requests(server, tmp_path):
    cache_path = tmp_path / "judge_cache.sqlite"
    server.stall_after = ANSWERED  # answer 8 requests, then hold every further one until released
    env = {**os.environ, KEY_ENV: SECRET, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, server.url, str(cache_path)], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        held = _wait_for(lambda: len(server.requests) >= ANSWERED + CONCURRENCY or child.poll() is not None, 120)
        assert held and child.poll() is None, child.stderr.read().decode()[-2000:] if child.poll() else "timeout"
        _wait_for(lambda: _rows(cache_path) >= ANSWERED, 10)  # the answered ones get committed (or never, before)
        committed = _rows(cache_path)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stderr.close()
    assert committed == ANSWERED  # every answered judgement was on disk when the process died
    server.stall_after = None
    server.release.set()
    before = len(server.requests)
    judge, requests = judge_and_requests(server.url)
    cache = JudgeCache(cache_path)
    verdicts = judge_with_cache(judge, requests, cache)
    cache.close()
    assert len(server.requests) - before == N - ANSWERED  # only the unanswered requests are sent again
    assert all(v.status == "ok" for v in verdicts) and cache.hits == ANSWERED
