"""TReFT: keep the attention keys and values of chosen tokens close to the initial model's (paper §5.1).

For layer l and regularized positions T the penalty is the mean squared relative drift
``L_K(l) = mean_{t in T} ||k_t - k_t^init||^2 / ||k_t^init||^2`` (the norm over the whole ``k_proj`` output, all KV
heads together), the same ``L_V(l)`` for values, and ``L_KV = mean_l (L_K(l) + L_V(l))``; the loss adds
``weight * L_KV`` through the optional schedule (e.g. ``Hinge``: ``max(weight * L_KV - threshold, 0)``).
``piggy_lightning.drift.kv_drift`` holds that arithmetic for every variant:

* ``PrefixKVDrift`` / ``PerRowPrefixKVDrift`` (``prefix_kv.py``, the TReFT default): the prefix reference is
  query-independent and computed once;
* :class:`KVDrift`: query-dependent positions (query, postfix, prompt, ...) against a reference forward of each batch;
* :class:`SharedReferenceKVDrift`: the release's postfix approximation, one reference taken from a single example.

``source`` picks what "keys and values" means: ``kv`` (the default) records the real ``k_proj``/``v_proj`` outputs
(after the input norm, before RoPE; the paper's wording, and what the patching code replaces); ``kv_normed`` takes
the keys after the per-head ``k_norm`` of Qwen3-style attention, i.e. what actually enters RoPE and the cache (on
Qwen3 a finetuned ``k_norm`` can move the cached keys while ``k_proj`` stays put; models without ``k_norm`` raise);
``hidden`` applies ``k_proj``/``v_proj`` to the pre-norm residual stream ``hidden_states[l]`` as the released
training code does. ``kv`` stays the default because it is the paper's definition and exists on every model.
Whatever the source, the module hands these regularizers records whose ``keys``/``values`` are that source's
(``drift.record_needs``), so they only select positions and never touch a network.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from piggy_lightning.drift import KVSource, Pick, RecordNeed, kv_drift, record_needs, select_kv
from piggy_lightning.forward import ForwardRecord, Span
from piggy_lightning.regularizer import Regularizer, RegularizerContext, WeightSchedule
from piggy_lightning.sites import (
    Positions,
    batch_spans,
    pick_at,
    position_mask,
    require_positions,
    resolve_layers,
    span_of,
)


class _KVDriftBase(Regularizer):
    """Options shared by the TReFT penalties: layers and the key/value source.

    Args:
        weight: The regularization strength lambda.
        name: Metric name (``train/reg/<name>``).
        layers: Decoder layers to regularize (negative counts from the end); None means all layers.
        source: ``kv``: the real key/value projection outputs (paper); ``kv_normed``: keys after Qwen3's
            ``k_norm``; ``hidden``: ``k_proj``/``v_proj`` applied to the pre-norm residual stream, as the released
            training code does (for fidelity runs).
        schedule: How the weighted penalty enters the loss over training (hinge, window, warm-up); None: always.
    """

    def __init__(
        self,
        weight: float = 1.0,
        name: str | None = None,
        layers: list[int] | None = None,
        source: KVSource = "kv",
        schedule: WeightSchedule | None = None,
    ) -> None:
        super().__init__(weight, name, schedule)
        if source not in ("kv", "kv_normed", "hidden"):
            raise ValueError(f"source must be 'kv', 'kv_normed' or 'hidden', got {source!r}")
        self.layers, self.source = layers, source
        self._layer_ids: list[int] | None = None

    @property
    def needs(self) -> frozenset[RecordNeed]:
        return record_needs(self.source)

    def setup(self, context: RegularizerContext) -> None:
        self._layer_ids = resolve_layers(self.layers, context.n_layers)

    def _layers_of(self, record: ForwardRecord) -> list[int]:
        if self._layer_ids is None:  # used without setup (hand-made records in tests)
            self._layer_ids = resolve_layers(self.layers, len(record.keys) if record.keys is not None else 0)
        return self._layer_ids

    def _kv(self, record: ForwardRecord, pick: Pick) -> tuple[Tensor, Tensor]:
        """Keys and values ``(L, *S, D)`` of the regularized layers at ``pick``; the record holds the source's."""
        if record.keys is None:
            raise RuntimeError(f"regularizer {self.name!r}: the record holds no keys and values (needs {self.needs})")
        return select_kv(record, self._layers_of(record), "kv", pick)


class KVDrift(_KVDriftBase):
    """TReFT's key/value penalty at query-dependent positions: query, postfix or the whole prompt.

    Zhao et al. 2026 (arXiv 2606.06667), Sec. 5.1 and the Table 3 ablations "TReFT (query)" / "TReFT (all)"
    (``positions: prompt``), and Table 4 (postfix, Qwen3). The per-position drifts of all rows are pooled, against
    an exact reference forward of every batch that the module runs (prompt-only and head-free for prompt positions).

    Args:
        weight: The regularization strength lambda.
        name: Metric name; default ``kv_<positions>``.
        positions: Which tokens to regularize (see ``sites/positions.py``); ``prompt`` is the paper's "all".
        layers: Decoder layers to regularize (negative counts from the end); None means all layers.
        source: ``kv``: the real key/value projection outputs; ``kv_normed``: keys after Qwen3's ``k_norm``;
            ``hidden``: projections of the pre-norm residual stream, as in the released training code.
        schedule: How the weighted penalty enters the loss over training (hinge, window, warm-up); None: always.
    """

    def __init__(
        self,
        weight: float = 1.0,
        name: str | None = None,
        positions: Positions = "query",
        layers: list[int] | None = None,
        source: KVSource = "kv",
        schedule: WeightSchedule | None = None,
    ) -> None:
        super().__init__(weight, name or f"kv_{positions}", layers, source, schedule)
        self.positions = positions

    @property
    def needs_reference(self) -> bool:
        return True

    @property
    def reference_span(self) -> Span:
        return span_of(self.positions)

    def forward(self, batch: dict[str, Tensor], policy: ForwardRecord, reference: ForwardRecord | None) -> Tensor:
        if reference is None:
            raise RuntimeError(f"regularizer {self.name!r} needs the reference forward of the batch")
        mask = require_positions(position_mask(batch_spans(batch), self.positions), self.positions, self.name)  # (B, T)
        keys, values = self._kv(policy, pick_at(mask))  # (L, N, D)
        ref_keys, ref_values = self._kv(reference, pick_at(mask))  # the reference may cover the prompt only
        return kv_drift(keys, values, ref_keys, ref_values)


