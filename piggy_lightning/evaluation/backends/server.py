"""Generation through an OpenAI-compatible ``/completions`` endpoint, sent the exact prompt token ids.

Any server that accepts ``prompt`` as a list of token ids works: vLLM's ``vllm serve``, SGLang, and llama.cpp's
C++ ``llama-server``. (llama-cpp-python's ``python -m llama_cpp.server`` does not: its request model takes
``prompt`` as text only, and rejects a list of ids with HTTP 422.) Every item is one request carrying its own seed,
at most ``concurrency`` in flight (an ``asyncio.Semaphore`` over ``openai.AsyncOpenAI``, on a private event loop in
a worker thread, so that it also runs where a caller's loop is running). The SDK retries timeouts, connection errors
and HTTP 408/409/429/5xx; any error left raises, since a missing response cannot be recorded as one (the records
of finished units stay, and a rerun resumes).

Every sampling knob is sent (:data:`NEUTRAL_SAMPLING`), as ``Decoding.to_hf`` sets every knob for HF: vLLM fills
unset fields from the model's ``generation_config.json`` and llama.cpp's servers have their own defaults (top-k 40,
min-p 0.05), either of which would change the responses behind the config's back.

The server serves its own weights. A policy that differs from them (a LoRA adapter with a non-zero update, or full
finetuning) is generated only through :class:`RuntimeLoRA` (its adapter exported under the evaluation directory and
loaded into the server at run time); without it the backend refuses, since the base model's answers must never be
recorded as the trained model's (:func:`~piggy_lightning.evaluation.backends.remote.adapter_to_serve`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import tempfile
import threading
import time
import urllib.request
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urljoin

from piggy_lightning.evaluation.backends.base import (
    BackendMismatch,
    Complete,
    Completion,
    GenerationBackend,
    GenerationContext,
)
from piggy_lightning.evaluation.backends.remote import adapter_to_serve, export_adapter, request_seed
from piggy_lightning.evaluation.decoding import Decoding, WorkItem, eos_ids, strip_stops

if TYPE_CHECKING:  # the SDK takes about 0.6 s to import: loaded by the first session (config parsing stays instant)
    import openai

log = logging.getLogger(__name__)

# vLLM (and SGLang) read top_k/min_p/repetition_penalty, llama.cpp reads top_k/min_p/repeat_penalty; each ignores
# the others' names. top_k -1 disables top-k on all three.
NEUTRAL_SAMPLING: dict[str, Any] = {"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "repeat_penalty": 1.0}
TokenIds = Literal["token_ids", "logprobs", "retokenize"]


@dataclass
class RuntimeLoRA:
    """Serving the policy's LoRA adapter by loading it into a running server (vLLM started with ``--enable-lora``,
    ``--max-lora-rank`` at least the adapter's rank, and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``; SGLang with
    ``load_path: /load_lora_adapter``). The server must read the same filesystem as this process."""

    load_path: str = "/v1/load_lora_adapter"
    """POSTed ``{"lora_name", "lora_path"}``, resolved against ``base_url`` (an absolute path replaces its path)."""
    unload_path: str | None = "/v1/unload_lora_adapter"
    """POSTed ``{"lora_name"}`` when the session ends, so adapters of earlier evaluations do not pile up; None keeps
    them loaded."""


class _LoopThread:
    """A private event loop running in a daemon thread: ``run`` blocks the caller until a coroutine finishes."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="completions-server-loop", daemon=True)
        self.thread.start()

    def run(self, coro):
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:  # an interrupt here must not leave requests running behind it
            future.cancel()
            raise

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


def _message(e: openai.APIStatusError) -> str:
    body = e.body if isinstance(e.body, dict) else {}
    return str(body.get("message") or e.message)


def _stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)  # the server's whole process group (vLLM forks engine workers)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


