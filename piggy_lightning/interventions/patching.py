"""Activation patching at evaluation time: the finetuned model reads some activations from the reference model.

Three components of ``Evaluate(interventions=[...])``, each also the generation intervention it evaluates under
(see :mod:`piggy_lightning.evaluation.intervention` for the hook protocol):

* :class:`PrefixKVSplice` (paper §3.1, Fig. 3, the main test): the reference model's key/value cache of the prefix is
  spliced into the finetuned model's cache, and the finetuned model reads the rest of the prompt and answers. The
  prefix is query-independent (causal attention), so one reference forward per distinct prefix serves a whole
  evaluation. With a layer subset S, attention at layers in S reads the reference's prefix and every other layer
  reads the finetuned model's own prefix, exactly as if the cache had been edited.
* :class:`ActivationPatch` (§3.1 controls, §3.2 sweep, the carrier scan): forward hooks overwrite a
  :class:`PatchSite`'s activations with the reference's during the prefill, and the finetuned model computes
  everything downstream, including later layers at the patched positions. For ``kv`` at the prefix over *all*
  layers the two agree (same keys and values everywhere); over a subset they differ, since here the patched prefix
  keys change the prefix's own downstream states.
* :class:`QueryControl`: the paper's control, an :class:`ActivationPatch` of the keys and values at as many leading
  query positions as the prompt has prefix tokens (``query_matched``; fewer for short queries, as recorded).

Keys and values are patched at the projection outputs (before RoPE); positions are unchanged, so this equals
patching the cache unless a norm between projection and cache (Qwen3's ``k_norm``) was finetuned. Every patch is
loud: a batch with no position to patch raises, and every record counts the positions changed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from piggy_lightning.evaluation.intervention import GenerationIntervention, KVCache, PromptBatch
from piggy_lightning.interventions.base import Intervention, PatchMoment, require
from piggy_lightning.interventions.patch_site import PatchSite
from piggy_lightning.reference import Reference
from piggy_lightning.sites import Slot, overwriting, resolve_layers
from piggy_lightning.spans import TokenizedChat

if TYPE_CHECKING:
    from piggy_lightning.module import PiggyModule


def _sliced(values: dict[Slot, Tensor], start: int) -> dict[Slot, Tensor]:
    return {slot: v[:, start:] for slot, v in values.items()}


class _ReadsReference(Intervention, GenerationIntervention):
    """An intervention that reads the frozen reference model, bound to it by :meth:`bind`."""

    needs_reference = True
    needs_model_hooks = True  # it replaces keys, values or residuals inside the forward

    def __init__(self, site: PatchSite, at: list[PatchMoment] | None) -> None:
        super().__init__(at)
        self.site = site
        self._reference: Reference | None = None

    @property
    def reference(self) -> Reference:
        if self._reference is None:
            raise RuntimeError(f"{self.name} is not bound to a model: call bind(module) first (Evaluate does)")
        return self._reference

    def bind(self, module: PiggyModule) -> _ReadsReference:
        """Read ``module.reference`` from now on; resolves the site's layers in ``module.policy`` (a bad index
        fails here, before any evaluation)."""
        require(module, ("policy", "reference", "spans"), type(self).__name__)
        self.site.modules(module.policy)
        self._reference = module.reference
        return self

    def runs(self, module: PiggyModule) -> list[GenerationIntervention]:
        return [self.bind(module)]


class ActivationPatch(_ReadsReference):
    """Overwrite a site's activations with the reference model's and let the finetuned model run on.

    Batched: the reference runs once per generation batch on the same padded rows (or once in total for an
    ``empty_query`` reference), and the hooks edit only the prefill; decoding steps are untouched.

    Args:
        site: What, where and in which layers to patch, and from which reference prompt.
        at: Moments to evaluate under it: ``epoch`` (each evaluated epoch end), ``fit_end``, ``test``; None: ``[test]``.
    """

    def __init__(self, site: PatchSite, at: list[PatchMoment] | None = None) -> None:
        super().__init__(site, at)
        self.name = f"patch_{site.name}"
        self.spans = None
        self._empty: dict[Slot, Tensor] | None = None  # (n, D) per slot at the empty prompt's positions

    def bind(self, module: PiggyModule) -> ActivationPatch:
        if self._reference is not getattr(module, "reference", None):
            self._empty = None  # another reference: its empty-prompt states are not these
        super().bind(module)
        self.spans = module.spans
        return self

    def _empty_query_values(self, device: torch.device) -> dict[Slot, Tensor]:
        if self._empty is None:
            chat = self.spans.tokenize([{"role": "user", "content": ""}], add_generation_prompt=True)
            ids = torch.tensor([chat.input_ids], device=device)  # (1, T0)
            span_masks = {name: torch.tensor([chat.mask(name)], device=device) for name in ("prefix", "postfix")}
            keep = self.site.mask(span_masks)[0]  # (T0,)
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
        """The shared prefix's cache, patched wherever the site covers prefix positions (``prefix``, one prefix
        ``index``, ``prompt``); the policy's own cache when it covers none (``query``, ``postfix``)."""
        ones = torch.ones_like(prefix_ids)  # (1, P)
        none = torch.zeros_like(ones, dtype=torch.bool)
        keep = self.site.mask({"prefix": ones.bool(), "query": none, "postfix": none})  # (1, P)
        if not bool(keep.any()):
            return super().prefix_cache(model, prefix_ids)
        values = self.reference_values(prefix_ids, ones, keep)
        with overwriting(self.site.modules(model), values, keep):
            return super().prefix_cache(model, prefix_ids)

    def touched(self, prompt: TokenizedChat) -> int:
        """Positions this patch overwrites in ``prompt`` (e.g. ``min(P, |query|)`` for ``query_matched``)."""
        span_masks = {name: torch.tensor([prompt.mask(name)]) for name in ("prefix", "query", "postfix")}
        return int(self.site.mask(span_masks).sum())

    @contextmanager
    def during(self, model: nn.Module, batch: PromptBatch) -> Iterator[None]:
        full_mask = self.site.mask(batch.span_masks)  # (B, T)
        if not bool(full_mask.any()):  # a patch that changes nothing must not report the unpatched output
            where = self.site.positions if self.site.index is None else f"{self.site.positions}[{self.site.index}]"
            raise ValueError(f"{self.name}: no row of the batch has {where} tokens to patch")
        mask = full_mask[:, batch.cached :]  # the prefill's positions
        if not bool(mask.any()):  # the patched positions are all in the cached prefix (see prefix_cache)
            yield
            return
        values = self.reference_values(batch.input_ids, batch.attention_mask, full_mask)
        with overwriting(self.site.modules(model), _sliced(values, batch.cached), mask):
            yield