class SharedReferenceKVDrift(_KVDriftBase):
    """The release's postfix approximation of :class:`KVDrift`: one reference, from the first training example.

    The released code takes the reference keys and values of the span once, from the first row of the first
    training batch, and compares the last occurrence of the span in every row with it; no reference forward runs
    after that. A class of its own rather than a mode of :class:`KVDrift` because it needs the reference once, on
    one row the data picks, while ``KVDrift`` needs it on every batch: the module runs that one forward when
    :meth:`reference_rows` asks for row 0 (a validation batch, e.g. Lightning's sanity check, gets its row 0
    compared but does not pick the example). Each process of a multi-device run takes its own.

    Args:
        weight: The regularization strength lambda.
        name: Metric name; default ``kv_<positions>``.
        positions: ``postfix`` (the release's use) or ``prefix``: a span whose tokens every row shares.
        layers: Decoder layers to regularize (negative counts from the end); None means all layers.
        source: ``kv``: the real key/value projection outputs; ``kv_normed``: keys after Qwen3's ``k_norm``;
            ``hidden``: projections of the pre-norm residual stream, as in the released training code.
        schedule: How the weighted penalty enters the loss over training (hinge, window, warm-up); None: always.
    """

    def __init__(
        self,
        weight: float = 1.0,
        name: str | None = None,
        positions: Literal["prefix", "postfix"] = "postfix",
        layers: list[int] | None = None,
        source: KVSource = "kv",
        schedule: WeightSchedule | None = None,
    ) -> None:
        super().__init__(weight, name or f"kv_{positions}", layers, source, schedule)
        if positions not in ("prefix", "postfix"):
            raise ValueError(f"a shared reference needs positions whose tokens every row shares, not {positions!r}")
        self.positions = positions
        self._span_len = 0  # tokens of one occurrence of the shared span (set up from the template)
        # shared reference, taken at the first training step and never saved: (n,), (L, n, D), (L, n, D)
        self.register_buffer("shared_ids", None, persistent=False)
        self.register_buffer("ref_keys", None, persistent=False)
        self.register_buffer("ref_values", None, persistent=False)

    @property
    def reference_span(self) -> Span:
        return "prompt"

    @property
    def keeps_reference(self) -> bool:
        return True  # the example is taken at the first training step

    def setup(self, context: RegularizerContext) -> None:
        super().setup(context)
        anatomy = context.spans.anatomy
        self._span_len = len(anatomy.prefix_ids if self.positions == "prefix" else anatomy.postfix_ids)
        if self._span_len == 0:
            raise ValueError(f"regularizer {self.name!r}: the chat template has an empty {self.positions}")

    def reference_rows(self, batch: dict[str, Tensor]) -> Tensor | None:
        """Row 0 until the shared reference is taken; then nothing."""
        if self.ref_keys is not None:
            return None
        return torch.zeros(1, dtype=torch.long, device=batch["input_ids"].device)

    def forward(self, batch: dict[str, Tensor], policy: ForwardRecord, reference: ForwardRecord | None) -> Tensor:
        mask = require_positions(position_mask(batch_spans(batch), self.positions), self.positions, self.name)  # (B, T)
        n, rows = self._span_len or int(mask[0].sum()), mask.size(0)
        if bool((mask.sum(1) < n).any()):
            raise ValueError(f"regularizer {self.name!r}: a row has fewer than {n} {self.positions} tokens")
        # the last n selected positions of each row (the release takes the last occurrence of the postfix)
        last = mask & (mask.flip(1).cumsum(1).flip(1) <= n)  # (B, T)
        shared_ids, ref_keys, ref_values = self._shared_reference(batch, last, reference)  # (n,), (L, n, D) x 2
        if not torch.equal(batch["input_ids"][last].view(rows, n), shared_ids.expand(rows, n)):
            raise ValueError(
                f"regularizer {self.name!r}: every row must end its {self.positions} with the same {n} tokens as "
                "the example the shared reference was taken from; use KVDrift (a reference forward of every batch)"
            )
        keys, values = self._kv(policy, pick_at(last))  # (L, B*n, D)
        return kv_drift(keys, values, ref_keys.repeat(1, rows, 1), ref_values.repeat(1, rows, 1))

    def _shared_reference(
        self, batch: dict[str, Tensor], last: Tensor, reference: ForwardRecord | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The shared reference: cached, or read from the reference record of row 0 (stored in training only)."""
        if self.ref_keys is not None:
            return self.shared_ids, self.ref_keys, self.ref_values
        if reference is None:
            raise RuntimeError(f"regularizer {self.name!r} needs the reference forward of row 0 at its first step")
        keys, values = self._kv(reference, pick_at(last[:1]))  # (L, n, D)
        shared = batch["input_ids"][0][last[0]], keys.float(), values.float()
        if self.training:  # a validation batch (e.g. Lightning's sanity check) does not pick the example
            self.shared_ids, self.ref_keys, self.ref_values = shared
        return shared
