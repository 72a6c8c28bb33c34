"""The training forwards of :class:`~piggy_lightning.module.PiggyModule`, each computing only what is read.

Two costs dominate a regularized step besides the policy's own forward: the ``(B, T, V)`` logits (the LM head and
their float copy for the loss) and the reference forward. The cross-entropy reads logits only where labels exist,
so the policy computes them there (transformers' ``logits_to_keep``) unless a regularizer reads more
(``Regularizer.logits_span``). The reference runs only if a regularizer needs it on the batch, head-free unless
its logits are read, and on the prompt only when every such regularizer looks at prompt positions
(``Regularizer.reference_span``): by causality the prompt's keys, values and states do not see the response.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from piggy_lightning.forward import ForwardRecord, run_forward
from piggy_lightning.reference import Reference
from piggy_lightning.regularizer import Regularizer
from piggy_lightning.sites import batch_spans, position_mask


def response_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100.

    Only the labelled rows are upcast to float32, not the whole ``(B, T-1, V)``.

    Args:
        logits: ``(B, T, V)`` logits; position t predicts token t + 1.
        labels: ``(B, T)`` token ids, -100 where no loss is taken.
    """
    mask = response_logits_mask(labels)  # (B, T)
    return record_cross_entropy(ForwardRecord(logits=logits), labels, mask)


def response_logits_mask(labels: Tensor) -> Tensor:
    """``(B, T)`` positions whose *next* token carries a label: the only logits the cross-entropy reads."""
    mask = torch.zeros_like(labels, dtype=torch.bool)  # (B, T)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


def record_cross_entropy(record: ForwardRecord, labels: Tensor, mask: Tensor | None = None) -> Tensor:
    """The response cross-entropy from a forward whose logits cover (at least) the labelled positions.

    Args:
        record: The policy forward; full ``(B, T, V)`` logits or ``(N, V)`` rows at ``record.logits_mask``.
        labels: ``(B, T)`` token ids, -100 where no loss is taken.
        mask: :func:`response_logits_mask` of ``labels``, when already at hand.
    """
    mask = response_logits_mask(labels) if mask is None else mask  # (B, T)
    targets = labels[:, 1:][mask[:, :-1]]  # (N,)
    return F.cross_entropy(record.logits_at(mask).float(), targets)  # (N, V) upcast only


def prompt_batch(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``batch`` truncated after the last prompt token of its longest prompt: ``(B, T')`` with ``T' <= T``."""
    prompt = position_mask(batch_spans(batch), "prompt")  # (B, T)
    columns = torch.arange(prompt.size(1), device=prompt.device)
    width = max(int((prompt * (columns + 1)).amax()), 1)  # last prompt position + 1, over all rows
    return {k: batch[k][:, :width] for k in ("input_ids", "attention_mask")}


def training_forwards(
    policy: nn.Module,
    reference: Reference | None,
    regularizers: Sequence[Regularizer],
    batch: dict[str, Tensor],
) -> tuple[ForwardRecord, ForwardRecord | None]:
    """The policy forward and, if a regularizer needs it, the reference forward of ``batch``.

    Returns:
        The policy record (logits at the response positions, or everywhere when a regularizer reads
        ``logits_span: all``) and the reference record (None when no regularizer needs one; covering the prompt
        only, and head-free, when that is all its regularizers read).
    """
    needs = frozenset().union(*(r.needs for r in regularizers))
    spans = {r.logits_span for r in regularizers} - {None}
    logits_mask = None if "all" in spans else response_logits_mask(batch["labels"])  # (B, T) or everywhere
    policy_out = run_forward(policy, batch, needs, logits_mask)
    live = [r for r in regularizers if r.needs_reference]
    if not live:
        return policy_out, None
    if reference is None:
        raise RuntimeError(f"regularizers {[r.name for r in live]} need the reference, but the module has none")
    if any(r.logits_span is not None for r in live):  # KL: the reference's logits where the policy's are read
        return policy_out, reference.forward(batch, needs, logits_mask)
    sub = prompt_batch(batch) if all(r.reference_span == "prompt" for r in live) else batch
    no_logits = torch.zeros_like(sub["attention_mask"], dtype=torch.bool)  # (B, T'): head-free
    return policy_out, reference.forward(sub, needs, no_logits)