class QueryControl(ActivationPatch):
    """The control of prefix patching (paper §3.1): the reference's keys and values at as many leading query
    positions as the prompt has prefix tokens (all of the query when it is shorter).

    Args:
        layers: Decoder layers to patch (0-based, negative from the end); None patches every layer.
        at: Moments to evaluate under it: ``epoch`` (each evaluated epoch end), ``fit_end``, ``test``; None: ``[test]``.
    """

    def __init__(self, layers: list[int] | None = None, at: list[PatchMoment] | None = None) -> None:
        super().__init__(PatchSite("kv", "query_matched", layers), at)


class PrefixKVSplice(_ReadsReference):
    """Splice the reference model's prefix keys and values into the finetuned model's cache (paper §3.1).

    With every layer spliced this is the paper's prefix KV patching; with the reference equal to the policy it
    changes nothing, bit for bit. Prompts whose prefix no other prompt shares reach generation without a cache;
    for them the prefill's prefix keys and values are overwritten at the projection outputs, per layer from the
    reference (spliced layers) or from the finetuned model's own clean forward (other layers), which is the same
    edit of the cache.

    Args:
        layers: Decoder layers to splice (0-based, negative from the end); None splices every layer.
        at: Moments to evaluate under it: ``epoch`` (each evaluated epoch end), ``fit_end``, ``test``; None: ``[test]``.
    """

    def __init__(self, layers: list[int] | None = None, at: list[PatchMoment] | None = None) -> None:
        super().__init__(PatchSite("kv", "prefix", layers), at)
        self.layers = layers
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
