"""Patch sites declared as data, and hooks that read or overwrite them.

A :class:`PatchSite` says *what* is patched (key/value projection outputs, or the residual stream entering or
leaving a decoder block), *at which token positions*, *in which layers*, and from *which reference prompt*. One table
per architecture maps each component to module paths inside a decoder block and to a hook kind (the module's input
or its output). Every architecture ``piggy_lightning.sites`` supports (Llama, Qwen2/2.5/3, Mistral, SmolLM2,
GPT-OSS) uses the default table; another architecture adds a table keyed by its ``config.model_type``.

Layers are 0-based decoder blocks. ``block_input`` at layer l is the residual stream *entering* block l, i.e. HF's
``hidden_states[l]`` (layer 0 is the token embeddings); ``block_output`` at layer l is the stream *leaving* block l,
i.e. ``hidden_states[l + 1]`` (before the final norm for the last block). The two are the same stream one layer
apart: ``block_output`` at l equals ``block_input`` at l + 1.

Hooks are context managers that always remove themselves in ``finally``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from piggy_lightning.regularizers.drift_math import resolve_layers
from piggy_lightning.sites import decoder_layers

Component = Literal["kv", "key", "value", "block_input", "block_output"]
Positions = Literal["prefix", "query", "query_matched", "postfix"]
ReferencePrompt = Literal["same", "empty_query"]
HookKind = Literal["input", "output"]
Slot = tuple[int, str]  # (layer, module path inside the block)

# component -> ((module path inside a decoder block, hook kind), ...); "" is the block itself
_DEFAULT_TABLE: dict[str, tuple[tuple[str, HookKind], ...]] = {
    "key": (("self_attn.k_proj", "output"),),
    "value": (("self_attn.v_proj", "output"),),
    "kv": (("self_attn.k_proj", "output"), ("self_attn.v_proj", "output")),
    "block_input": (("", "input"),),
    "block_output": (("", "output"),),
}
SITE_TABLES: dict[str, dict[str, tuple[tuple[str, HookKind], ...]]] = {"default": _DEFAULT_TABLE}


@dataclass(frozen=True)
class PatchSite:
    """Where a patch writes the reference model's activations into the finetuned model's forward."""

    component: Component = "kv"
    """``kv``: key and value projection outputs (after the input norm, before RoPE; paper §4.2); ``key`` or
    ``value`` alone; ``block_input`` / ``block_output``: the residual stream entering / leaving a block (§3.2)."""
    positions: Positions = "prefix"
    """``prefix``, ``query`` or ``postfix`` tokens; ``query_matched``: the first query tokens, as many as the prompt
    has prefix tokens (all of them when the query is shorter): the paper's control for prefix patching."""
    layers: list[int] | None = None
    """0-based decoder layers (negative counts from the end); None means every layer."""
    reference: ReferencePrompt = "same"
    """``same``: the reference model run on the same prompt; ``empty_query``: run once on the prompt with an empty
    user message (the paper's postfix reference, §4.3, Table 11 and Fig. 5). The prefix is the same either way."""

    def __post_init__(self) -> None:
        if self.reference == "empty_query" and self.positions not in ("prefix", "postfix"):
            raise ValueError(f"an empty-query reference has no {self.positions} tokens; use reference='same'")
        if self.layers is not None and not self.layers:
            raise ValueError("layers must be None (all) or a non-empty list")

    @property
    def name(self) -> str:
        """A path- and metric-safe name, e.g. ``kv_prefix``, ``block_input_prefix_L09``, ``kv_postfix_emptyq``."""
        name = f"{self.component}_{self.positions}"
        if self.layers is not None:
            name += "_L" + "-".join(f"{i:02d}" for i in self.layers)
        return name + ("_emptyq" if self.reference == "empty_query" else "")


