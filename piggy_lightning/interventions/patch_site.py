"""A patch site declared as data: what is patched, at which positions, in which layers, from which reference prompt.

The module table, the hooks and the position vocabulary are the core's (:mod:`piggy_lightning.sites`); a
:class:`PatchSite` only chooses among them, plus the reference prompt, which is a patching concern.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from piggy_lightning.sites import Component, HookKind, Slot, forward_values, position_mask, site_modules

PatchPositions = Literal["prefix", "query", "query_matched", "postfix", "prompt"]
ReferencePrompt = Literal["same", "empty_query"]


@dataclass(frozen=True)
class PatchSite:
    """Where a patch writes the reference model's activations into the finetuned model's forward."""

    component: Component = "kv"
    """``kv``: key and value projection outputs (after the input norm, before RoPE; paper §4.2); ``key`` or
    ``value`` alone; ``block_input`` / ``block_output``: the residual stream entering / leaving a block (§3.2)."""
    positions: PatchPositions = "prefix"
    """``prefix``, ``query`` or ``postfix`` tokens, or all three (``prompt``); ``query_matched``: the first query
    tokens, as many as the prompt has prefix tokens (all of them when the query is shorter): the paper's control for
    prefix patching."""
    layers: list[int] | None = None
    """0-based decoder layers (negative counts from the end); None means every layer."""
    reference: ReferencePrompt = "same"
    """``same``: the reference model run on the same prompt; ``empty_query``: run once on the prompt with an empty
    user message (the paper's postfix reference, §4.3, Table 11 and Fig. 5). The prefix is the same either way."""
    index: int | None = None
    """Only the ``index``-th of those positions in each row (0-based; ``prefix`` at index i is the same template
    token in every default prompt, the carrier scan's unit); None means all of them."""

    def __post_init__(self) -> None:
        if self.reference == "empty_query" and self.positions not in ("prefix", "postfix"):
            raise ValueError(f"an empty-query reference has no {self.positions} tokens; use reference='same'")
        if self.layers is not None and not self.layers:
            raise ValueError("layers must be None (all) or a non-empty list")
        if self.index is not None and self.index < 0:
            raise ValueError(f"index counts from the first {self.positions} token (>= 0), got {self.index}")

    @property
    def name(self) -> str:
        """A path- and metric-safe name, e.g. ``kv_prefix``, ``block_input_prefix_L09``, ``kv_postfix_emptyq``,
        ``kv_prefix_p03`` (index 3)."""
        name = f"{self.component}_{self.positions}"
        if self.index is not None:
            name += f"_p{self.index:02d}"
        if self.layers is not None:
            name += "_L" + "-".join(f"{i:02d}" for i in self.layers)
        return name + ("_emptyq" if self.reference == "empty_query" else "")

    def mask(self, spans: Mapping[str, Tensor]) -> Tensor:
        """The ``(B, T)`` positions this site covers, from ``{span: (B, T) bool}`` masks (``prefix``, ``query``,
        ``postfix``)."""
        return position_mask(spans, self.positions, self.index)

    def modules(self, model: nn.Module) -> dict[Slot, tuple[nn.Module, HookKind]]:
        """The modules this site reads or writes in ``model``, keyed by ``(layer, path)``."""
        return site_modules(model, self.component, self.layers)

    def read(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> dict[Slot, Tensor]:
        """This site's tensors ``(B, T, D)`` per slot from a forward of ``model`` on padded rows."""
        return forward_values(model, self.component, self.layers, input_ids, attention_mask)
