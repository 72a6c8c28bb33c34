"""TReFT on the prefix (the paper's default), with the query-independent reference keys and values computed once.

Causal attention makes the prefix keys and values independent of the query, so the module runs the reference once,
over the template's default prefix, right after set-up (``Regularizer.reference_once``), and no training step runs
the reference. :class:`PerRowPrefixKVDrift` also accepts rows that carry their own system prompt.
"""

from __future__ import annotations

import torch
from torch import Tensor

from piggy_lightning.drift import KVSource, batch_rows, kv_drift
from piggy_lightning.forward import ForwardRecord, Span
from piggy_lightning.regularizer import RegularizerContext, WeightSchedule
from piggy_lightning.regularizers.kv_drift import _KVDriftBase
from piggy_lightning.sites import batch_spans, pick_at, position_mask, require_positions


class PrefixKVDrift(_KVDriftBase):
    """TReFT on the prefix, against the reference keys and values of the template's default prefix, cached once.

    Zhao et al. 2026, "The Piggyback Hypothesis of Generalization" (arXiv 2606.06667), Sec. 5.1, Eq. 2-3; the
    release's ``PrefixRegularizedSFTTrainer``. The prefix is the template's default prompt start
    (``spans.anatomy.prefix_ids``, P tokens); every batch row must start with it (checked each step, and a row
    that does not raises: use :class:`PerRowPrefixKVDrift` for rows with their own system prompt), and the penalty
    pools the first P positions of all rows. Training steps never run the reference model.

    Args:
        weight: The regularization strength lambda (Table 15: 1-30).
        name: Metric name (``train/reg/<name>``); default ``prefix_kv``.
        layers: Decoder layers to regularize (negative counts from the end); None means all layers.
        source: ``kv``: the real key/value projection outputs (paper); ``kv_normed``: keys after Qwen3's
            ``k_norm``; ``hidden``: ``k_proj``/``v_proj`` applied to the pre-norm residual stream, as the released
            training code does (for fidelity runs).
        schedule: How the weighted penalty enters the loss over training, e.g. ``Hinge`` (the release's
            threshold, 0 in its configs) or ``ActiveWindow``; None: ``weight * L_KV`` at every step.
    """

    default_name = "prefix_kv"

    def __init__(
        self,
        weight: float = 1.0,
        name: str | None = None,
        layers: list[int] | None = None,
        source: KVSource = "kv",
        schedule: WeightSchedule | None = None,
    ) -> None:
        super().__init__(weight, name, layers, source, schedule)
        # cached reference, rebuilt at set-up in every run and never saved: (P,), (L, P, D), (L, P, D)
        self.register_buffer("prefix_ids", None, persistent=False)
        self.register_buffer("ref_keys", None, persistent=False)
        self.register_buffer("ref_values", None, persistent=False)

    @property
    def reference_span(self) -> Span:
        return "prompt"  # the prefix only (bounds the hidden source's projections too)

    def kv_columns(self, batch: dict[str, Tensor]) -> int | None:
        return self.prefix_ids.numel() if self.prefix_ids is not None else None  # the first P positions

    def setup(self, context: RegularizerContext) -> None:
        super().setup(context)
        ids = torch.tensor(context.spans.anatomy.prefix_ids, dtype=torch.long, device=context.device)  # (P,)
        self._check_prefix(ids)
        self.prefix_ids = ids

    def reference_once(self) -> dict[str, Tensor] | None:
        """The default prefix as a one-row batch ``(1, P)``."""
        if self.prefix_ids is None:
            raise RuntimeError(f"regularizer {self.name!r}: reference_once() before setup()")
        ids = self.prefix_ids[None]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def setup_reference(self, record: ForwardRecord) -> None:
        keys, values = self._kv(record, lambda t: t[0])  # (L, P, D)
        self.cache(self.prefix_ids, keys, values)

    def _check_prefix(self, ids: Tensor) -> None:
        if ids.numel() == 0:
            raise ValueError(
                f"regularizer {self.name!r}: the chat template has an empty prefix, so there is nothing to "
                "regularize; use KVDrift(positions='postfix') instead (as the paper does for Qwen3)"
            )

    def cache(self, prefix_ids: Tensor, keys: Tensor, values: Tensor) -> None:
        """Store the reference of the prefix ``prefix_ids`` ``(P,)``: ``keys``/``values`` ``(L, P, D)``."""
        self._check_prefix(prefix_ids)
        self.prefix_ids = prefix_ids.long()
        self.ref_keys, self.ref_values = keys.detach().float(), values.detach().float()

    def _matches(self, batch: dict[str, Tensor]) -> Tensor:
        """``(B,)`` whether each row starts with the cached prefix."""
        ids, n = batch["input_ids"], self.prefix_ids.numel()  # (B, T), P
        if ids.size(1) < n:
            raise ValueError(f"regularizer {self.name!r}: {ids.size(1)}-token sequences are shorter than the prefix")
        return (ids[:, :n] == self.prefix_ids.to(ids.device)).all(1)

    def forward(self, batch: dict[str, Tensor], policy: ForwardRecord, reference: ForwardRecord | None) -> Tensor:
        if self.ref_keys is None:
            raise RuntimeError(f"regularizer {self.name!r} has no cached prefix reference; it must be set up first")
        matches = self._matches(batch)  # (B,)
        if bool(matches.all()):  # the usual case: slicing only, no reference forward
            n = self.prefix_ids.numel()
            keys, values = self._kv(policy, lambda t: t[:, :n])  # (L, B, P, D)
            return kv_drift(keys, values, self.ref_keys[:, None], self.ref_values[:, None])
        return self._mismatched(batch, policy, reference, matches)

    def _mismatched(
        self, batch: dict[str, Tensor], policy: ForwardRecord, reference: ForwardRecord | None, matches: Tensor
    ) -> Tensor:
        bad = (~matches).nonzero().flatten().tolist()
        raise ValueError(
            f"regularizer {self.name!r}: batch rows {bad} do not start with the template's default prefix "
            f"({self.prefix_ids.numel()} tokens), e.g. because they carry their own system prompt; drop system "
            "messages (data.drop_system) or use PerRowPrefixKVDrift"
        )


