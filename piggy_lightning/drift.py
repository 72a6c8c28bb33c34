"""Drift arithmetic: how far the policy's keys, values or states moved from the reference's.

Shared by the drift penalties and the drift monitor, so it lives in the core (plugins never import each other).

:func:`kv_drift` is TReFT's ``L_KV`` (paper §5.1, Eq. 2-3); :func:`select_kv` reads keys and values at chosen positions
from a recorded forward, either the real projection outputs (``kv``) or projections of the pre-norm residual
stream (``hidden``, the released training code). Regularizers never project themselves: they declare
:func:`record_needs` and the module hands them records whose ``keys``/``values`` already are what their source
means (:func:`hidden_kv_view`); :func:`select_kv` with ``projections`` and :func:`reference_kv` serve callbacks
such as the drift monitor, which run their own forwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from piggy_lightning.forward import ForwardRecord, Need
from piggy_lightning.sites import kv_projections

if TYPE_CHECKING:
    from piggy_lightning.reference import Reference

KVSource = Literal["kv", "kv_normed", "hidden"]
# What a regularizer can ask a forward to record: a forward Need, or ``kv_hidden``: keys and values as ``k_proj`` /
# ``v_proj`` of the pre-norm residual stream entering each layer (the release's training code), which the module
# computes from the recorded hidden states with the forwarded network's own projections (see hidden_kv_view).
RecordNeed = Literal["hidden_states", "kv", "kv_normed", "kv_hidden"]
Pick = Callable[[Tensor], Tensor]  # selects positions from a (B, T, ...) tensor
_EPS = 1e-12  # floor of the reference norm, as in the release


def relative_drift(current: Tensor, reference: Tensor) -> Tensor:
    """Squared relative drift ``||c - r||^2 / max(||r||, 1e-12)^2`` over the last dimension, in float32.

    Args:
        current: ``(..., D)`` policy vectors.
        reference: ``(..., D)`` reference vectors (broadcastable to ``current``).
    """
    current, reference = current.float(), reference.float()
    return (current - reference).pow(2).sum(-1) / reference.norm(dim=-1).clamp_min(_EPS).pow(2)


def per_layer_drift(current: Tensor, reference: Tensor) -> Tensor:
    """``(L,)`` mean relative drift of each layer over all its positions; inputs are ``(L, ..., D)``."""
    return relative_drift(current, reference).flatten(1).mean(1)


def kv_drift(keys: Tensor, values: Tensor, ref_keys: Tensor, ref_values: Tensor) -> Tensor:
    """TReFT's ``L_KV = mean_l (L_K(l) + L_V(l))`` for ``(L, ..., D)`` inputs (references broadcastable)."""
    return (per_layer_drift(keys, ref_keys) + per_layer_drift(values, ref_values)).mean()


def select_kv(
    record: ForwardRecord, layers: list[int], source: KVSource, pick: Pick, projections: list | None = None
) -> tuple[Tensor, Tensor]:
    """Keys and values ``(L, *S, D)`` of ``layers`` at the positions ``pick`` selects.

    Args:
        record: A forward that recorded ``kv`` (source ``kv``) or ``hidden_states`` (source ``hidden``).
        layers: Decoder layer indices.
        source: ``kv`` / ``kv_normed`` use the recorded keys (before / after ``k_norm``) and values; ``hidden``
            projects ``hidden_states[l]``.
        pick: Maps a ``(B, T, X)`` tensor to ``(*S, X)``, e.g. ``lambda t: t[mask]``.
        projections: ``(k_proj, v_proj)`` per layer of the model that made ``record`` (source ``hidden``).
    """
    if source in ("kv", "kv_normed"):
        if record.keys is None:
            raise RuntimeError("the forward did not record keys and values; the regularizer must need 'kv'")
        keys = torch.stack([pick(record.keys[i]) for i in layers])
        return keys, torch.stack([pick(record.values[i]) for i in layers])
    if record.hidden_states is None or projections is None:
        raise RuntimeError("source 'hidden' needs recorded hidden_states and the k/v projections (call setup)")
    states = [pick(record.hidden_states[i]) for i in layers]  # residual stream entering layer i, pre-norm
    keys = torch.stack([projections[i][0](h) for i, h in zip(layers, states, strict=True)])
    values = torch.stack([projections[i][1](h) for i, h in zip(layers, states, strict=True)])
    return keys, values


