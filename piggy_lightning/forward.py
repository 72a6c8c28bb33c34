"""The forward-pass contract of the core: what a forward records and how it is run.

:class:`ForwardRecord` is what every consumer of a training forward reads (the cross-entropy, the regularizers, the
drift monitor); :data:`Need` names what a consumer asks the forward to record. :func:`run_forward` is the one
place that turns needs into hooks and ``transformers`` arguments. Nothing here knows about regularizers,
interventions or callbacks: they depend on this module, never the reverse.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from piggy_lightning.sites import record_kv

Need = Literal["hidden_states", "kv", "kv_normed"]
Span = Literal["prompt", "response", "all"]  # which part of each row a forward must cover


@dataclass
class ForwardRecord:
    """What one forward pass of the policy (or the reference) recorded.

    Attributes:
        logits: ``(B, T, V)`` next-token logits, or ``(N, V)`` at the N positions of ``logits_mask`` (none at
            all in a head-free reference forward).
        hidden_states: ``L + 1`` tensors ``(B, T, H)``: the embeddings and each block's output (HF convention),
            or None when nobody asked for them.
        keys: Per layer ``(B, T, D_kv)`` key projection outputs (pre-RoPE; after the per-head ``k_norm`` when
            ``kv_normed`` was recorded), or None when not requested.
        values: Per layer ``(B, T, D_kv)`` value projection outputs, or None when not requested.
        logits_mask: ``(B, T)`` positions the logits rows belong to; None: all positions.
    """

    logits: Tensor
    hidden_states: tuple[Tensor, ...] | None = None
    keys: list[Tensor] | None = None
    values: list[Tensor] | None = None
    logits_mask: Tensor | None = None

    def logits_at(self, mask: Tensor) -> Tensor:
        """``(N, V)`` logits at the positions of the ``(B, T)`` boolean ``mask`` (a subset of ``logits_mask``)."""
        if self.logits_mask is None:
            return self.logits[mask]
        if bool((mask & ~self.logits_mask).any()):
            raise RuntimeError("the forward computed no logits at some requested positions (see `logits_span`)")
        return self.logits[mask[self.logits_mask]]


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


def run_forward(
    model: nn.Module, batch: dict[str, Tensor], needs: frozenset[Need], logits_mask: Tensor | None = None
) -> ForwardRecord:
    """One causal-LM forward that records what ``needs`` asks for.

    Args:
        model: The causal LM (peft-wrapped or not).
        batch: Holds ``input_ids`` and ``attention_mask``, both ``(B, T)``.
        needs: ``hidden_states`` and/or ``kv`` (key/value projection outputs of every layer) or ``kv_normed`` (the
            same with keys after Qwen3's ``k_norm``).
        logits_mask: ``(B, T)`` boolean positions whose logits to compute (transformers' ``logits_to_keep``), so
            the LM head and the ``(B, T, V)`` tensor are never formed where nobody reads them; all False means no
            head at all. None computes the logits everywhere.
    """
    if {"kv", "kv_normed"} <= needs:
        raise ValueError("one forward records keys either before or after k_norm: consumers disagree on `source`")
    kv = record_kv(model, "kv_normed" in needs) if needs & {"kv", "kv_normed"} else nullcontext((None, None))
    extra = {"logits_to_keep": logits_mask.bool()} if logits_mask is not None else {}
    with kv as (keys, values):
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states="hidden_states" in needs,
            use_cache=False,
            **extra,
        )
    return ForwardRecord(
        logits=out.logits,  # (B, T, V), or (N, V) at the N positions of logits_mask
        hidden_states=out.hidden_states if "hidden_states" in needs else None,
        keys=list(keys) if keys is not None else None,
        values=list(values) if values is not None else None,
        logits_mask=logits_mask.bool() if logits_mask is not None else None,
    )
