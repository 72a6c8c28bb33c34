"""The regularizer interface: ``loss = CE + sum_i schedule_i(weight_i * penalty_i)``.

A regularizer is a small ``nn.Module`` chosen by class path in ``model.regularizers``. It is *pure*: it holds no
network and runs no forward. It declares what it needs and the module fulfils every forward
(``piggy_lightning.losses``):

* records of the policy forward on the training batch (:attr:`Regularizer.needs`, :attr:`Regularizer.logits_span`);
* the reference forward of the training batch on every step (:attr:`Regularizer.needs_reference`,
  :attr:`Regularizer.reference_span`), or of some of its rows on some steps (:meth:`Regularizer.reference_rows`);
* a query-independent reference computed once, right after :meth:`Regularizer.setup`
  (:meth:`Regularizer.reference_once`, delivered to :meth:`Regularizer.setup_reference`), e.g. TReFT's prefix;
* a batch of its own in place of the training batch (:meth:`Regularizer.inputs`, e.g. a retain set).

:meth:`Regularizer.setup` receives a :class:`RegularizerContext` (the template, tokenizer, layer count and the data
module's encoder), never the LightningModule. :meth:`Regularizer.forward` maps a batch plus the recorded forwards to
an *unweighted* scalar; :meth:`Regularizer.weighted` applies the weight and the optional :class:`WeightSchedule`
(hinge, active window, warm-up), and the module logs ``train/reg/<name>`` (weighted) and ``train/reg_raw/<name>``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from piggy_lightning.drift import RecordNeed
from piggy_lightning.forward import ForwardRecord, Span
from piggy_lightning.spans import ChatSpans, TokenizedChat

Encode = Callable[[str], Sequence[TokenizedChat]]  # a data source -> its rows, processed like the training data


@dataclass(frozen=True)
class RegularizerContext:
    """What a regularizer may read in :meth:`Regularizer.setup`: facts about the run, never its networks.

    The policy and the reference are left out on purpose: a regularizer that held them could run forwards the
    module never sees (costs nobody accounts for, forwards outside the reference's invariants); it declares its
    forwards instead and the module runs them.

    Attributes:
        spans: The chat template's spans (``spans.anatomy.prefix_ids``, ``postfix_ids``, ``tokenize``).
        tokenizer: The policy's tokenizer (``pad_token_id`` for batching).
        n_layers: Decoder layers of the policy.
        device: Device of the policy's parameters, for tensors a regularizer caches.
        encode: The data module's encoder (``ChatSFTDataModule.encode``): reads, validates, templates, tokenizes
            and truncates a chat source exactly as the training rows are; None when the run has no such data module.
    """

    spans: ChatSpans
    tokenizer: Any
    n_layers: int
    device: torch.device
    encode: Encode | None = None


# -- weight schedules -------------------------------------------------------------------------------------------
class WeightSchedule(ABC):
    """How the weighted penalty ``weight * raw`` enters the loss over training (``progress`` in ``[0, 1]``)."""

    @abstractmethod
    def __call__(self, weighted: Tensor, progress: float) -> Tensor:
        """Return what the loss adds, given ``weighted = weight * raw`` at the fraction ``progress`` of the fit."""


class Hinge(WeightSchedule):
    """``max(weight * raw - threshold, 0)``: only drift beyond a tolerance is penalised.

    Args:
        threshold: The tolerance subtracted from the weighted penalty (>= 0); the release configs use 0.
    """

    def __init__(self, threshold: float) -> None:
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        self.threshold = float(threshold)

    def __call__(self, weighted: Tensor, progress: float) -> Tensor:
        return (weighted - self.threshold).clamp_min(0.0)


class ActiveWindow(WeightSchedule):
    """The penalty counts only from ``start`` to ``end`` (fractions of the fit's optimizer steps), 0 outside.

    Args:
        start: Fraction of training after which the penalty switches on.
        end: Fraction after which it switches off; 1 keeps it on until the end (the last step included).
    """

    def __init__(self, start: float = 0.0, end: float = 1.0) -> None:
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"need 0 <= start < end <= 1, got {start}, {end}")
        self.start, self.end = float(start), float(end)

    def __call__(self, weighted: Tensor, progress: float) -> Tensor:
        if progress < self.start or (progress >= self.end and self.end < 1.0):
            return weighted.new_zeros(())
        return weighted


class LinearWarmup(WeightSchedule):
    """The weight ramps linearly from 0 at ``start`` to its full value at ``end``: ``clamp((p - s) / (e - s), 0, 1)``.

    Args:
        end: Fraction of training at which the full weight is reached.
        start: Fraction of training before which the weight is 0.
    """

    def __init__(self, end: float, start: float = 0.0) -> None:
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"need 0 <= start < end <= 1, got {start}, {end}")
        self.start, self.end = float(start), float(end)

    def __call__(self, weighted: Tensor, progress: float) -> Tensor:
        return weighted * min(1.0, max(0.0, (progress - self.start) / (self.end - self.start)))


class ScheduleChain(WeightSchedule):
    """Several schedules applied in order, e.g. ``[LinearWarmup, Hinge]`` is ``max(ramp * weight * raw - t, 0)``.

    Args:
        schedules: The schedules, first applied first.
    """

    def __init__(self, schedules: list[WeightSchedule]) -> None:
        if not schedules:
            raise ValueError("a ScheduleChain needs at least one schedule")
        self.schedules = list(schedules)

    def __call__(self, weighted: Tensor, progress: float) -> Tensor:
        for schedule in self.schedules:
            weighted = schedule(weighted, progress)
        return weighted


# -- the regularizer ------------------------------------------------------------------------------------------------
class Regularizer(nn.Module, ABC):
    """Base class of every penalty added to the cross-entropy.

    Args:
        weight: The multiplier lambda of the penalty; 0 still computes and logs the raw value.
        name: Short name used in metric keys (``train/reg/<name>``); defaults to the class's ``default_name``.
        schedule: How the weighted penalty enters the loss over training (hinge, active window, warm-up); None adds
            ``weight * raw`` at every step.
    """

    default_name = "reg"

    def __init__(self, weight: float = 1.0, name: str | None = None, schedule: WeightSchedule | None = None) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"regularizer weight must be >= 0, got {weight}")
        self.weight = float(weight)
        self.name = name or self.default_name
        self.schedule = schedule

    @property
    def needs(self) -> frozenset[RecordNeed]:
        """What the policy forward (and any reference forward this regularizer gets) must record."""
        return frozenset()

    @property
    def needs_reference(self) -> bool:
        """Whether :meth:`forward` needs the reference forward of the whole batch on every step (costly)."""
        return False

    @property
    def reference_span(self) -> Span:
        """Which positions of each row this regularizer reads; the module runs the reference on no more.

        ``prompt``: by causality, values at prompt positions depend only on the prompt, so a reference forward runs
        on the batch truncated after its longest prompt. ``all``: the whole rows.
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
        frozen copy; regularizers that only read it through :meth:`reference_once` return False."""
        return self.needs_reference

    def setup(self, context: RegularizerContext) -> None:  # noqa: B027 - optional hook
        """Called once after the policy and reference exist, before any step; read the template or data here."""

    def reference_once(self) -> dict[str, Tensor] | None:
        """A query-independent batch whose reference forward the module runs once, right after :meth:`setup`.

        It runs while the untrained policy can still serve as the reference (so full finetuning needs no copy for
        it), head-free, recording :attr:`needs`; the record goes to :meth:`setup_reference`. None: nothing.
        """
        return None

    def setup_reference(self, record: ForwardRecord) -> None:  # noqa: B027 - optional hook
        """Receive the reference record of :meth:`reference_once`'s batch (no gradients)."""

    def inputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """The batch this penalty is computed on this step when it is not the training ``batch``; None: ``batch``.

        The module calls it once per step, before any other per-step hook, and runs the policy (and any reference
        forward the regularizer asks for) on the returned batch; :meth:`forward` then receives it as ``batch``.
        """
        return None

    def reference_rows(self, batch: dict[str, Tensor]) -> Tensor | None:
        """``(b,)`` row indices of ``batch`` whose reference forward this step needs; None: none.

        For needs that depend on the batch (rows with their own system prompt, an example taken once, reference
        logits not cached yet); asked only when :attr:`needs_reference` is False. The module runs the reference on
        those rows only (prompt-only and head-free when :attr:`reference_span` and :attr:`logits_span` allow) and
        passes that record, of the ``b`` rows, as ``reference``.
        """
        return None

    def kv_columns(self, batch: dict[str, Tensor]) -> int | None:
        """How many leading positions of each row :meth:`forward` reads the policy's keys and values at; None: unknown.

        Bounds the work of the ``kv_hidden`` need: the module projects the policy's residual stream at those
        positions only (at the prompt's when this is None and :attr:`reference_span` is ``prompt``).
        """
        return None

    @abstractmethod
    def forward(self, batch: dict[str, Tensor], policy: ForwardRecord, reference: ForwardRecord | None) -> Tensor:
        """Return the unweighted scalar penalty for this batch.

        Args:
            batch: The training batch, or the batch of :meth:`inputs`.
            policy: The policy forward of ``batch`` (with gradients).
            reference: The reference forward this regularizer asked for on this step (of the whole batch, or of
                the rows of :meth:`reference_rows`), or None.
        """

    def weighted(self, raw: Tensor, progress: float) -> Tensor:
        """``weight * raw`` through the schedule. ``progress`` is the fraction of training steps done, in ``[0, 1]``."""
        weighted = raw * self.weight
        return self.schedule(weighted, progress) if self.schedule is not None else weighted
