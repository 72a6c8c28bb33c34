"""Which token positions of a batch a regularizer looks at, named after the chat spans of ``spans.py``.

``prefix``, ``query``, ``postfix`` and ``response`` are the span masks of the batch contract (``data/chat.py``);
``prompt`` is their prompt part, ``prefix | query | postfix`` (the paper's "all input tokens", Table 3
"TReFT (all)"); ``all`` is every attended token, response included.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from torch import Tensor

Positions = Literal["prefix", "query", "postfix", "prompt", "response", "all"]


def position_mask(batch: dict[str, Tensor], positions: Positions) -> Tensor:
    """The ``(B, T)`` boolean mask of ``positions`` in ``batch`` (padding is never selected).

    Args:
        batch: A batch with ``attention_mask`` and the ``<span>_mask`` tensors.
        positions: Which positions to select.
    """
    attended = batch["attention_mask"].bool()  # (B, T)
    if positions == "all":
        return attended
    if positions == "prompt":
        mask = batch["prefix_mask"] | batch["query_mask"] | batch["postfix_mask"]
    else:
        mask = batch[f"{positions}_mask"]
    return mask.bool() & attended


def require_positions(mask: Tensor, positions: str, who: str) -> Tensor:
    """Return ``mask`` unchanged, or raise a clear error when it selects no position at all.

    Args:
        mask: ``(B, T)`` boolean mask.
        positions: The positions' name, for the message.
        who: The regularizer's name, for the message.
    """
    if not bool(mask.any()):
        raise ValueError(
            f"regularizer {who!r}: the batch has no {positions} tokens to regularize (empty span); check the chat "
            f"template's spans (piggy_lightning.spans) or choose other positions"
        )
    return mask


def span_of(positions: Positions) -> Literal["prompt", "all"]:
    """The part of each row a forward must cover to give the values at ``positions`` (causal attention)."""
    return "prompt" if positions in ("prefix", "query", "postfix", "prompt") else "all"


def pick_at(mask: Tensor) -> Callable[[Tensor], Tensor]:
    """Select the ``(B, T)`` ``mask`` positions from a ``(B, T', ...)`` tensor of a forward truncated to ``T' <= T``.

    A reference run on the prompt only is shorter than the batch; the mask selects nothing beyond it.
    """
    return lambda t: t[mask[:, : t.size(1)]]
