"""The in-process backend: HF ``generate`` on the policy, with each shared prompt prefix's KV cache computed once.

Prompts are grouped by their prefix (every token before the user content; paper §3): the template's default
prefix is shared by almost every prompt, and a custom ``system`` message makes a different prefix. A prefix
shared by two or more prompts is run once (through the intervention's ``prefix_cache`` hook) and its cache is
copied into every batch; the rest of each prompt is left-padded after it:

    input_ids      [ prefix (cached) | pad pad | query + postfix ]      (B, P + W)
    attention_mask [ 1 ... 1         | 0   0   | 1 ... 1         ]

``generate`` derives position ids from the mask's cumulative sum, so every token keeps the position it has in the
unpadded prompt, and greedy outputs match single-prompt generation without a cache. Prompts whose prefix is not
shared are batched with plain left padding and no cache.

It is the only backend that serves interventions hooking the forward (K/V splices, residual patches). Each batch
seeds the RNG from ``Decoding.seed`` and its first key, inside a fork of the global RNG (CPU and the model's
device) restored on exit: an evaluation in the middle of a fit leaves the training's dropout and data draws exactly
as they would be without it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import DynamicCache

from piggy_lightning.evaluation.backends.base import Complete, Completion, GenerationBackend, GenerationContext
from piggy_lightning.evaluation.decoding import Decoding, WorkItem, eos_ids, stable_seed, strip_stops
from piggy_lightning.evaluation.intervention import KVCache, PromptBatch
from piggy_lightning.forward import eval_mode

_MASK_SPANS = ("prefix", "query", "postfix", "other")


def _prefix(w: WorkItem) -> tuple[int, ...]:
    return tuple(w.prompt.input_ids[: w.n_prefix])


def _layout(prefix: tuple[int, ...], items: list[WorkItem], pad_id: int, device: torch.device) -> PromptBatch:
    """``[prefix | left padding | rest]`` rows with their span masks."""
    p = len(prefix)
    rests = [w.prompt.input_ids[p:] for w in items]
    width = p + max(len(r) for r in rests)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros(len(items), width, dtype=torch.long)  # (B, T)
    span_masks = {name: torch.zeros(len(items), width, dtype=torch.bool) for name in _MASK_SPANS}
    for row, (w, rest) in enumerate(zip(items, rests, strict=True)):
        start = width - len(rest)
        ids[row, :p] = torch.tensor(prefix, dtype=torch.long)
        ids[row, start:] = torch.tensor(rest, dtype=torch.long)
        mask[row, :p] = 1
        mask[row, start:] = 1
        labels = w.prompt.spans[:p] + [""] * (start - p) + w.prompt.spans[p:]
        for name, m in span_masks.items():
            m[row] = torch.tensor([label == name for label in labels])
    span_masks = {name: m.to(device) for name, m in span_masks.items()}
    return PromptBatch(ids.to(device), mask.to(device), span_masks, cached=p)


def _expand_cache(kv: KVCache, batch: int, config) -> DynamicCache:
    """A fresh cache holding the prefix for every row (``generate`` mutates the cache it is given)."""
    return DynamicCache(
        ddp_cache_data=[
            (k.expand(batch, -1, -1, -1).contiguous(), v.expand(batch, -1, -1, -1).contiguous()) for k, v in kv
        ],
        config=config,
    )


def _forked_rng(device: torch.device):
    """A fork of the global RNG state of the CPU and of ``device``, restored when the context exits."""
    if device.type in ("cpu", "meta"):
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device.index or 0], device_type=device.type)


class HFBackend(GenerationBackend):
    """HF ``generate`` on the policy in this process, batched, with a shared-prefix KV cache (the default).

    It needs no arguments: batching, sampling and the prefix cache follow the ``Evaluate`` callback's ``decoding``.
    """

    serves_model_hooks = True

    def units(self, work: list[WorkItem], decoding: Decoding) -> list[list[WorkItem]]:
        """Group by shared prefix (one group for prompts whose prefix no other prompt shares, or for every prompt
        when ``decoding.share_prefix`` is False), longest first within a group, cut into batches."""
        prefixes = Counter(_prefix(w) for w in work) if decoding.share_prefix else Counter()
        groups: dict[tuple[int, ...], list[WorkItem]] = {}
        for w in work:
            prefix = _prefix(w)
            groups.setdefault(prefix if prefixes[prefix] > 1 and prefix else (), []).append(w)
        out = []
        for prefix, items in groups.items():
            rest = len(prefix)
            items = sorted(items, key=lambda w: -(len(w.prompt.input_ids) - rest))  # stable: longest first
            out.extend(items[i : i + decoding.batch_size] for i in range(0, len(items), decoding.batch_size))
        return out

    @contextmanager
    def session(self, context: GenerationContext) -> Iterator[Complete]:
        model, tokenizer, decoding, intervention = (context.model, context.tokenizer, context.decoding,
                                                    context.intervention)  # fmt: skip
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        stops = eos_ids(model, tokenizer)
        config = decoding.to_hf(pad_id, stops)
        device = next(model.parameters()).device
        # as in units: a prefix is cached when the whole plan shares it (a resumed unit keeps its layout)
        shared = Counter(_prefix(w) for unit in context.planned for w in unit) if decoding.share_prefix else Counter()
        caches: dict[tuple[int, ...], KVCache] = {}

        def prefix_of(unit: list[WorkItem]) -> tuple[int, ...]:
            prefix = _prefix(unit[0])
            return prefix if prefix and all(_prefix(w) == prefix for w in unit) and shared[prefix] > 1 else ()

        def cache_for(prefix: tuple[int, ...]) -> KVCache:
            if prefix not in caches:
                caches[prefix] = intervention.prefix_cache(model, torch.tensor([prefix], device=device))
            return caches[prefix]

        def complete(unit: list[WorkItem]) -> list[Completion]:
            prefix = prefix_of(unit)
            batch = _layout(prefix, unit, pad_id, device)
            cache = _expand_cache(cache_for(prefix), len(unit), model.config) if prefix else None
            seed = stable_seed(decoding.seed, unit[0].key)
            torch.manual_seed(seed)
            with intervention.during(model, batch):
                out = model.generate(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    cache=cache,
                    generation_config=config,
                    synced_gpus=context.lockstep,
                )
            completions = []
            for tokens in out[:, batch.input_ids.size(1) :].tolist():  # (B, <= max_new_tokens)
                response = strip_stops(tokens, stops)
                completions.append(Completion(response, len(response) == len(tokens), seed))
            return completions

        with eval_mode(model), torch.no_grad(), _forked_rng(device):
            if context.lockstep:  # every rank computes every prefix cache, in one order: each is a collective
                for unit in context.pending:
                    if prefix := prefix_of(unit):
                        cache_for(prefix)
            yield complete
