"""The forwards of :class:`~piggy_lightning.module.PiggyModule`: every one a regularizer needs, and only what is read.

Regularizers run no forward themselves (``piggy_lightning.regularizer``): they declare needs and this module
fulfils them, so every forward's cost and every reference invariant is in one place.

Two costs dominate a regularized step besides the policy's own forward: the ``(B, T, V)`` logits (the LM head and
their float copy for the loss) and the reference forward. The cross-entropy reads logits only where labels exist,
so the policy computes them there (transformers' ``logits_to_keep``) unless a regularizer reads more
(``Regularizer.logits_span``; ``all`` means the attended positions). The reference runs on the whole batch only if
a regularizer needs it on every step, head-free unless its logits are read, and on the prompt only when every such
regularizer looks at prompt positions (``Regularizer.reference_span``): by causality the prompt's keys, values and
states do not see the response. Other reference forwards cover only the rows a regularizer asks for
(``Regularizer.reference_rows``), and a query-independent one runs once, at set-up (``Regularizer.reference_once``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from piggy_lightning.drift import RecordNeed, batch_rows, forward_needs, hidden_kv_view
from piggy_lightning.forward import ForwardRecord, Span, run_forward
from piggy_lightning.reference import Reference
from piggy_lightning.regularizer import Regularizer, RegularizerContext
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


def span_logits_mask(batch: dict[str, Tensor], span: Span | None) -> Tensor:
    """``(B, T)`` positions whose logits a reader of ``span`` needs: ``response`` (those predicting a response
    token), ``all`` (every attended position) or None (none: a head-free forward)."""
    if span == "all":
        return batch["attention_mask"].bool()
    if span == "response":
        return response_logits_mask(batch["labels"])
    return torch.zeros_like(batch["attention_mask"], dtype=torch.bool)


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


def prompt_width(batch: dict[str, Tensor]) -> int:
    """Columns up to the last prompt token of the longest prompt in ``batch`` (at least 1)."""
    prompt = position_mask(batch_spans(batch), "prompt")  # (B, T)
    columns = torch.arange(prompt.size(1), device=prompt.device)
    return max(int((prompt * (columns + 1)).amax()), 1)


def prompt_batch(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``batch`` truncated after the last prompt token of its longest prompt: ``(B, T')`` with ``T' <= T``."""
    width = prompt_width(batch)
    return {k: batch[k][:, :width] for k in ("input_ids", "attention_mask")}


def policy_record(
    policy: nn.Module, batch: dict[str, Tensor], needs: frozenset[RecordNeed], logits_mask: Tensor | None = None
) -> ForwardRecord:
    """One policy forward (with gradients) whose record holds what a regularizer with ``needs`` reads."""
    if "kv_hidden" in needs and needs & {"kv", "kv_normed"}:
        raise ValueError("one record holds keys either of the projections or of the residual stream")
    record = run_forward(policy, batch, forward_needs(needs), logits_mask)
    return hidden_kv_view(policy, record) if "kv_hidden" in needs else record


def training_forwards(
    policy: nn.Module,
    reference: Reference | None,
    regularizers: Sequence[Regularizer],
    batch: dict[str, Tensor],
) -> tuple[ForwardRecord, ForwardRecord | None]:
    """The policy forward of ``batch`` and, if a regularizer needs it on every step, the reference forward.

    Args:
        policy: The trainable policy.
        reference: The module's reference.
        regularizers: The regularizers computed on ``batch`` (not those with batches of their own).
        batch: The training batch.

    Returns:
        The policy record (logits at the response positions, or at every attended one when a regularizer reads
        ``logits_span: all``) and the shared reference record (None when no regularizer needs one; covering the
        prompt only, and head-free, when that is all its regularizers read). Both record every regularizer's
        forward needs; :func:`regularizer_inputs` turns them into each regularizer's view.
    """
    needs = forward_needs(frozenset().union(*(r.needs for r in regularizers)))
    spans = {r.logits_span for r in regularizers} - {None}
    logits_mask = span_logits_mask(batch, "all" if "all" in spans else "response")  # (B, T)
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


