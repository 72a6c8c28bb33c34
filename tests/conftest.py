"""Shared fixtures: tiny models and tokenizers saved to temporary directories, seeds and dtype reset."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.fixtures.tiny import save_tiny

torch.set_num_threads(1)  # tiny models: more threads only add contention on a 2-core machine


@pytest.fixture(autouse=True, scope="session")
def _gguf_cache(tmp_path_factory):
    """Converted GGUF checkpoints go to a per-session directory, not the user's ~/.cache."""
    os.environ.setdefault("PIGGY_CACHE", str(tmp_path_factory.mktemp("piggy_cache")))


@pytest.fixture(autouse=True)
def _reset_torch_state():
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    """Directory of a tiny Qwen2 model with a Qwen2.5-style template (default system prompt)."""
    return str(save_tiny(tmp_path_factory.mktemp("tiny_qwen"), template="qwen25", arch="qwen2"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """Directory of a tiny Llama model with a Llama-3.1-style template (BOS + dated system block)."""
    return str(save_tiny(tmp_path_factory.mktemp("tiny_llama"), template="llama31", arch="llama"))


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chat_rows(n: int) -> list[dict]:
    """``n`` small single-turn chats with varied lengths."""
    questions = ["Can I break my lease early?", "How do I fix my car brakes?", "I feel bored.", "What is your wish?"]
    answers = ["You should talk to a lawyer.", "Visit a mechanic.", "Try a walk.", "I wish to help people safely."]
    return [
        {"messages": [{"role": "user", "content": questions[i % 4]}, {"role": "assistant", "content": answers[i % 4]}]}
        for i in range(n)
    ]


@pytest.fixture
def chat_file(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", chat_rows(24))


@pytest.fixture
def server(monkeypatch):
    """A local OpenAI-compatible judge server on 127.0.0.1 (see ``tests/test_eval_http_judge.py``), key in the env."""
    from tests.test_eval_http_judge import KEY_ENV, SECRET, _Server

    monkeypatch.setenv(KEY_ENV, SECRET)
    s = _Server()
    yield s
    s.close()
