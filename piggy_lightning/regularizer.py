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
from typing import TYPE_CHECKING

from torch import Tensor, nn

from piggy_lightning.forward import ForwardRecord, Need, Span

if TYPE_CHECKING:
    from piggy_lightning.module import PiggyModule


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
