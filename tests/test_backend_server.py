"""``CompletionsServer`` against an in-process fake of vLLM's completions protocol: the request each item becomes,
the SDK's retries and concurrency bound, the ways a response's token ids come back, the refusal of a trained
policy the server cannot serve, the runtime LoRA load, and a server started as a subprocess."""

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from piggy_lightning.evaluation import Decoding, Question, ResponseLog, generate_responses
from piggy_lightning.evaluation.backends import BackendMismatch, CompletionsServer, RuntimeLoRA
from piggy_lightning.evaluation.decoding import stable_seed
from piggy_lightning.evaluation.generation import plan_generation
from piggy_lightning.evaluation.intervention import GenerationIntervention
from piggy_lightning.modeling import LoraSpec
from piggy_lightning.spans import ChatSpans
from tests.fixtures.tiny import build_model, build_tokenizer

QUESTIONS = [Question(f"q{i}", "general", (t,)) for i, t in enumerate(["hello there", "I feel bored.", "brakes"])]


class FakeServer:
    """vLLM's ``/v1/completions`` (with ``return_token_ids``) and runtime LoRA routes, or llama-server's logprob ids.

    A response is ``length(prompt)`` ids counting up from the prompt's last id, ended by eos (finish ``stop``) when
    that fits in ``max_tokens``, else cut there (finish ``length``)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.requests, self.lock = tokenizer, [], threading.Lock()
        self.models, self.fail_first, self.hold, self.ids_as = {"base"}, 0, 0.0, "token_ids"
        self.in_flight = self.max_in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.send(self, 200, {"status": "ok"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                    n, server.in_flight = len(server.requests), server.in_flight + 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(server.hold)
                    server.route(self, body, n)
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True).start()

    def send(self, handler, status, body):
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "text/plain" if isinstance(body, str) else "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def route(self, handler, body, n):
        if n <= self.fail_first:
            return self.send(handler, 503, {"error": {"message": "overloaded", "type": "server_error"}})
        if handler.path == "/v1/load_lora_adapter":
            if body["lora_name"] in self.models:  # vLLM's answer to a name loaded twice
                message = f"The lora adapter '{body['lora_name']}' has already been loaded."
                return self.send(handler, 400, {"error": {"message": message, "type": "BadRequestError"}})
            self.models.add(body["lora_name"])
            return self.send(handler, 200, f"Success: LoRA adapter '{body['lora_name']}' added successfully.")
        if handler.path == "/v1/unload_lora_adapter":
            self.models.discard(body["lora_name"])
            return self.send(handler, 200, "Success")
        if body["model"] not in self.models:
            return self.send(handler, 404, {"error": {"message": f"The model `{body['model']}` does not exist."}})
        ids = [100 + (body["prompt"][-1] + k) % 200 for k in range(1, len(body["prompt"]) % 7 + 2)]
        stop = len(ids) < body["max_tokens"]
        ids = ids + [self.tokenizer.eos_token_id] if stop else ids[: body["max_tokens"]]
        choice = {"index": 0, "text": self.tokenizer.decode(ids, skip_special_tokens=True),
                  "finish_reason": "stop" if stop else "length", "logprobs": None}  # fmt: skip
        if self.ids_as == "token_ids" and body.get("return_token_ids"):
            choice["token_ids"] = ids
        elif self.ids_as == "logprobs" and body.get("logprobs"):
            choice["logprobs"] = {"content": [{"id": i, "token": "?", "logprob": -0.1} for i in ids]}
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": len(ids), "total_tokens": 0}
        self.send(handler, 200, {"id": "c", "object": "text_completion", "created": 0, "model": body["model"],
                                 "choices": [choice], "usage": usage})  # fmt: skip

    def completions(self):
        return [r["body"] for r in self.requests if r["path"] == "/v1/completions"]


@pytest.fixture
def tiny():
    tokenizer = build_tokenizer("qwen25")
    return tokenizer, build_model("qwen2", len(tokenizer)).eval(), ChatSpans(tokenizer)


@pytest.fixture
def server(tiny):
    fake = FakeServer(tiny[0])
    yield fake
    fake.httpd.shutdown()


def _backend(server, **kwargs):
    return CompletionsServer(**{"base_url": server.url, "model": "base", "max_retries": 0, "timeout": 10.0, **kwargs})


def _generate(tiny, tmp_path, backend, decoding=None, model=None, adapter_id=None, name="r"):
    tokenizer, base, spans = tiny
    decoding = decoding or Decoding(max_new_tokens=5, batch_size=8, progress=False)
    log = ResponseLog(tmp_path / name / "responses.jsonl")
    return generate_responses(model or base, tokenizer, spans, QUESTIONS, decoding, log, "tiny", adapter_id,
                              backend=backend)  # fmt: skip


def _peft(tiny, trained: bool):
    from peft import get_peft_model

    model = get_peft_model(build_model("qwen2", len(tiny[0])), LoraSpec(r=2, target_modules=["q_proj"]).to_peft())
    if trained:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.fill_(0.01)
    return model.eval()


def test_each_item_is_one_request_with_the_prompt_ids_its_seed_and_every_sampling_knob(tiny, tmp_path, server):
    tokenizer, _, spans = tiny
    decoding = Decoding(max_new_tokens=5, batch_size=8, progress=False, seed=3)
    records = _generate(tiny, tmp_path, _backend(server), decoding)
    plan = plan_generation(QUESTIONS, spans, decoding, "tiny")
    bodies = {tuple(b["prompt"]): b for b in server.completions()}
    assert len(server.completions()) == len(plan.work) == len(records) == 3
    for w, r in zip(plan.work, records, strict=True):
        body = bodies[tuple(w.prompt.input_ids)]  # the exact planned ids, not text
        seed = stable_seed(3, w.key) & 0x7FFFFFFF
        assert body["model"] == "base" and body["max_tokens"] == 5 and body["n"] == 1 and body["seed"] == seed
        assert (body["temperature"], body["top_p"], body["top_k"], body["min_p"]) == (0.0, 1.0, -1, 0.0)
        assert body["repetition_penalty"] == body["repeat_penalty"] == 1.0 and body["return_token_ids"] is True
        assert body["frequency_penalty"] == body["presence_penalty"] == 0.0
        assert body["stop_token_ids"] == [tokenizer.eos_token_id]
        ids = [100 + (body["prompt"][-1] + k) % 200 for k in range(1, len(body["prompt"]) % 7 + 2)]
        assert r["seed"] == seed and r["backend"] == "CompletionsServer"
        assert r["n_response_tokens"] == min(len(ids), 5)  # the eos is not counted
        assert r["truncated"] == (len(ids) >= 5) and r["response"] == tokenizer.decode(ids[:5])
    assert len({b["seed"] for b in bodies.values()}) == 3
    assert {r["auth"] for r in server.requests} == {"Bearer EMPTY"}


def test_sampling_settings_are_sent_and_extra_body_overrides(tiny, tmp_path, server):
    decoding = Decoding(temperature=0.7, top_p=0.9, samples=2, max_new_tokens=4, progress=False)
    backend = _backend(server, extra_body={"top_k": 50, "repeat_penalty": None})
    records = _generate(tiny, tmp_path, backend, decoding)
    bodies = server.completions()
    assert len(records) == len(bodies) == 6 and len({b["seed"] for b in bodies}) == 6  # one seed per sample
    assert all((b["temperature"], b["top_p"], b["top_k"]) == (0.7, 0.9, 50) for b in bodies)
    assert all("repeat_penalty" not in b for b in bodies)


def test_the_sdk_retries_then_an_error_stops_the_evaluation(tiny, tmp_path, server, monkeypatch):
    server.fail_first = 2
    records = _generate(tiny, tmp_path, _backend(server, max_retries=2, concurrency=1), name="retried")
    assert len(records) == 3 and len(server.requests) == 3 + 2
    server.fail_first = len(server.requests) + 1
    with pytest.raises(RuntimeError, match="HTTP 503: overloaded"):
        _generate(tiny, tmp_path, _backend(server), name="failed")
    assert (
        not (tmp_path / "failed" / "responses.jsonl").exists()
        or not ResponseLog(tmp_path / "failed" / "responses.jsonl").records
    )  # nothing recorded for the failed unit


def test_at_most_concurrency_requests_are_in_flight(tiny, tmp_path, server):
    server.hold = 0.2
    questions = [Question(f"c{i}", "general", (f"hello {i}",)) for i in range(6)]
    tokenizer, model, spans = tiny
    log = ResponseLog(tmp_path / "responses.jsonl")
    decoding = Decoding(max_new_tokens=3, batch_size=6, progress=False)
    generate_responses(
        model, tokenizer, spans, questions, decoding, log, "tiny", backend=_backend(server, concurrency=2)
    )
    assert server.max_in_flight == 2


def test_ids_from_llama_server_logprobs_or_retokenized_and_never_silently_missing(tiny, tmp_path, server):
    server.ids_as = "logprobs"
    records = _generate(tiny, tmp_path, _backend(server, token_ids="logprobs"), name="lp")
    assert all(b["logprobs"] == 1 for b in server.completions()) and len(records) == 3
    with pytest.raises(RuntimeError, match="returned no response token ids"):
        _generate(tiny, tmp_path, _backend(server, token_ids="token_ids"), name="missing")
    retokenized = _generate(tiny, tmp_path, _backend(server, token_ids="retokenize"), name="text")
    assert [r["response"] for r in retokenized] == [r["response"] for r in records]


def test_hook_interventions_are_refused_before_any_request(tiny, server):
    class Splice(GenerationIntervention):
        name, needs_model_hooks = "splice", True

    with pytest.raises(BackendMismatch, match="hooks the model's forward"):
        plan_generation(QUESTIONS, tiny[2], Decoding(), "tiny", intervention=Splice(), backend=_backend(server))
    assert not server.requests


def test_a_trained_policy_is_refused_without_a_way_to_load_it(tiny, tmp_path, server):
    with pytest.raises(BackendMismatch, match="refusing, rather than recording the base model's answers"):
        _generate(tiny, tmp_path, _backend(server), model=_peft(tiny, trained=True), name="lora")
    with pytest.raises(BackendMismatch, match="full finetuning"):
        _generate(tiny, tmp_path, _backend(server), adapter_id="step=3|w=abc", name="full")
    assert not server.requests
    # an adapter whose update is zero (peft's initial B = 0) is the base model: served as such
    assert len(_generate(tiny, tmp_path, _backend(server), model=_peft(tiny, trained=False), name="zero")) == 3
    assert {b["model"] for b in server.completions()} == {"base"}


def test_a_trained_adapter_is_exported_loaded_requested_by_name_and_unloaded(tiny, tmp_path, server):
    model = _peft(tiny, trained=True)
    records = _generate(tiny, tmp_path, _backend(server, lora=RuntimeLoRA()), model=model, adapter_id="step=1")
    load, *_, unload = [r for r in server.requests if r["path"] != "/v1/completions"]
    name = load["body"]["lora_name"]
    assert load["path"] == "/v1/load_lora_adapter" and name.startswith("piggy-") and len(records) == 3
    exported = tmp_path / "r" / "adapters" / name
    assert load["body"]["lora_path"] == str(exported.resolve())
    assert {p.name for p in exported.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert {b["model"] for b in server.completions()} == {name}
    assert unload == {"path": "/v1/unload_lora_adapter", "body": {"lora_name": name}, "auth": "Bearer EMPTY"}
    # the same weights keep their name; a server that still holds them says so, which is fine
    server.models.add(name)
    kept = _backend(server, lora=RuntimeLoRA(unload_path=None))
    _generate(tiny, tmp_path, kept, model=model, adapter_id="step=1", name="again")
    assert server.requests[-4]["body"]["lora_name"] == name and server.completions()[-1]["model"] == name


def test_the_api_key_comes_from_the_named_variable(tiny, tmp_path, server, monkeypatch):
    monkeypatch.setenv("PIGGY_TEST_SERVER_KEY", "sk-test-server-key-123")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-be-sent")
    _generate(tiny, tmp_path, _backend(server, api_key_env="PIGGY_TEST_SERVER_KEY"))
    assert {r["auth"] for r in server.requests} == {"Bearer sk-test-server-key-123"}
    with pytest.raises(OSError, match="PIGGY_TEST_UNSET"):
        _generate(tiny, tmp_path, _backend(server, api_key_env="PIGGY_TEST_UNSET"), name="unset")


def test_a_server_command_is_started_waited_for_and_stopped(tmp_path):
    """A stand-in server (stdlib ``http.server`` answering 200 after 0.5 s) is polled until healthy, then stopped."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve = (
        "import time, http.server as h; time.sleep(0.5); "
        f"h.test(h.SimpleHTTPRequestHandler, port={port}, bind='127.0.0.1')"
    )
    backend = CompletionsServer(f"http://127.0.0.1:{port}/v1", command=[sys.executable, "-c", serve],
                                health_path="/", startup_timeout=30)  # fmt: skip
    backend.start(tmp_path)
    process = backend._process
    assert process.poll() is None and (tmp_path / "server.log").exists()
    backend.close()
    assert process.poll() is not None
    broken = CompletionsServer(command=[sys.executable, "-c", "import sys; print('no model'); sys.exit(3)"])
    with pytest.raises(RuntimeError, match="exited with 3:\nno model"):
        broken.start(tmp_path / "broken")


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="concurrency"):
        CompletionsServer(concurrency=0)
    with pytest.raises(ValueError, match="token_ids"):
        CompletionsServer(token_ids="ids")
