"""Where things live inside a decoder-only transformer, and hooks that read them.

Llama, Qwen2/2.5, Qwen3, Mistral, SmolLM2 and GPT-OSS in ``transformers`` all expose ``model.layers[i].self_attn``
with ``k_proj``/``v_proj`` linear maps. The key/value *projection outputs* (after the input norm, before RoPE)
are what TReFT regularizes and what prefix patching replaces (paper §3.1, §5.1). Because positions are
identical, editing them before RoPE is equivalent to editing the cache. Hooks are context managers that always
remove themselves.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a causal LM, seen through any peft wrapper."""
    for candidate in (model, getattr(model, "base_model", None)):
        while candidate is not None:
            layers = getattr(candidate, "layers", None)
            if isinstance(layers, nn.ModuleList):
                return layers
            candidate = getattr(candidate, "model", None)
    raise TypeError(f"cannot find decoder layers (`.model.layers`) in {type(model).__name__}")


def kv_projections(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """``(k_proj, v_proj)`` of every decoder layer (peft-wrapped modules included)."""
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        attn = getattr(layer, "self_attn", None)
        if attn is None or not hasattr(attn, "k_proj") or not hasattr(attn, "v_proj"):
            raise TypeError(f"layer {i} of {type(model).__name__} has no self_attn.k_proj / v_proj")
        out.append((attn.k_proj, attn.v_proj))
    return out


def key_norms(model: nn.Module) -> list[nn.Module]:
    """Every layer's per-head key norm (Qwen3's ``self_attn.k_norm``, applied after ``k_proj``, before RoPE)."""
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        norm = getattr(getattr(layer, "self_attn", None), "k_norm", None)
        if norm is None:
            raise TypeError(
                f"layer {i} of {type(model).__name__} has no self_attn.k_norm, so normed keys equal the k_proj "
                "outputs; use source: kv"
            )
        out.append(norm)
    return out


@contextmanager
def record_kv(model: nn.Module, normed_keys: bool = False) -> Iterator[tuple[list[Tensor | None], list[Tensor | None]]]:
    """Record every layer's key and value projection outputs during forwards inside the context.

    Args:
        model: The causal LM (peft-wrapped or not).
        normed_keys: Record the keys after the per-head ``k_norm`` (Qwen3) instead of the ``k_proj`` output;
            raises on models without one.

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
            store[i] = output.flatten(2)  # k_norm's (B, T, H, D) -> (B, T, H * D); projections are 3-D already

        return hook

    try:
        for i, ((_, v_proj), k_module) in enumerate(zip(projections, key_modules, strict=True)):
            handles.append(k_module.register_forward_hook(_store(keys, i)))
            handles.append(v_proj.register_forward_hook(_store(values, i)))
        yield keys, values
    finally:
        for handle in handles:
            handle.remove()
