"""Hooks that read or overwrite sites of a decoder-only transformer.

Hooks are context managers that always remove themselves in ``finally``. Reading keeps tensors on the autograd
graph only when asked (``detach=False``), so penalties get gradients and probes do not hold graphs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from piggy_lightning.sites.modules import Component, HookKind, Slot, key_norms, kv_projections, site_modules


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
def recording(modules: dict[Slot, tuple[nn.Module, HookKind]], detach: bool = True) -> Iterator[dict[Slot, Tensor]]:
    """Record each slot's tensor ``(B, T, D)`` during the forwards inside the context (the last forward wins).

    Args:
        modules: From :func:`~piggy_lightning.sites.modules.site_modules`.
        detach: Store detached tensors (the default: patch values and probes); False keeps the autograd graph.
    """
    store: dict[Slot, Tensor] = {}
    handles = []

    def keep(slot: Slot):
        def edit(t: Tensor) -> None:
            store[slot] = t.detach() if detach else t

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
        modules: From :func:`~piggy_lightning.sites.modules.site_modules`.
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


@contextmanager
def record_kv(
    model: nn.Module, normed_keys: bool = False, detach: bool = False
) -> Iterator[tuple[list[Tensor | None], list[Tensor | None]]]:
    """Record every layer's key and value projection outputs during forwards inside the context.

    Args:
        model: The causal LM (peft-wrapped or not).
        normed_keys: Record the keys after the per-head ``k_norm`` (Qwen3) instead of the ``k_proj`` output;
            raises on models without one.
        detach: Store detached tensors (monitors); the default keeps them on the autograd graph (penalties).

    Yields:
        ``(keys, values)``: lists with one ``(B, T, n_kv_heads * head_dim)`` tensor per layer, filled by the
        forward pass (still attached to the autograd graph).
    """
    projections = kv_projections(model)
    key_modules = key_norms(model) if normed_keys else [k for k, _ in projections]
    keys: list[Tensor | None] = [None] * len(projections)
    values: list[Tensor | None] = [None] * len(projections)
    handles = []

    def _store(store: list[Tensor | None], i: int):
        def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
            flat = output.flatten(2)  # k_norm's (B, T, H, D) -> (B, T, H * D); projections are 3-D already
            store[i] = flat.detach() if detach else flat

        return hook

    try:
        for i, ((_, v_proj), k_module) in enumerate(zip(projections, key_modules, strict=True)):
            handles.append(k_module.register_forward_hook(_store(keys, i)))
            handles.append(v_proj.register_forward_hook(_store(values, i)))
        yield keys, values
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def forward_values(
    model: nn.Module, component: Component, layers: list[int] | None, input_ids: Tensor, attention_mask: Tensor
) -> dict[Slot, Tensor]:
    """Run ``model`` on padded rows and return ``component``'s tensors ``(B, T, D)`` per slot of ``layers``.

    Position ids follow the attention mask (as ``generate`` derives them), so left padding, or padding between a
    cached prefix and the rest of the prompt, leaves every token at its unpadded position.

    Args:
        model: The model to read (e.g. the reference inside ``Reference.active()``).
        component: What to record (see :data:`~piggy_lightning.sites.modules.SITE_TABLE`).
        layers: 0-based decoder layers; None means every layer.
        input_ids: ``(B, T)`` tokens.
        attention_mask: ``(B, T)``, 0 on padding.
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # (B, T)
    with recording(site_modules(model, component, layers)) as store:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return dict(store)
