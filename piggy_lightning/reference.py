"""The frozen reference model: the policy as it was before finetuning.

Invariants (checked in tests):

* it is never the policy object itself and never enters the optimizer;
* its parameters have ``requires_grad=False`` and it runs in eval mode (no dropout) under ``torch.no_grad``;
* it is not saved in checkpoints: it is rebuilt from its source.

Three kinds, each a class; the module picks one in ``configure_model``:

* :class:`AdaptersOffReference` (LoRA): the policy run with its adapters disabled (peft's ``disable_adapter``). It
  costs no memory, and because LoRA's B matrices start at zero it equals the initial model exactly.
* :class:`FrozenCopyReference` (full finetuning, when something uses the reference during the run: a regularizer
  that ``keeps_reference`` or a callback that declares ``needs_reference``): a frozen deep copy taken before the
  first optimizer step (under sharding, the model loaded and sharded again from its source).
* :class:`InitialReference` (full finetuning otherwise): no copy is held. Until :meth:`Reference.seal` the
  untrained policy itself serves as the reference (fixed quantities such as TReFT's prefix keys and values are
  computed then, through :meth:`Reference.forward`), and afterwards a frozen model is rebuilt from the source
  weights on first use (under sharding a collective: every rank must use it then, as every sharded forward).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from piggy_lightning.drift import RecordNeed, forward_needs, hidden_kv_view
from piggy_lightning.forward import ForwardRecord, eval_mode, run_forward


def _frozen(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


class Reference(ABC):
    """Gives frozen forwards of the initial policy.

    Attributes:
        model: The frozen network this reference holds (a copy or a rebuild), or None when it borrows the policy.
    """

    model: nn.Module | None = None

    def seal(self) -> None:  # noqa: B027 - only InitialReference changes at the first step
        """Mark the policy as about to train (called once the regularizers are set up)."""

    @abstractmethod
    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        """The network in reference mode: eval, no grad, and the initial weights."""

    def forward(
        self, batch: dict[str, Tensor], needs: frozenset[RecordNeed] = frozenset(), logits_mask: Tensor | None = None
    ) -> ForwardRecord:
        """A reference forward on ``batch`` recording ``needs``; nothing it returns carries gradients.

        ``logits_mask`` is as in :func:`~piggy_lightning.forward.run_forward` (all False: no LM head, for the
        key/value penalties). With ``kv_hidden`` the record's ``keys``/``values`` are the reference's projections
        of its residual stream (:func:`~piggy_lightning.drift.hidden_kv_view`); one record cannot also hold the
        real projections, so ask for ``kv`` records separately and use :meth:`hidden_kv` on them.
        """
        if "kv_hidden" in needs and needs & {"kv", "kv_normed"}:
            raise ValueError("one record holds keys either of the projections or of the residual stream")
        with self.active() as model:
            record = run_forward(model, batch, forward_needs(needs), logits_mask)
            return hidden_kv_view(model, record) if "kv_hidden" in needs else record

    def hidden_kv(self, record: ForwardRecord, width: int | None = None) -> ForwardRecord:
        """:func:`~piggy_lightning.drift.hidden_kv_view` of a reference record, with the reference's projections."""
        with self.active() as model:
            return hidden_kv_view(model, record, width)


class AdaptersOffReference(Reference):
    """The LoRA policy with its adapters disabled: the base model, at no extra memory.

    Args:
        policy: The peft-wrapped trainable policy.
    """

    def __init__(self, policy: nn.Module) -> None:
        if not hasattr(policy, "disable_adapter"):
            raise TypeError(f"{type(policy).__name__} has no peft adapters to disable; use FrozenCopyReference")
        self._policy = policy

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        with torch.no_grad(), self._policy.disable_adapter(), eval_mode(self._policy):
            yield self._policy


class FrozenCopyReference(Reference):
    """A frozen copy of the policy, taken now (before the first optimizer step).

    Args:
        policy: The trainable policy, still at its initial weights.
        build: Builds the initial model anew from its source instead of copying ``policy``: a sharded policy
            (``piggy_lightning/fsdp.py``) is not deep-copied, since the copy would share its FSDP state; its
            reference is loaded and sharded on its own. None deep-copies ``policy``.
    """

    def __init__(self, policy: nn.Module, build: Callable[[], nn.Module] | None = None) -> None:
        self.model = _frozen(copy.deepcopy(policy) if build is None else build())

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        with torch.no_grad():
            yield self.model


class InitialReference(Reference):
    """No copy: the untrained policy serves until :meth:`seal`, then a frozen model rebuilt from the source.

    Args:
        policy: The trainable policy, still at its initial weights.
        rebuild: Builds the initial model again from its source; None means it cannot be rebuilt (e.g. random
            initial weights), and using the reference after :meth:`seal` raises.
    """

    def __init__(self, policy: nn.Module, rebuild: Callable[[], nn.Module] | None = None) -> None:
        self._policy = policy
        self._rebuild = rebuild
        self._sealed = False

    def seal(self) -> None:
        """The policy is about to train: stop borrowing it from here on."""
        self._sealed = True

    def _initial_model(self) -> nn.Module:
        """The frozen initial model after :meth:`seal`, rebuilt on first use."""
        if self.model is None:
            if self._rebuild is None:
                raise RuntimeError(
                    "the reference was not kept: under full finetuning a frozen copy is held only when a regularizer "
                    "or a callback declares `needs_reference`, and these initial weights cannot be rebuilt from "
                    "their source (init: random); declare it on the callback that uses the reference"
                )
            like = next(self._policy.parameters())
            model = self._rebuild().to(like.device)
            self.model = _frozen(model.to(like.dtype) if like.is_floating_point() else model)
        return self.model

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        if self._sealed:
            with torch.no_grad():
                yield self._initial_model()
            return
        with torch.no_grad(), eval_mode(self._policy):  # the policy has not trained yet: it is the initial model
            yield self._policy
