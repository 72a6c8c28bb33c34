"""Generation with an in-process vLLM engine (``pip install 'piggy_lightning[vllm]'``), sent the exact prompt ids.

The engine is built at the first session and kept (loading and profiling take minutes); it holds its own copy of the
base weights, with prefix caching on, so the shared chat prefix is computed once per engine as the HF backend's
prefix cache does. A policy with a trained LoRA adapter is exported under the evaluation directory and served as a
``LoRARequest`` (``max_lora_rank`` must be at least its rank); a policy the engine cannot serve is refused (see
:func:`~piggy_lightning.evaluation.backends.remote.adapter_to_serve`). vLLM pins its own torch, so it is imported
only when a session starts.

Memory: the engine takes ``gpu_memory_utilization`` of the device's memory for weights and KV cache, beside the
policy the trainer holds on the same device; lower it when evaluating during a fit.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from piggy_lightning.evaluation.backends.base import (
    BackendMismatch,
    Complete,
    Completion,
    GenerationBackend,
    GenerationContext,
)
from piggy_lightning.evaluation.backends.remote import adapter_to_serve, export_adapter, request_seed
from piggy_lightning.evaluation.decoding import Decoding, WorkItem, eos_ids, strip_stops
from piggy_lightning.modeling import resolve_model_path


def _import_vllm():
    try:
        import vllm
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest
    except ImportError as e:
        raise ImportError(
            f"VLLMBackend needs vLLM ({e}): pip install 'piggy_lightning[vllm]' (on a machine with a GPU vLLM "
            "supports; vLLM pins its own torch version)"
        ) from e
    return vllm, TokensPrompt, LoRARequest


class VLLMBackend(GenerationBackend):
    """vLLM's offline ``LLM.generate`` on token-id prompts, in this process; each unit is one ``generate`` call,
    so a large ``decoding.batch_size`` lets vLLM batch continuously.

    Args:
        model: The weights the engine loads; None resolves the evaluation's ``model_id`` (``model_name_or_path``).
            They must be the policy's base weights: nothing here can compare them.
        dtype: The engine's dtype (vLLM's ``dtype``; ``auto`` takes the checkpoint's).
        gpu_memory_utilization: Share of the device's memory the engine takes for weights and KV cache.
        max_model_len: Longest prompt plus response; None takes the model's.
        max_lora_rank: Highest LoRA rank the engine serves (vLLM's ``enable_lora`` with ``max_lora_rank``); None
            builds an engine without LoRA, which refuses a policy with a trained adapter.
        seed: The engine's seed (each request carries its own, derived from ``Decoding.seed`` and the item key).
        engine_kwargs: Further ``vllm.LLM`` arguments (e.g. ``tensor_parallel_size``, ``enforce_eager``).
    """

    serves_model_hooks = False

    def __init__(
        self,
        model: str | None = None,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.5,
        max_model_len: int | None = None,
        max_lora_rank: int | None = 64,
        seed: int = 0,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], not {gpu_memory_utilization}")
        if max_lora_rank is not None and max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1 or None, not {max_lora_rank}")
        reserved = {"model", "enable_lora", "max_lora_rank", "enable_prefix_caching"} & set(engine_kwargs or {})
        if reserved:
            raise ValueError(f"engine_kwargs may not set {sorted(reserved)}: they are this backend's arguments")
        self.model = model
        self.dtype = dtype
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_model_len = max_model_len
        self.max_lora_rank = max_lora_rank
        self.seed = seed
        self.engine_kwargs = dict(engine_kwargs or {})
        self._engine = None
        self._lora_ids: dict[str, int] = {}  # vLLM names adapters by a unique int as well

    def engine_args(self, model_id: str) -> dict[str, Any]:
        """The ``vllm.LLM`` arguments."""
        args = {
            "model": self.model or resolve_model_path(model_id), "dtype": self.dtype, "seed": self.seed,
            "gpu_memory_utilization": self.gpu_memory_utilization, "enable_prefix_caching": True,
            "enable_lora": self.max_lora_rank is not None, **self.engine_kwargs,
        }  # fmt: skip
        if self.max_lora_rank is not None:
            args["max_lora_rank"] = self.max_lora_rank
        if self.max_model_len is not None:
            args["max_model_len"] = self.max_model_len
        return args

    @staticmethod
    def sampling_args(decoding: Decoding, item: WorkItem, stops: list[int]) -> dict[str, Any]:
        """The ``SamplingParams`` of one item: every knob set (vLLM would otherwise fill some from the model's
        ``generation_config.json``), greedy at temperature 0, the policy's stop tokens."""
        greedy = decoding.temperature <= 0
        return {
            "n": 1, "temperature": 0.0 if greedy else decoding.temperature, "top_p": 1.0 if greedy else decoding.top_p,
            "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
            "max_tokens": decoding.max_new_tokens, "seed": request_seed(decoding, item), "stop_token_ids": stops,
            "skip_special_tokens": True,
        }  # fmt: skip

    def adapter(self, context: GenerationContext) -> tuple[str, int, str] | None:
        """The ``LoRARequest`` arguments (name, unique int id, exported directory) that make the engine's base into
        the policy, or None when the policy is the base; a policy the engine cannot serve is refused."""
        adapter = adapter_to_serve(context.model, context.adapter_id)
        if adapter is None:
            return None
        if self.max_lora_rank is None:
            raise BackendMismatch(
                f"the policy ({context.adapter_id or 'its LoRA adapter'}) is not the base model and this engine has "
                "no LoRA (max_lora_rank: null): refusing, rather than recording the base model's answers as the "
                "trained model's"
            )
        ranks = {c.r for c in getattr(adapter, "peft_config", {}).values()}
        if ranks and max(ranks) > self.max_lora_rank:
            raise BackendMismatch(f"the adapter's rank {max(ranks)} exceeds max_lora_rank {self.max_lora_rank}")
        if context.lockstep:
            raise BackendMismatch("exporting a LoRA adapter whose parameters are sharded across ranks is not supported")
        root = (context.out_dir or Path(tempfile.mkdtemp(prefix="piggy-adapters-"))) / "adapters"
        name, path = export_adapter(adapter, root)
        return name, self._lora_ids.setdefault(name, len(self._lora_ids) + 1), str(path)

    @contextmanager
    def session(self, context: GenerationContext) -> Iterator[Complete]:
        adapter = self.adapter(context)  # first: a refusal needs neither vLLM nor an engine start
        vllm, TokensPrompt, LoRARequest = _import_vllm()
        lora = LoRARequest(*adapter) if adapter is not None else None
        if self._engine is None:
            self._engine = vllm.LLM(**self.engine_args(context.model_id))
        stops = eos_ids(context.model, context.tokenizer)

        def complete(unit: list[WorkItem]) -> list[Completion]:
            prompts = [TokensPrompt(prompt_token_ids=list(w.prompt.input_ids)) for w in unit]
            params = [vllm.SamplingParams(**self.sampling_args(context.decoding, w, stops)) for w in unit]
            outputs = self._engine.generate(prompts, params, lora_request=lora, use_tqdm=False)
            completions = []
            for out, p in zip(outputs, params, strict=True):
                best = out.outputs[0]
                ids = strip_stops(list(best.token_ids), stops)
                completions.append(Completion(ids, best.finish_reason == "length", p.seed, best.text))
            return completions

        yield complete

    def close(self) -> None:
        """Drop the engine (its memory is freed when vLLM's workers shut down)."""
        self._engine = None