def _reference_of_rows(
    reference: Reference | None, reg: Regularizer, batch: dict[str, Tensor], rows: Tensor
) -> ForwardRecord:
    """The reference forward of ``rows`` of ``batch`` that ``reg`` asked for: prompt-only and head-free if it can."""
    if reference is None:
        raise RuntimeError(f"regularizer {reg.name!r} needs the reference, but the module has none")
    sub = batch_rows(batch, rows)  # (b, T)
    if reg.logits_span is None and reg.reference_span == "prompt":
        sub = {**sub, **prompt_batch(sub)}  # (b, T'), T' <= T
    return reference.forward(sub, reg.needs, span_logits_mask(sub, reg.logits_span))


@dataclass
class RegularizerInputs:
    """What one regularizer's :meth:`~piggy_lightning.regularizer.Regularizer.forward` receives on a step."""

    batch: dict[str, Tensor]
    policy: ForwardRecord
    reference: ForwardRecord | None


def regularizer_inputs(
    policy: nn.Module,
    reference: Reference | None,
    regularizers: Sequence[Regularizer],
    batch: dict[str, Tensor],
) -> tuple[ForwardRecord, list[RegularizerInputs]]:
    """Run every forward of one step: the policy's (shared with the cross-entropy) and each regularizer's needs.

    Returns:
        The policy record of the training batch (for the cross-entropy) and, per regularizer in order, its batch
        and records. A regularizer with a ``hidden`` key/value source gets a view whose keys and values are the
        projections of the residual stream (projected once per step, model and width, at the leading positions
        it reads: ``Regularizer.kv_columns``, or the prompt's).
    """
    own = [reg.inputs(batch) for reg in regularizers]  # once per step: a retain cycle moves on here
    on_train = [reg for reg, b in zip(regularizers, own, strict=True) if b is None]
    policy_out, shared = training_forwards(policy, reference, on_train, batch)
    views: dict[tuple[str, int | None], ForwardRecord] = {}  # hidden-source views, one per model and width

    def policy_view(reg: Regularizer) -> ForwardRecord:
        if "kv_hidden" not in reg.needs:
            return policy_out
        width = reg.kv_columns(batch)
        width = prompt_width(batch) if width is None and reg.reference_span == "prompt" else width
        if ("policy", width) not in views:
            views[("policy", width)] = hidden_kv_view(policy, policy_out, width)
        return views[("policy", width)]

    def shared_view(reg: Regularizer) -> ForwardRecord:
        if "kv_hidden" not in reg.needs:
            return shared
        if ("reference", None) not in views:  # the shared record is already cut to what its readers need
            views[("reference", None)] = reference.hidden_kv(shared)
        return views[("reference", None)]

    out = []
    for reg, inputs in zip(regularizers, own, strict=True):
        if inputs is None:
            inputs, pol = batch, policy_view(reg)
            ref = shared_view(reg) if reg.needs_reference else None
        else:  # a batch of its own: its own policy forward, and a whole-batch reference forward if it needs one
            pol = policy_record(policy, inputs, reg.needs, span_logits_mask(inputs, reg.logits_span))
            everything = torch.arange(inputs["input_ids"].size(0), device=inputs["input_ids"].device)
            ref = _reference_of_rows(reference, reg, inputs, everything) if reg.needs_reference else None
        rows = None if reg.needs_reference else reg.reference_rows(inputs)
        if rows is not None:
            ref = _reference_of_rows(reference, reg, inputs, rows)
        out.append(RegularizerInputs(inputs, pol, ref))
    return policy_out, out


def setup_regularizers(
    regularizers: Sequence[Regularizer], context: RegularizerContext, reference: Reference | None
) -> None:
    """Set every regularizer up and run the query-independent reference forwards they ask for, once."""
    for reg in regularizers:
        reg.setup(context)
        once = reg.reference_once()
        if once is None:
            continue
        if reference is None:
            raise RuntimeError(f"regularizer {reg.name!r} needs the reference at set-up, but the module has none")
        no_logits = torch.zeros_like(once["attention_mask"], dtype=torch.bool)  # head-free
        reg.setup_reference(reference.forward(once, reg.needs, no_logits))