def site_modules(model: nn.Module, site: PatchSite) -> dict[Slot, tuple[nn.Module, HookKind]]:
    """The modules a site reads or writes in ``model`` (peft-wrapped or not), keyed by ``(layer, path)``."""
    blocks = decoder_layers(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    table = SITE_TABLES.get(model_type, SITE_TABLES["default"])
    out = {}
    for layer in resolve_layers(site.layers, len(blocks)):
        for path, kind in table[site.component]:
            out[(layer, path)] = (blocks[layer].get_submodule(path) if path else blocks[layer], kind)
    return out


def position_mask(span_masks: dict[str, Tensor], positions: Positions) -> Tensor:
    """``(B, T)`` boolean mask of ``positions`` from ``{span: (B, T) bool}`` masks (``prefix``, ``query``, ...)."""
    if positions != "query_matched":
        return span_masks[positions]
    query = span_masks["query"]  # (B, T)
    n_prefix = span_masks["prefix"].sum(1, keepdim=True)  # (B, 1)
    return query & (query.cumsum(1) <= n_prefix)


def _tensor(output):
    return output[0] if isinstance(output, tuple) else output


def _hook(module: nn.Module, kind: HookKind, edit):
    """Register ``edit(tensor) -> tensor | None`` on the module's first input or its output; returns the handle."""
    if kind == "output":

        def forward_hook(_module, _args, output):
            new = edit(_tensor(output))
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return module.register_forward_hook(forward_hook)

    def pre_hook(_module, args, kwargs):
        if args:
            new = edit(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        new = edit(kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})

    return module.register_forward_pre_hook(pre_hook, with_kwargs=True)


@contextmanager
def recording(modules: dict[Slot, tuple[nn.Module, HookKind]]) -> Iterator[dict[Slot, Tensor]]:
    """Record each slot's tensor ``(B, T, D)`` during the forwards inside the context (the last forward wins)."""
    store: dict[Slot, Tensor] = {}
    handles = []

    def keep(slot: Slot):
        def edit(t: Tensor) -> None:
            store[slot] = t.detach()

        return edit

    try:
        for slot, (module, kind) in modules.items():
            handles.append(_hook(module, kind, keep(slot)))
        yield store
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def overwriting(
    modules: dict[Slot, tuple[nn.Module, HookKind]], values: dict[Slot, Tensor], mask: Tensor
) -> Iterator[None]:
    """Overwrite each slot's tensor at ``mask`` with ``values[slot]`` in the first forward shaped like ``mask``.

    Only the first matching forward is edited (the prefill of ``generate``); decoding steps pass unchanged, since
    the patched keys and values already sit in the cache and later positions are not patched. Leaving the context
    without any such forward raises, so a patch never silently does nothing.

    Args:
        modules: From :func:`site_modules`.
        values: ``(B, T, D)`` per slot, aligned with ``mask``; read only where ``mask`` is True.
        mask: ``(B, T)`` positions to overwrite.
    """
    fired: set[Slot] = set()
    handles = []

    def write(slot: Slot):
        def edit(t: Tensor) -> Tensor | None:
            if slot in fired or t.shape[:2] != mask.shape:
                return None
            fired.add(slot)
            return torch.where(mask[..., None], values[slot].to(t.dtype), t)

        return edit

    try:
        for slot, (module, kind) in modules.items():
            handles.append(_hook(module, kind, write(slot)))
        yield
        if missed := sorted(set(modules) - fired):  # never patch silently nothing
            raise RuntimeError(f"no forward shaped like the mask {tuple(mask.shape)} reached {missed[:3]}")
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def forward_values(model: nn.Module, site: PatchSite, input_ids: Tensor, attention_mask: Tensor) -> dict[Slot, Tensor]:
    """Run ``model`` on padded rows and return the site's tensors ``(B, T, D)`` per slot.

    Position ids follow the attention mask (as ``generate`` derives them), so left padding, or padding between a
    cached prefix and the rest of the prompt, leaves every token at its unpadded position.

    Args:
        model: The model to read (e.g. the reference inside ``Reference.active()``).
        site: What to record.
        input_ids: ``(B, T)`` tokens.
        attention_mask: ``(B, T)``, 0 on padding.
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # (B, T)
    with recording(site_modules(model, site)) as store:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return dict(store)
