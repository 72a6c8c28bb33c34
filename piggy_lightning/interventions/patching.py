"""Activation patching at evaluation time: the finetuned model reads some activations from the reference model.

Two generation interventions (see :mod:`piggy_lightning.evaluation.intervention` for the hook protocol):

* :class:`PrefixKVSplice` (paper §3.1, Fig. 3, the main test): the reference model's key/value cache of the prefix is
  spliced into the finetuned model's cache, and the finetuned model reads the rest of the prompt and answers. The
  prefix is query-independent (causal attention), so one reference forward per distinct prefix serves a whole
  evaluation. With a layer subset S, attention at layers in S reads the reference's prefix and every other layer
  reads the finetuned model's own prefix, exactly as if the cache had been edited.
* :class:`ActivationPatch` (§3.1 controls, §3.2 sweep): forward hooks overwrite a :class:`PatchSite`'s activations
  with the reference's during the prefill, and the finetuned model computes everything downstream, including
  later layers at the patched positions. For ``kv`` at the prefix over *all* layers the two agree (same keys and
  values everywhere); over a subset they differ, since here the patched prefix keys change the prefix's own
  downstream states.

Keys and values are patched at the projection outputs (before RoPE); positions are unchanged, so this equals
patching the cache unless a norm between projection and cache (Qwen3's ``k_norm``) was finetuned.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from piggy_lightning.evaluation.intervention import GenerationIntervention, KVCache, PromptBatch
from piggy_lightning.interventions.patch_site import PatchSite
from piggy_lightning.reference import Reference
from piggy_lightning.sites import Slot, overwriting, position_mask, resolve_layers
from piggy_lightning.spans import ChatSpans, TokenizedChat


def _sliced(values: dict[Slot, Tensor], start: int) -> dict[Slot, Tensor]:
    return {slot: v[:, start:] for slot, v in values.items()}


class ActivationPatch(GenerationIntervention):
    """Overwrite a site's activations with the reference model's and let the finetuned model run on.

    Batched: the reference runs once per generation batch on the same padded rows (or once in total for an
    ``empty_query`` reference), and the hooks edit only the prefill; decoding steps are untouched.

    Args:
        site: What, where and in which layers to patch.
        reference: The frozen initial model (``PiggyModule.reference``).
        spans: The template's spans; needed only for an ``empty_query`` reference.
    """

    def __init__(self, site: PatchSite, reference: Reference, spans: ChatSpans | None = None) -> None:
        if site.reference == "empty_query" and spans is None:
            raise ValueError("an empty-query reference needs the chat spans to render the empty prompt")
        self.site = site
        self.reference = reference
        self.spans = spans
        self.name = f"patch_{site.name}"
        self._empty: dict[Slot, Tensor] | None = None  # (n, D) per slot at the empty prompt's positions

    def _empty_query_values(self, device: torch.device) -> dict[Slot, Tensor]:
        if self._empty is None:
            chat = self.spans.tokenize([{"role": "user", "content": ""}], add_generation_prompt=True)
            ids = torch.tensor([chat.input_ids], device=device)  # (1, T0)
            span_masks = {name: torch.tensor([chat.mask(name)], device=device) for name in ("prefix", "postfix")}
            keep = position_mask(span_masks, self.site.positions)[0]  # (T0,)
            with self.reference.active() as model:
                values = self.site.read(model, ids, torch.ones_like(ids))
            self._empty = {slot: v[0, keep] for slot, v in values.items()}
        return self._empty

    def reference_values(self, input_ids: Tensor, attention_mask: Tensor, mask: Tensor) -> dict[Slot, Tensor]:
        """The reference's site tensors ``(B, T, D)`` for these rows, valid where ``mask`` (B, T) is True."""
        if self.site.reference == "same":
            with self.reference.active() as model:
                return self.site.read(model, input_ids, attention_mask)
        empty = self._empty_query_values(input_ids.device)
        counts = mask.sum(1)
        n = next(iter(empty.values())).size(0)
        if bool((counts != n).any()):
            raise ValueError(
                f"{self.name}: rows have {counts.tolist()} {self.site.positions} tokens, the empty prompt {n}"
            )
        out = {}
        for slot, v in empty.items():  # v: (n, D)
            full = v.new_zeros(*mask.shape, v.size(-1))  # (B, T, D)
            full[mask] = v.repeat(mask.size(0), 1)
            out[slot] = full
        return out

    def prefix_cache(self, model: nn.Module, prefix_ids: Tensor) -> KVCache:
        if self.site.positions != "prefix":
            return super().prefix_cache(model, prefix_ids)
        ones = torch.ones_like(prefix_ids)  # (1, P)
        values = self.reference_values(prefix_ids, ones, ones.bool())
        with overwriting(self.site.modules(model), values, ones.bool()):
            return super().prefix_cache(model, prefix_ids)

    def touched(self, prompt: TokenizedChat) -> int:
        """Positions this patch overwrites in ``prompt`` (e.g. ``min(P, |query|)`` for ``query_matched``)."""
        span_masks = {name: torch.tensor([prompt.mask(name)]) for name in ("prefix", "query", "postfix")}
        return int(position_mask(span_masks, self.site.positions).sum())

    @contextmanager
    def during(self, model: nn.Module, batch: PromptBatch) -> Iterator[None]:
        full_mask = position_mask(batch.span_masks, self.site.positions)  # (B, T)
        if not bool(full_mask.any()):  # a patch that changes nothing must not report the unpatched output
            raise ValueError(f"{self.name}: no row of the batch has {self.site.positions} tokens to patch")
        mask = full_mask[:, batch.cached :]  # the prefill's positions
        if not bool(mask.any()):  # the patched positions are all in the cached prefix (see prefix_cache)
            yield
            return
        values = self.reference_values(batch.input_ids, batch.attention_mask, full_mask)
        with overwriting(self.site.modules(model), _sliced(values, batch.cached), mask):
            yield


