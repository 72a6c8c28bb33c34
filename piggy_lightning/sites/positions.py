"""Which token positions and which layers a site covers: one vocabulary for regularizers, probes and monitors.

Positions are named after the chat spans of ``spans.py``. ``prefix``, ``query``, ``postfix`` and ``response`` are
the span masks; ``prompt`` is ``prefix | query | postfix`` (the paper's "all input tokens", Table 3 "TReFT (all)");
``all`` is every attended token, response included; ``query_matched`` is the first query tokens, as many as the
row has prefix tokens (all of them when the query is shorter): the paper's control for prefix patching (§3.1).

An ``index`` narrows any of them to one position per row: the ``index``-th selected token (0-based, counted from
the row's start, padding skipped). The default prefix is the same for every prompt, so ``prefix`` at index i is the
same template token in every row: the unit of a per-position carrier scan.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

from torch import Tensor

Positions = Literal["prefix", "query", "query_matched", "postfix", "prompt", "response", "all"]
PROMPT_POSITIONS = ("prefix", "query", "query_matched", "postfix", "prompt")


def batch_spans(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The span masks of a training batch (``<span>_mask`` and ``attention_mask``) keyed by span name."""
    spans = {name[: -len("_mask")]: m.bool() for name, m in batch.items() if name.endswith("_mask")}
    return spans


def position_mask(spans: Mapping[str, Tensor], positions: Positions, index: int | None = None) -> Tensor:
    """The ``(B, T)`` boolean mask of ``positions``; padding is never selected.

    Args:
        spans: ``{span: (B, T) bool}`` for ``prefix``, ``query``, ``postfix`` (and ``response``, ``attention``
            where present), e.g. :func:`batch_spans` of a training batch or a prompt batch's span masks.
        positions: Which positions to select.
        index: Keep only the ``index``-th selected position of each row (0-based); a row with fewer selected
            positions keeps none. None keeps them all.
    """
    mask = _span_mask(spans, positions)
    if index is None:
        return mask
    if index < 0:
        raise ValueError(f"a position index counts from the start of the selection (>= 0), got {index}")
    return mask & (mask.cumsum(1) == index + 1)  # (B, T): the (index + 1)-th selected token of each row


def _span_mask(spans: Mapping[str, Tensor], positions: Positions) -> Tensor:
    attended = spans.get("attention")
    if positions == "all":
        if attended is None:
            raise KeyError("positions 'all' need the attention mask among the spans")
        return attended.bool()
    if positions == "prompt":
        mask = spans["prefix"].bool() | spans["query"].bool() | spans["postfix"].bool()
    elif positions == "query_matched":
        query = spans["query"].bool()  # (B, T)
        n_prefix = spans["prefix"].sum(1, keepdim=True)  # (B, 1)
        mask = query & (query.cumsum(1) <= n_prefix)
    else:
        mask = spans[positions].bool()
    return mask & attended.bool() if attended is not None else mask


def require_positions(mask: Tensor, positions: str, who: str) -> Tensor:
    """Return ``mask`` unchanged, or raise a clear error when it selects no position at all.

    Args:
        mask: ``(B, T)`` boolean mask.
        positions: The positions' name, for the message.
        who: The component's name, for the message.
    """
    if not bool(mask.any()):
        raise ValueError(
            f"{who!r}: the batch has no {positions} tokens (empty span); check the chat template's spans "
            f"(piggy_lightning.spans) or choose other positions"
        )
    return mask


def span_of(positions: Positions) -> Literal["prompt", "all"]:
    """The part of each row a forward must cover to give the values at ``positions`` (causal attention)."""
    return "prompt" if positions in PROMPT_POSITIONS else "all"


def pick_at(mask: Tensor) -> Callable[[Tensor], Tensor]:
    """Select the ``(B, T)`` ``mask`` positions from a ``(B, T', ...)`` tensor of a forward truncated to ``T' <= T``.

    A reference run on the prompt only is shorter than the batch; the mask selects nothing beyond it.
    """
    return lambda t: t[mask[:, : t.size(1)]]


def resolve_layers(layers: list[int] | None, n_layers: int) -> list[int]:
    """Layer indices in ``[0, n_layers)``; None means all, negative indices count from the end."""
    if layers is None:
        return list(range(n_layers))
    if not layers or any(not -n_layers <= i < n_layers for i in layers):
        raise ValueError(f"layers must be a non-empty subset of range({n_layers}), got {layers}")
    resolved = [i % n_layers for i in layers]
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"layers repeat an index: {layers}")
    return resolved
