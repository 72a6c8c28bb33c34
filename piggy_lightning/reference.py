"""The frozen reference model: the policy as it was before finetuning.

Invariants (checked in tests):

* it is never the policy object itself and never enters the optimizer;
* its parameters have ``requires_grad=False`` and it runs in eval mode (no dropout) under ``torch.no_grad``;
* it is not saved in checkpoints: it is rebuilt from its source.

With LoRA the reference is the policy run with its adapters disabled (peft's ``disable_adapter``): it costs no
memory, and because LoRA's B matrices start at zero it equals the initial model exactly. With full finetuning it
is a frozen deep copy taken before the first optimizer step. Fixed reference quantities (TReFT's prefix keys and
values) are computed once by the regularizers that need them, through :meth:`Reference.forward`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn

from piggy_lightning.regularizers.base import ForwardRecord, Need
from piggy_lightning.sites import record_kv


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode inside the context and restore every submodule's previous mode after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes.items():
            module.train(mode)


def run_forward(model: nn.Module, batch: dict[str, Tensor], needs: frozenset[Need]) -> ForwardRecord:
    """One causal-LM forward that records what ``needs`` asks for.

    Args:
        model: The causal LM (peft-wrapped or not).
        batch: Holds ``input_ids`` and ``attention_mask``, both ``(B, T)``.
        needs: ``hidden_states`` and/or ``kv`` (key/value projection outputs of every layer) or ``kv_normed`` (the
            same with keys after Qwen3's ``k_norm``).
    """
    if {"kv", "kv_normed"} <= needs:
        raise ValueError("one forward records keys either before or after k_norm: regularizers disagree on `source`")
    kv = record_kv(model, "kv_normed" in needs) if needs & {"kv", "kv_normed"} else nullcontext((None, None))
    with kv as (keys, values):
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states="hidden_states" in needs,
            use_cache=False,
        )
    return ForwardRecord(
        logits=out.logits,  # (B, T, V)
        hidden_states=out.hidden_states if "hidden_states" in needs else None,
        keys=list(keys) if keys is not None else None,
        values=list(values) if values is not None else None,
    )


class Reference:
    """Gives frozen forwards of the initial policy.

    Args:
        policy: The trainable policy (peft-wrapped when ``adapters_off``).
        kind: ``adapters_off`` to run the policy with its LoRA adapters disabled, ``copy`` for a frozen deep copy.
    """

    def __init__(self, policy: nn.Module, kind: str) -> None:
        if kind not in ("adapters_off", "copy"):
            raise ValueError(f"unknown reference kind {kind!r}")
        self.kind = kind
        self._policy = policy
        self.model: nn.Module | None = None
        if kind == "copy":
            self.model = copy.deepcopy(policy)
            self.model.requires_grad_(False)
            self.model.eval()

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        """The network in reference mode: eval, no grad, adapters disabled (or the frozen copy)."""
        if self.kind == "copy":
            with torch.no_grad():
                yield self.model
            return
        with torch.no_grad(), self._policy.disable_adapter(), eval_mode(self._policy):
            yield self._policy

    def forward(self, batch: dict[str, Tensor], needs: frozenset[Need] = frozenset()) -> ForwardRecord:
        """A reference forward on ``batch`` recording ``needs``; nothing it returns carries gradients."""
        with self.active() as model:
            return run_forward(model, batch, needs)
