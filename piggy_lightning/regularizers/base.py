"""The regularizer interface: ``loss = CE + sum_i weight_i * penalty_i``.

A regularizer is a small ``nn.Module`` chosen by class path in ``model.regularizers``. It declares what it needs
from the forward passes (:attr:`Regularizer.needs`, :attr:`Regularizer.needs_reference`), may precompute fixed
quantities once the policy exists (:meth:`Regularizer.setup`, e.g. TReFT's query-independent prefix keys and
values), and maps a batch plus the recorded forwards to an *unweighted* scalar. The module applies the weight
through :meth:`Regularizer.weighted`, which subclasses may override (hinges, active windows), and logs both
``train/reg/<name>`` (weighted) and ``train/reg_raw/<name>`` (unweighted).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from torch import Tensor, nn

if TYPE_CHECKING:
    from piggy_lightning.module import PiggyModule

Need = Literal["hidden_states", "kv", "kv_normed"]
Span = Literal["prompt", "response", "all"]  # which part of each row a forward must cover


@dataclass
class ForwardRecord:
    """What one forward pass of the policy (or the reference) recorded.

    Attributes:
        logits: ``(B, T, V)`` next-token logits, or ``(N, V)`` at the N positions of ``logits_mask`` (none at
            all in a head-free reference forward).
        hidden_states: ``L + 1`` tensors ``(B, T, H)``: the embeddings and each block's output (HF convention),
            or None when no regularizer asked for them.
        keys: Per layer ``(B, T, D_kv)`` key projection outputs (pre-RoPE; after the per-head ``k_norm`` when
            ``kv_normed`` was recorded), or None when not requested.
        values: Per layer ``(B, T, D_kv)`` value projection outputs, or None when not requested.
    """

    logits: Tensor
    hidden_states: tuple[Tensor, ...] | None = None
    keys: list[Tensor] | None = None
    values: list[Tensor] | None = None
    logits_mask: Tensor | None = None  # (B, T) positions the logits rows belong to; None: all positions

    def logits_at(self, mask: Tensor) -> Tensor:
        """``(N, V)`` logits at the positions of the ``(B, T)`` boolean ``mask`` (a subset of ``logits_mask``)."""
        if self.logits_mask is None:
            return self.logits[mask]
        if bool((mask & ~self.logits_mask).any()):
            raise RuntimeError("the forward computed no logits at some requested positions (see `logits_span`)")
        return self.logits[mask[self.logits_mask]]


class Regularizer(nn.Module, ABC):
    """Base class of every penalty added to the cross-entropy.

    Args:
        weight: The multiplier lambda of the penalty; 0 still computes and logs the raw value.
        name: Short name used in metric keys (``train/reg/<name>``); defaults to the class's ``default_name``.
    """

    default_name = "reg"

    def __init__(self, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"regularizer weight must be >= 0, got {weight}")
        self.weight = float(weight)
        self.name = name or self.default_name

    @property
    def needs(self) -> frozenset[Need]:
        """What the policy forward must record for :meth:`forward`."""
        return frozenset()

    @property
    def needs_reference(self) -> bool:
        """Whether :meth:`forward` needs a reference forward on the current batch (costly; avoid if possible)."""
        return False

    @property
    def reference_span(self) -> Span:
        """Which positions of each row the reference forward must cover; the module runs no more than that.

        ``prompt``: by causality, values at prompt positions depend only on the prompt, so the reference runs on
        the batch truncated after its longest prompt. ``all``: the whole rows.
        """
        return "all"

    @property
    def logits_span(self) -> Span | None:
        """Where :meth:`forward` reads ``logits`` of the policy and reference records; None: nowhere.

        Logits cost a ``(B, T, V)`` tensor; without a need the reference runs head-free and the policy computes
        them at the response positions only (for the cross-entropy).
        """
        return None

    @property
    def keeps_reference(self) -> bool:
        """Whether the reference is used after :meth:`setup` (during steps), so a full-finetuning run must hold a
        frozen copy; regularizers that only read the reference in :meth:`setup` return False."""
        return self.needs_reference

    def setup(self, module: PiggyModule) -> None:  # noqa: B027 - optional hook
        """Called once after the policy and reference exist; precompute fixed reference quantities here."""

    @abstractmethod
    def forward(self, batch: dict[str, Tensor], policy: ForwardRecord, reference: ForwardRecord | None) -> Tensor:
        """Return the unweighted scalar penalty for this batch."""

    def weighted(self, raw: Tensor, progress: float) -> Tensor:
        """Apply the weight. ``progress`` is the fraction of training steps done, in ``[0, 1]``."""
        return raw * self.weight
