"""LDIFS-style feature distance: keep residual-stream states close to the reference's.

The penalty is the squared L2 distance between policy and reference hidden states divided by the hidden size
(a per-dimension mean squared error), averaged over the chosen positions and then over the chosen layers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from piggy_lightning.drift import RecordNeed
from piggy_lightning.forward import ForwardRecord, Span
from piggy_lightning.regularizer import Regularizer, WeightSchedule
from piggy_lightning.sites import (
    Positions,
    batch_spans,
    pick_at,
    position_mask,
    require_positions,
    resolve_layers,
    span_of,
)


def hidden_distance(states: Tensor, ref_states: Tensor) -> Tensor:
    """``mean_l mean_n ||h - h_ref||^2 / H`` for ``(L, N, H)`` inputs, in float32."""
    return (states.float() - ref_states.float()).pow(2).mean(-1).mean(-1).mean()


class HiddenStateDrift(Regularizer):
    """Penalise the distance of residual-stream states from the frozen reference's (feature-space regularization).

    Mukhoti et al. 2024, "Fine-tuning can cripple your foundation model; preserving features may be the
    solution" (LDIFS, TMLR), as applied against emergent misalignment by Kaczér et al. 2025, "In-training
    defenses against emergent misalignment" (the paper's related-work baselines). Needs a reference forward on
    every batch.

    Args:
        weight: The regularization strength lambda.
        name: Metric name; default ``hidden``.
        positions: Which tokens to compare (see ``sites/positions.py``).
        layers: Indices into the ``L + 1`` hidden states that transformers returns: 0 is the embeddings, i in
            1..L-1 the raw output of block i - 1, and L the *final-normed* output of the last block (transformers
            applies the final norm before storing it; the last block's raw output is not among them). None means
            1..L: every block's output, the last one after the final norm, as ``output_hidden_states`` gives them.
        schedule: How the weighted penalty enters the loss over training (hinge, window, warm-up); None: always.
    """

    default_name = "hidden"

    def __init__(
        self,
        weight: float = 1.0,
        name: str | None = None,
        positions: Positions = "all",
        layers: list[int] | None = None,
        schedule: WeightSchedule | None = None,
    ) -> None:
        super().__init__(weight, name, schedule)
        self.positions, self.layers = positions, layers

    @property
    def needs(self) -> frozenset[RecordNeed]:
        return frozenset({"hidden_states"})

    @property
    def needs_reference(self) -> bool:
        return True

    @property
    def reference_span(self) -> Span:
        return span_of(self.positions)

    def forward(self, batch: dict[str, Tensor], policy: ForwardRecord, reference: ForwardRecord | None) -> Tensor:
        if reference is None or policy.hidden_states is None or reference.hidden_states is None:
            raise RuntimeError(f"regularizer {self.name!r} needs policy and reference hidden states")
        n_states = len(policy.hidden_states)
        layers = resolve_layers(self.layers, n_states) if self.layers is not None else list(range(1, n_states))
        mask = require_positions(position_mask(batch_spans(batch), self.positions), self.positions, self.name)  # (B, T)
        states = torch.stack([policy.hidden_states[i][mask] for i in layers])  # (L, N, H)
        pick = pick_at(mask)  # the reference may cover the prompt only
        ref_states = torch.stack([pick(reference.hidden_states[i]) for i in layers])  # (L, N, H)
        return hidden_distance(states, ref_states)