def reference_select(
    reference: Reference | None, record: ForwardRecord, layers: list[int], source: KVSource, pick: Pick
) -> tuple[Tensor, Tensor]:
    """:func:`select_kv` on a reference record; the ``hidden`` source projects with the reference's weights."""
    if source in ("kv", "kv_normed"):
        return select_kv(record, layers, source, pick)
    if reference is None:
        raise RuntimeError("source 'hidden' needs the module's reference (call setup)")
    with reference.active() as model:
        return select_kv(record, layers, source, pick, kv_projections(model))


def reference_kv(
    reference: Reference, batch: dict[str, Tensor], layers: list[int], source: KVSource, pick: Pick
) -> tuple[Tensor, Tensor]:
    """One head-free reference forward on ``batch`` and its keys and values at ``pick`` (no gradients)."""
    no_logits = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)  # (B, T): keys need no LM head
    record = reference.forward(batch, kv_needs(source), no_logits)
    return reference_select(reference, record, layers, source, pick)


def kv_needs(source: KVSource) -> frozenset[Need]:
    """What a forward must record to read keys and values from ``source`` with :func:`select_kv`."""
    return frozenset({source}) if source in ("kv", "kv_normed") else frozenset({"hidden_states"})


def record_needs(source: KVSource) -> frozenset[RecordNeed]:
    """What a regularizer reading keys and values from ``source`` needs: the module then fills the record's
    ``keys``/``values`` with exactly those (``hidden``: projections of the residual stream, :func:`hidden_kv_view`)."""
    return frozenset({source}) if source in ("kv", "kv_normed") else frozenset({"kv_hidden"})


def forward_needs(needs: Iterable[RecordNeed]) -> frozenset[Need]:
    """The :func:`~piggy_lightning.forward.run_forward` needs behind ``needs`` (``kv_hidden`` reads hidden states)."""
    return frozenset("hidden_states" if n == "kv_hidden" else n for n in needs)


def hidden_kv_view(model: nn.Module, record: ForwardRecord, width: int | None = None) -> ForwardRecord:
    """``record`` with ``keys``/``values`` replaced by ``k_proj``/``v_proj`` of ``hidden_states[l]`` for every layer l.

    The released training code's keys and values: projections of the pre-norm residual stream entering each layer.
    Computed with ``model``'s projections, so call it where ``model`` is the network that made ``record`` (inside
    ``Reference.active()`` for a reference record); gradients flow as in ``model``.

    Args:
        model: The network that made ``record`` (peft-wrapped or not).
        record: A forward that recorded ``hidden_states``.
        width: Project only the first ``width`` positions of each row (``(B, width, D)``), e.g. the prompt when
            only prompt positions are read; None: all positions.
    """
    if record.hidden_states is None:
        raise RuntimeError("keys and values of the residual stream need a forward that recorded hidden_states")
    cut = slice(None) if width is None else slice(0, width)
    keys, values = [], []
    for i, (k_proj, v_proj) in enumerate(kv_projections(model)):
        h = record.hidden_states[i][:, cut]  # (B, T', H): the stream entering layer i, pre-norm
        keys.append(k_proj(h))  # (B, T', D_kv)
        values.append(v_proj(h))
    return replace(record, keys=keys, values=values)


def batch_rows(batch: dict[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
    """The sub-batch of the given row indices."""
    return {k: v[rows] for k, v in batch.items() if isinstance(v, Tensor) and v.dim() >= 1}