class PerRowPrefixKVDrift(PrefixKVDrift):
    """:class:`PrefixKVDrift` that also regularizes rows not starting with the default prefix, each on its own prefix.

    Rows with the default prefix use the cached reference; a row with its own prefix (e.g. its own system prompt)
    is compared, over its ``prefix`` span, with a reference forward of that row. Their drifts are pooled per
    position. A class of its own rather than a mode of :class:`PrefixKVDrift` because it changes what the run
    must hold: it needs the reference during training (under full finetuning a frozen copy, ``keeps_reference``),
    while :class:`PrefixKVDrift` reads it once at set-up. The reference forward is a declared need
    (:meth:`reference_rows`): the module runs it on the mismatched rows only, prompt-only and head-free, and only on
    steps that have such rows.

    Args:
        weight: The regularization strength lambda.
        name: Metric name (``train/reg/<name>``); default ``prefix_kv``.
        layers: Decoder layers to regularize (negative counts from the end); None means all layers.
        source: ``kv``, ``kv_normed`` or ``hidden``, as for :class:`PrefixKVDrift`.
        schedule: How the weighted penalty enters the loss over training (hinge, window, warm-up); None: always.
    """

    @property
    def keeps_reference(self) -> bool:
        return True

    def kv_columns(self, batch: dict[str, Tensor]) -> int | None:
        """The first P positions, or the prompt's when some row has a prefix of its own (of any length)."""
        return super().kv_columns(batch) if self.reference_rows(batch) is None else None

    def reference_rows(self, batch: dict[str, Tensor]) -> Tensor | None:
        """The rows that do not start with the cached prefix, or None when every row does."""
        if self.prefix_ids is None or batch["input_ids"].size(1) < self.prefix_ids.numel():
            return None  # forward raises the clear error
        matches = self._matches(batch)
        return None if bool(matches.all()) else (~matches).nonzero().flatten()

    def _mismatched(
        self, batch: dict[str, Tensor], policy: ForwardRecord, reference: ForwardRecord | None, matches: Tensor
    ) -> Tensor:
        """Pool cached-prefix rows with rows whose own prefix the module ran the reference on."""
        if reference is None:
            raise RuntimeError(f"regularizer {self.name!r} needs the reference forward of its mismatched rows")
        n, same, other = self.prefix_ids.numel(), matches.nonzero().flatten(), (~matches).nonzero().flatten()
        mask = require_positions(position_mask(batch_spans(batch_rows(batch, other)), "prefix"), "prefix", self.name)
        keys, values = self._kv(policy, lambda t: pick_at(mask)(t[other]))  # (L, N, D)
        ref_keys, ref_values = self._kv(reference, pick_at(mask))  # reference of the other rows, prompt only
        if same.numel():
            k, v = self._kv(policy, lambda t: t[same, :n])  # (L, b, P, D)
            keys, values = torch.cat([k.flatten(1, 2), keys], 1), torch.cat([v.flatten(1, 2), values], 1)
            ref_keys = torch.cat([self.ref_keys.repeat(1, same.numel(), 1), ref_keys.float()], 1)
            ref_values = torch.cat([self.ref_values.repeat(1, same.numel(), 1), ref_values.float()], 1)
        return kv_drift(keys, values, ref_keys, ref_values)
