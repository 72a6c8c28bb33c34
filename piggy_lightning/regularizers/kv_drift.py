"""TReFT: keep the attention keys and values of chosen tokens close to the initial model's (paper §5.1).

For layer l and regularized positions T the penalty is the mean squared relative drift
``L_K(l) = mean_{t in T} ||k_t - k_t^init||^2 / ||k_t^init||^2`` (the norm over the whole ``k_proj`` output, all KV
heads together), the same ``L_V(l)`` for values, and ``L_KV = mean_l (L_K(l) + L_V(l))``; the loss adds
``max(weight * L_KV - threshold, 0)``. ``drift_math.kv_drift`` holds that arithmetic for every variant:

* :class:`PrefixKVDrift` (the TReFT default): the prefix keys and values do not depend on the query (causal
  attention), so the reference is computed once in :meth:`PrefixKVDrift.setup` and no step runs the reference;
* :class:`KVDrift`: query-dependent positions (query, postfix, prompt, ...) against a reference forward on each
  batch, or the release's postfix approximation (one reference taken from a single training example).

``source`` picks what "keys and values" means: ``kv`` (the default) records the real ``k_proj``/``v_proj`` outputs
(after the input norm, before RoPE; the paper's wording, and what the patching code replaces); ``kv_normed`` takes
the keys after the per-head ``k_norm`` of Qwen3-style attention, i.e. what actually enters RoPE and the cache (on
Qwen3 a finetuned ``k_norm`` can move the cached keys while ``k_proj`` stays put; models without ``k_norm`` raise);
``hidden`` applies ``k_proj``/``v_proj`` to the pre-norm residual stream ``hidden_states[l]`` as the released
training code does. ``kv`` stays the default because it is the paper's definition and exists on every model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from piggy_lightning.drift import (
    KVSource,
    batch_rows,
    kv_drift,
    kv_needs,
    reference_kv,
    reference_select,
    select_kv,
)
from piggy_lightning.forward import ForwardRecord, Need, Span
from piggy_lightning.regularizer import Regularizer
from piggy_lightning.sites import (
    Positions,
    batch_spans,
    kv_projections,
    pick_at,
    position_mask,
    require_positions,
    resolve_layers,
    span_of,
)

if TYPE_CHECKING:
    from piggy_lightning.module import PiggyModule
    from piggy_lightning.reference import Reference


class _KVDriftBase(Regularizer):
    """Options shared by the TReFT penalties: layers, K/V source, hinge and active window."""

    def __init__(
        self,
        weight: float,
        name: str | None,
        layers: list[int] | None,
        source: KVSource,
        threshold: float,
        active_from: float,
        active_until: float,
    ) -> None:
        super().__init__(weight, name)
        if source not in ("kv", "kv_normed", "hidden"):
            raise ValueError(f"source must be 'kv', 'kv_normed' or 'hidden', got {source!r}")
        if threshold < 0 or not 0.0 <= active_from < active_until <= 1.0:
            raise ValueError(
                f"need threshold >= 0 and 0 <= active_from < active_until <= 1, got {threshold}, "
                f"{active_from}, {active_until}"
            )
        self.layers, self.source, self.threshold = layers, source, float(threshold)
        self.active_from, self.active_until = float(active_from), float(active_until)
        self._layer_ids: list[int] | None = None
        self._reference: Reference | None = None
        self._projections: list | None = None  # the policy's (k_proj, v_proj); a plain list, not submodules

    @property
    def needs(self) -> frozenset[Need]:
        return kv_needs(self.source)

    def setup(self, module: PiggyModule) -> None:
        self._reference = module.reference
        self._projections = kv_projections(module.policy)
        self._layer_ids = resolve_layers(self.layers, len(self._projections))

    def _layers_of(self, record: ForwardRecord) -> list[int]:
        if self._layer_ids is None:  # used without setup (hand-made records in tests)
            n = len(record.keys) if record.keys is not None else len(record.hidden_states) - 1
            self._layer_ids = resolve_layers(self.layers, n)
        return self._layer_ids

    def weighted(self, raw: Tensor, progress: float) -> Tensor:
        """``max(weight * raw - threshold, 0)`` inside the active window of training, 0 outside it."""
        if progress < self.active_from or (progress >= self.active_until and self.active_until < 1.0):
            return raw.new_zeros(())
        return (raw * self.weight - self.threshold).clamp_min(0.0)


class PrefixKVDrift(_KVDriftBase):
    """TReFT on the prefix (the paper's default), with the reference keys and values computed once.

    Zhao et al. 2026, "The Piggyback Hypothesis of Generalization" (arXiv 2606.06667), Sec. 5.1, Eq. 2-3; the
    release's ``PrefixRegularizedSFTTrainer``. The prefix is the template's default prompt start
    (``module.spans.anatomy.prefix_ids``, P tokens); every batch row must start with it (checked each step),
    and the penalty pools the first P positions of all rows. Training steps never run the reference model.

    Args:
        weight: The regularization strength lambda (Table 15: 1-30).
        name: Metric name (``train/reg/<name>``); default ``prefix_kv``.
        layers: Decoder layers to regularize (negative counts from the end); None means all layers.
        source: ``kv``: the real key/value projection outputs (paper); ``kv_normed``: keys after Qwen3's
            ``k_norm``; ``hidden``: ``k_proj``/``v_proj`` applied to the pre-norm residual stream, as the released
            training code does (for fidelity runs).
        threshold: Hinge: the loss adds ``max(weight * L_KV - threshold, 0)``; the release configs use 0.
        active_from: Fraction of training steps after which the penalty switches on.
        active_until: Fraction of training steps after which it switches off (1 = until the end).
        mismatch: Rows that do not start with the cached prefix (e.g. a custom system prompt): ``error`` raises;
            ``per_row`` regularizes their own prefix span against a reference forward on those rows only.
    """

    default_name = "prefix_kv"

    def __init__(
        self,
        weight: float = 1.0,
        name: str | None = None,
        layers: list[int] | None = None,
        source: KVSource = "kv",
        threshold: float = 0.0,
        active_from: float = 0.0,
        active_until: float = 1.0,
        mismatch: Literal["error", "per_row"] = "error",
    ) -> None:
        super().__init__(weight, name, layers, source, threshold, active_from, active_until)
        if mismatch not in ("error", "per_row"):
            raise ValueError(f"mismatch must be 'error' or 'per_row', got {mismatch!r}")
        self.mismatch = mismatch

    @property
    def keeps_reference(self) -> bool:
        """The cache is taken in :meth:`setup`; only ``per_row`` runs the reference on mismatched rows later."""
        return self.mismatch == "per_row"
        # cached reference, rebuilt by setup() in every run and never saved: (P,), (L, P, D), (L, P, D)
        self.register_buffer("prefix_ids", None, persistent=False)
        self.register_buffer("ref_keys", None, persistent=False)
        self.register_buffer("ref_values", None, persistent=False)

    def setup(self, module: PiggyModule) -> None:
        super().setup(module)
        device = next(module.policy.parameters()).device
        ids = torch.tensor(module.spans.anatomy.prefix_ids, dtype=torch.long, device=device)  # (P,)
        self._check_prefix(ids)
        prefix = {"input_ids": ids[None], "attention_mask": torch.ones_like(ids[None])}  # (1, P)
        keys, values = reference_kv(module.reference, prefix, self._layer_ids, self.source, lambda t: t[0])
        self.cache(ids, keys, values)

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

    def forward(self, batch: dict[str, Tensor], policy: ForwardRecord, reference: ForwardRecord | None) -> Tensor:
        if self.ref_keys is None:
            raise RuntimeError(f"regularizer {self.name!r} has no cached prefix reference; call setup(module) first")
        ids, n = batch["input_ids"], self.prefix_ids.numel()  # (B, T), P
        if ids.size(1) < n:
            raise ValueError(f"regularizer {self.name!r}: {ids.size(1)}-token sequences are shorter than the prefix")
        layers = self._layers_of(policy)
        matches = (ids[:, :n] == self.prefix_ids.to(ids.device)).all(1)  # (B,)
        if bool(matches.all()):  # the usual case: slicing only, no reference forward
            keys, values = select_kv(policy, layers, self.source, lambda t: t[:, :n], self._projections)  # (L, B, P, D)
            return kv_drift(keys, values, self.ref_keys[:, None], self.ref_values[:, None])
        if self.mismatch == "error":
            bad = (~matches).nonzero().flatten().tolist()
            raise ValueError(
                f"regularizer {self.name!r}: batch rows {bad} do not start with the template's default prefix "
                f"({n} tokens), e.g. because they carry their own system prompt; drop system messages "
                "(data.drop_system) or set mismatch: per_row"
            )
        return self._mixed(batch, policy, matches, layers)

    def _mixed(self, batch: dict[str, Tensor], policy: ForwardRecord, matches: Tensor, layers: list[int]) -> Tensor:
        """Pool cached-prefix rows with rows whose own prefix gets a reference forward."""
        n, same, other = self.prefix_ids.numel(), matches.nonzero().flatten(), (~matches).nonzero().flatten()
        sub = batch_rows(batch, other)
        mask = require_positions(position_mask(batch_spans(sub), "prefix"), "prefix", self.name)  # (b, T)
        keys, values = select_kv(policy, layers, self.source, lambda t: t[other][mask], self._projections)  # (L, N, D)
        ref_keys, ref_values = reference_kv(self._reference, sub, layers, self.source, lambda t: t[mask])
        if same.numel():
            k, v = select_kv(policy, layers, self.source, lambda t: t[same, :n], self._projections)  # (L, b, P, D)
            keys, values = torch.cat([k.flatten(1, 2), keys], 1), torch.cat([v.flatten(1, 2), values], 1)
            ref_keys = torch.cat([self.ref_keys.repeat(1, same.numel(), 1), ref_keys.float()], 1)
            ref_values = torch.cat([self.ref_values.repeat(1, same.numel(), 1), ref_values.float()], 1)
        return kv_drift(keys, values, ref_keys, ref_values)


class KVDrift(_KVDriftBase):
    """TReFT's key/value penalty at query-dependent positions: query, postfix or the whole prompt.

    Zhao et al. 2026 (arXiv 2606.06667), Sec. 5.1 and the Table 3 ablations "TReFT (query)" / "TReFT (all)"
    (``positions: prompt``), and Table 4 (postfix, Qwen3). The per-position drifts of all rows are pooled.

    Args:
        weight: The regularization strength lambda.
        name: Metric name; default ``kv_<positions>``.
        positions: Which tokens to regularize (see ``regularizers/positions.py``); ``prompt`` is the paper's "all".
        reference: ``live``: an exact reference forward on every batch (the module runs it); ``shared``: the
            release's postfix approximation: one reference taken once, from the first row of the first training
            batch, and compared with the last occurrence of the span in every row (prefix or postfix only; no
            reference forward per step; each process of a multi-device run takes its own).
        layers: Decoder layers to regularize (negative counts from the end); None means all layers.
        source: ``kv``: the real key/value projection outputs; ``kv_normed``: keys after Qwen3's ``k_norm``;
            ``hidden``: projections of the pre-norm residual stream, as in the released training code.
        threshold: Hinge: the loss adds ``max(weight * L_KV - threshold, 0)``.
        active_from: Fraction of training steps after which the penalty switches on.
        active_until: Fraction of training steps after which it switches off (1 = until the end).
    """

    def __init__(
        self,
        weight: float = 1.0,
        name: str | None = None,
        positions: Positions = "query",
        reference: Literal["live", "shared"] = "live",
        layers: list[int] | None = None,
        source: KVSource = "kv",
        threshold: float = 0.0,
        active_from: float = 0.0,
        active_until: float = 1.0,
    ) -> None:
        super().__init__(weight, name or f"kv_{positions}", layers, source, threshold, active_from, active_until)
        if reference not in ("live", "shared"):
            raise ValueError(f"reference must be 'live' or 'shared', got {reference!r}")
        if reference == "shared" and positions not in ("prefix", "postfix"):
            raise ValueError(f"a shared reference needs positions whose tokens every row shares, not {positions!r}")
        self.positions, self.reference_mode = positions, reference
        self._span_len = 0  # tokens of one occurrence of the shared span (set up from the template)
        # shared reference, taken at the first step and never saved: (n,), (L, n, D), (L, n, D)
        self.register_buffer("shared_ids", None, persistent=False)
        self.register_buffer("ref_keys", None, persistent=False)
        self.register_buffer("ref_values", None, persistent=False)

    @property
    def needs_reference(self) -> bool:
        return self.reference_mode == "live"

    @property
    def reference_span(self) -> Span:
        return span_of(self.positions)

    @property
    def keeps_reference(self) -> bool:
        return True  # live: every step; shared: taken at the first training step

    def forward(self, batch: dict[str, Tensor], policy: ForwardRecord, reference: ForwardRecord | None) -> Tensor:
        layers = self._layers_of(policy)
        mask = require_positions(position_mask(batch_spans(batch), self.positions), self.positions, self.name)  # (B, T)
        if self.reference_mode == "shared":
            return self._shared(batch, policy, mask, layers)
        if reference is None:
            raise RuntimeError(f"regularizer {self.name!r} needs the reference forward of the batch")
        keys, values = select_kv(policy, layers, self.source, lambda t: t[mask], self._projections)  # (L, N, D)
        ref_keys, ref_values = reference_select(self._reference, reference, layers, self.source, pick_at(mask))
        return kv_drift(keys, values, ref_keys, ref_values)

    def setup(self, module: PiggyModule) -> None:
        super().setup(module)
        if self.reference_mode == "shared":  # compare one occurrence of the template's span per row
            anatomy = module.spans.anatomy
            self._span_len = len(anatomy.prefix_ids if self.positions == "prefix" else anatomy.postfix_ids)
            if self._span_len == 0:
                raise ValueError(f"regularizer {self.name!r}: the chat template has an empty {self.positions}")

    def _shared(self, batch: dict[str, Tensor], policy: ForwardRecord, mask: Tensor, layers: list[int]) -> Tensor:
        n, rows = self._span_len or int(mask[0].sum()), mask.size(0)
        # the last n selected positions of each row (the release takes the last occurrence of the postfix)
        last = mask & (mask.flip(1).cumsum(1).flip(1) <= n)  # (B, T)
        if bool((mask.sum(1) < n).any()):
            raise ValueError(f"regularizer {self.name!r}: a row has fewer than {n} {self.positions} tokens")
        shared_ids, ref_keys, ref_values = self._shared_reference(batch, last, layers)  # (n,), (L, n, D) x 2
        if not torch.equal(batch["input_ids"][last].view(rows, n), shared_ids.expand(rows, n)):
            raise ValueError(
                f"regularizer {self.name!r}: every row must end its {self.positions} with the same {n} tokens as "
                "the example the shared reference was taken from; use reference: live"
            )
        keys, values = select_kv(policy, layers, self.source, lambda t: t[last], self._projections)  # (L, B*n, D)
        return kv_drift(keys, values, ref_keys.repeat(1, rows, 1), ref_values.repeat(1, rows, 1))

    def _shared_reference(self, batch: dict[str, Tensor], last: Tensor, layers: list[int]) -> tuple[Tensor, ...]:
        """The shared reference, taken from row 0 at the first training step (the release's "first example")."""
        if self.ref_keys is not None:
            return self.shared_ids, self.ref_keys, self.ref_values
        if self._reference is None:
            raise RuntimeError(f"regularizer {self.name!r} needs setup(module) before its first step")
        first = batch_rows(batch, torch.zeros(1, dtype=torch.long, device=last.device))
        keys, values = reference_kv(self._reference, first, layers, self.source, lambda t: t[last[:1]])
        shared = batch["input_ids"][0][last[0]], keys.float(), values.float()
        if self.training:  # a validation batch (e.g. Lightning's sanity check) does not pick the example
            self.shared_ids, self.ref_keys, self.ref_values = shared
        return shared
