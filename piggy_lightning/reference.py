"""The frozen reference model: the policy as it was before finetuning.

Invariants (checked in tests):

* it is never the policy object itself and never enters the optimizer;
* its parameters have ``requires_grad=False`` and it runs in eval mode (no dropout) under ``torch.no_grad``;
* it is not saved in checkpoints: it is rebuilt from its source.

With LoRA the reference is the policy run with its adapters disabled (peft's ``disable_adapter``): it costs no
memory, and because LoRA's B matrices start at zero it equals the initial model exactly. With full finetuning it
is a frozen deep copy taken before the first optimizer step (``copy``) when something needs it live during the
run; otherwise no copy is held (``initial``): until :meth:`Reference.seal` the untrained policy itself serves as
the reference (fixed quantities such as TReFT's prefix keys and values are computed then, through
:meth:`Reference.forward`), and afterwards a frozen model is rebuilt from the source weights on first use.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from piggy_lightning.forward import ForwardRecord, Need, eval_mode, run_forward


def _frozen(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


class Reference:
    """Gives frozen forwards of the initial policy.

    Args:
        policy: The trainable policy (peft-wrapped when ``adapters_off``).
        kind: ``adapters_off`` to run the policy with its LoRA adapters disabled, ``copy`` for a frozen deep copy,
            ``initial`` to hold no copy: the untrained policy itself until :meth:`seal`, then ``rebuild()``.
        rebuild: Builds the initial model again from its source (``initial`` only); None means it cannot be
            rebuilt, and using the reference after :meth:`seal` raises.
    """

    def __init__(self, policy: nn.Module, kind: str, rebuild: Callable[[], nn.Module] | None = None) -> None:
        if kind not in ("adapters_off", "copy", "initial"):
            raise ValueError(f"unknown reference kind {kind!r}")
        self.kind = kind
        self._policy = policy
        self._rebuild = rebuild
        self._sealed = False
        self.model: nn.Module | None = None
        if kind == "copy":
            self.model = _frozen(copy.deepcopy(policy))

    def seal(self) -> None:
        """Mark the policy as about to train: an ``initial`` reference stops borrowing the policy from here on."""
        self._sealed = True

    def _initial_model(self) -> nn.Module:
        """The frozen initial model of an ``initial`` reference after :meth:`seal`, rebuilt on first use."""
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
        """The network in reference mode: eval, no grad, adapters disabled (or the frozen copy)."""
        if self.kind == "copy" or (self.kind == "initial" and self._sealed):
            model = self.model if self.kind == "copy" else self._initial_model()
            with torch.no_grad():
                yield model
            return
        if self.kind == "initial":  # the policy has not trained yet: it is the initial model
            with torch.no_grad(), eval_mode(self._policy):
                yield self._policy
            return
        with torch.no_grad(), self._policy.disable_adapter(), eval_mode(self._policy):
            yield self._policy

    def forward(
        self, batch: dict[str, Tensor], needs: frozenset[Need] = frozenset(), logits_mask: Tensor | None = None
    ) -> ForwardRecord:
        """A reference forward on ``batch`` recording ``needs``; nothing it returns carries gradients.

        ``logits_mask`` is as in :func:`run_forward` (all False: no LM head, for the key/value penalties).
        """
        with self.active() as model:
            return run_forward(model, batch, needs, logits_mask)