class CompletionsServer(GenerationBackend):
    """An OpenAI-compatible completions server, sent token ids; optionally started here as a subprocess.

    Args:
        base_url: API root (the SDK's ``base_url``), e.g. ``http://127.0.0.1:8000/v1``.
        model: The served model name (``--served-model-name`` for vLLM; llama.cpp's servers answer whatever name).
        command: Starts the server (e.g. ``[vllm, serve, Qwen/Qwen2.5-7B-Instruct, --port, "8000"]`` or
            ``[llama-server, -m, model.gguf, --port, "8000"]``) at the first session, listening at ``base_url``;
            it is stopped by :meth:`close` or at exit. None: the server is already running.
        health_path: Polled (resolved against ``base_url``) until it answers 200 after ``command`` starts.
        startup_timeout: Seconds the started server may take to become healthy (loading weights, compiling).
        api_key_env: Name of the environment variable holding the API key (never the key itself, which would be
            saved in ``config.yaml``); None sends the placeholder ``EMPTY``, never ``OPENAI_API_KEY``.
        concurrency: Requests in flight at once; a unit (``decoding.batch_size`` items) is sent together, so at
            most ``min(concurrency, batch_size)`` are in flight.
        timeout: Seconds one attempt may wait (the SDK's ``timeout``); a long response must fit in it.
        max_retries: Extra attempts after a retryable failure (the SDK's ``max_retries``).
        lora: How a policy with a trained LoRA adapter is served; None: the server serves only its base weights, and
            a trained policy is refused.
        token_ids: Where the response's token ids come from: ``token_ids``, the choice's ``token_ids`` (vLLM >= 0.10.2
            with ``return_token_ids``, requested); ``logprobs``, the ids in the choice's logprobs (llama.cpp's
            ``llama-server`` with ``logprobs: 1``, requested); ``retokenize``, the tokenizer's encoding of the
            returned text (any server; it may differ from the generated tokens by a merge, so response token counts
            are approximate). A server that does not return the ids asked for is an error, never a silent fallback.
        extra_body: Fields merged over :data:`NEUTRAL_SAMPLING` into every request (a value of None drops a field).
    """

    serves_model_hooks = False

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000/v1",
        model: str = "default",
        command: list[str] | None = None,
        health_path: str = "/health",
        startup_timeout: float = 600.0,
        api_key_env: str | None = None,
        concurrency: int = 16,
        timeout: float = 600.0,
        max_retries: int = 4,
        lora: RuntimeLoRA | None = None,
        token_ids: TokenIds = "token_ids",
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        if concurrency < 1 or max_retries < 0:
            raise ValueError(f"concurrency must be >= 1 and max_retries >= 0, not {concurrency} and {max_retries}")
        if token_ids not in ("token_ids", "logprobs", "retokenize"):
            raise ValueError(f"token_ids must be token_ids, logprobs or retokenize, not {token_ids!r}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.command = list(command) if command else None
        self.health_path = health_path
        self.startup_timeout = startup_timeout
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.lora = lora
        self.token_ids = token_ids
        self.extra_body = {k: v for k, v in {**NEUTRAL_SAMPLING, **(extra_body or {})}.items() if v is not None}
        self._process: subprocess.Popen | None = None

    # -- the server process -----------------------------------------------------------------------------
    def start(self, log_dir: Path | None = None) -> None:
        """Start ``command`` (once) and wait until ``health_path`` answers; a no-op without ``command``."""
        if self.command is None or (self._process is not None and self._process.poll() is None):
            return
        log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="completions-server-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / "server.log"
        with open(log_path, "ab") as out:  # the child keeps its own descriptor
            self._process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        weakref.finalize(self, _stop_process, self._process)
        url, deadline = urljoin(self.base_url + "/", self.health_path), time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"server command {self.command} exited with {self._process.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(url, timeout=5) as reply:
                    if reply.status == 200:
                        return
            except OSError:  # not listening yet, or 503 while loading
                pass
            time.sleep(0.5)
        self.close()
        raise TimeoutError(f"server {self.command} not healthy at {url} after {self.startup_timeout} s ({log_path})")

    def close(self) -> None:
        """Stop the server this backend started (if any)."""
        if self._process is not None:
            _stop_process(self._process)
            self._process = None

    # -- requests -------------------------------------------------------------------------------------
    def _api_key(self) -> str:
        if self.api_key_env is None:
            return "EMPTY"
        key = os.environ.get(self.api_key_env)
        if not key:
            raise OSError(f"environment variable {self.api_key_env} (the server's API key) is not set")
        return key

    def _error(self, e: Exception, what: str) -> RuntimeError:
        import openai

        if isinstance(e, openai.APIStatusError):  # the SDK's body is the error object when the server sends one
            detail = f"HTTP {e.status_code}: {_message(e)[:1000]}"
        else:
            detail = type(e).__name__
        return RuntimeError(f"{what} at {self.base_url} failed ({detail}, after the SDK's retries)")

    def request(self, item: WorkItem, decoding: Decoding, served: str, stops: list[int]) -> dict[str, Any]:
        """The ``completions.create`` arguments for one item."""
        greedy = decoding.temperature <= 0
        extra = {**self.extra_body, "stop_token_ids": stops}  # vLLM/SGLang: the policy's stops, not the server's
        if self.token_ids == "token_ids":
            extra["return_token_ids"] = True
        fields: dict[str, Any] = {
            "model": served, "prompt": list(item.prompt.input_ids), "max_tokens": decoding.max_new_tokens,
            "temperature": 0.0 if greedy else decoding.temperature, "top_p": 1.0 if greedy else decoding.top_p,
            "seed": request_seed(decoding, item), "n": 1, "frequency_penalty": 0.0, "presence_penalty": 0.0,
            "extra_body": extra,
        }  # fmt: skip
        if self.token_ids == "logprobs":
            fields["logprobs"] = 1
            extra["return_tokens_as_token_ids"] = True  # vLLM: logprobs tokens as "token_id:<id>"
        return fields

    def _ids(self, choice: Any, tokenizer) -> list[int]:
        if self.token_ids == "retokenize":
            return tokenizer.encode(choice.text or "", add_special_tokens=False)
        if self.token_ids == "token_ids":
            ids = getattr(choice, "token_ids", None)
        else:
            logprobs = getattr(choice, "logprobs", None)
            content, tokens = getattr(logprobs, "content", None), getattr(logprobs, "tokens", None)
            if content is not None:  # llama-server: [{"id", "token", "logprob", ...}]
                ids = [c["id"] if isinstance(c, dict) else c.id for c in content]
            elif tokens is not None and all(str(t).startswith("token_id:") for t in tokens):
                ids = [int(str(t)[9:]) for t in tokens]
            else:
                ids = None
        if ids is None:
            raise RuntimeError(
                f"{self.base_url} returned no response token ids (token_ids: {self.token_ids}); use token_ids: "
                "logprobs for llama.cpp's llama-server, token_ids for vLLM >= 0.10.2, or retokenize for any server"
            )
        return [int(i) for i in ids]

    async def _complete(
        self,
        client: openai.AsyncOpenAI,
        unit: list[WorkItem],
        decoding: Decoding,
        served: str,
        stops: list[int],
        tokenizer,
    ) -> list[Completion]:
        import openai

        limit = asyncio.Semaphore(self.concurrency)

        async def one(item: WorkItem) -> Completion:
            fields = self.request(item, decoding, served, stops)
            async with limit:
                try:
                    reply = await client.completions.create(**fields)
                except openai.APIError as e:
                    raise self._error(e, f"completion of {item.key!r} from {served!r}") from None
            choice = reply.choices[0]
            ids = strip_stops(self._ids(choice, tokenizer), stops)
            return Completion(ids, choice.finish_reason == "length", fields["seed"], choice.text)

        tasks = [asyncio.ensure_future(one(w)) for w in unit]
        try:
            return list(await asyncio.gather(*tasks))
        finally:  # on an error, send nothing more
            for task in tasks:
                task.cancel()

    async def _post(
        self, client: openai.AsyncOpenAI, path: str, body: dict[str, Any], what: str, tolerate: str = ""
    ) -> str:
        import openai

        try:
            return await client.post(urljoin(self.base_url + "/", path), body=body, cast_to=str)
        except openai.APIStatusError as e:
            if tolerate and tolerate in _message(e).lower():
                return _message(e)
            hint = "" if e.status_code != 404 else " (vLLM: start it with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)"
            raise RuntimeError(f"{str(self._error(e, what))}{hint}") from None
        except openai.APIError as e:
            raise self._error(e, what) from None

    @contextmanager
    def session(self, context: GenerationContext) -> Iterator[Complete]:
        import openai

        adapter = adapter_to_serve(context.model, context.adapter_id)
        if adapter is not None and self.lora is None:
            raise BackendMismatch(
                f"the policy ({context.adapter_id or 'its LoRA adapter'}) is not the base model {self.base_url} "
                f"serves as {self.model!r}, and this server is not given a way to load adapters (lora: RuntimeLoRA "
                "for vLLM started with --enable-lora): refusing, rather than recording the base model's answers "
                "as the trained model's"
            )
        if adapter is not None and context.lockstep:
            raise BackendMismatch("exporting a LoRA adapter whose parameters are sharded across ranks is not supported")
        api_key = self._api_key()
        self.start(context.out_dir)
        stops = eos_ids(context.model, context.tokenizer)
        loop = _LoopThread()
        client = openai.AsyncOpenAI(
            base_url=self.base_url, api_key=api_key, max_retries=self.max_retries, timeout=self.timeout
        )
        served = self.model
        try:
            if adapter is not None:
                root = (context.out_dir or Path(tempfile.mkdtemp(prefix="piggy-adapters-"))) / "adapters"
                served, path = export_adapter(adapter, root)
                body = {"lora_name": served, "lora_path": str(path)}
                loop.run(self._post(client, self.lora.load_path, body, "loading adapter", tolerate="already"))

            def complete(unit: list[WorkItem]) -> list[Completion]:
                return loop.run(self._complete(client, unit, context.decoding, served, stops, context.tokenizer))

            yield complete
        finally:
            try:
                if adapter is not None and self.lora.unload_path:
                    body = {"lora_name": served}
                    loop.run(self._post(client, self.lora.unload_path, body, "unloading adapter", tolerate="not"))
            except RuntimeError as e:  # the responses are recorded already: a leftover adapter is only logged
                log.warning("%s", e)
            finally:
                loop.run(client.close())
                loop.close()