class PrefixKVSplice(GenerationIntervention):
    """Splice the reference model's prefix keys and values into the finetuned model's cache (paper §3.1).

    With every layer spliced this is the paper's prefix KV patching; with the reference equal to the policy it
    changes nothing, bit for bit. Prompts whose prefix no other prompt shares reach generation without a cache;
    for them the prefill's prefix keys and values are overwritten at the projection outputs, per layer from the
    reference (spliced layers) or from the finetuned model's own clean forward (other layers), which is the same
    edit of the cache.

    Args:
        reference: The frozen initial model (``PiggyModule.reference``).
        layers: Decoder layers to splice (0-based, negative from the end); None splices every layer.
    """

    def __init__(self, reference: Reference, layers: list[int] | None = None) -> None:
        self.reference = reference
        self.layers = layers
        self.site = PatchSite("kv", "prefix", layers)
        self.name = f"splice_{self.site.name}"

    def prefix_cache(self, model: nn.Module, prefix_ids: Tensor) -> KVCache:
        with self.reference.active() as reference_model:
            spliced = super().prefix_cache(reference_model, prefix_ids)
        layers = set(resolve_layers(self.layers, len(spliced)))
        if len(layers) == len(spliced):
            return spliced
        own = super().prefix_cache(model, prefix_ids)
        return [spliced[i] if i in layers else own[i] for i in range(len(own))]

    def touched(self, prompt: TokenizedChat) -> int:
        """Prefix positions spliced in ``prompt``."""
        return sum(prompt.mask("prefix"))

    @contextmanager
    def during(self, model: nn.Module, batch: PromptBatch) -> Iterator[None]:
        if not bool(batch.span_masks["prefix"].any()):
            raise ValueError(f"{self.name}: no row of the batch has prefix tokens to splice")
        mask = batch.span_masks["prefix"][:, batch.cached :]  # (B, T - cached); empty when the prefix is cached
        if not bool(mask.any()):
            yield
            return
        every_layer = PatchSite("kv", "prefix")
        with self.reference.active() as reference_model:
            values = self.site.read(reference_model, batch.input_ids, batch.attention_mask)
        if self.layers is not None:  # unspliced layers keep the finetuned model's own clean prefix keys and values
            own = every_layer.read(model, batch.input_ids, batch.attention_mask)
            values = {**own, **values}
        with overwriting(every_layer.modules(model), _sliced(values, batch.cached), mask):
            yield
