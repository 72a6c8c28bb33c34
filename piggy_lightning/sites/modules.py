"""Where things live inside a decoder-only transformer: the per-architecture module table.

Llama, Qwen2/2.5, Qwen3, Mistral, SmolLM2 and GPT-OSS in ``transformers`` all expose ``model.layers[i].self_attn``
with ``k_proj``/``v_proj`` linear maps. The key/value *projection outputs* (after the input norm, before RoPE)
are what TReFT regularizes and what prefix patching replaces (paper §3.1, §5.1). Because positions are
identical, editing them before RoPE is equivalent to editing the cache.

:data:`SITE_TABLE` maps each :data:`Component` to module paths inside a decoder block and a hook kind (the module's
input or its output). It is the only place that names ``self_attn.k_proj``/``v_proj``; every supported architecture
uses it. Layers are 0-based decoder blocks. ``block_input`` at layer l is the residual stream *entering* block l,
i.e. HF's ``hidden_states[l]`` (layer 0 is the token embeddings); ``block_output`` at layer l is the stream
*leaving* block l, i.e. ``hidden_states[l + 1]`` (before the final norm for the last block).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Literal

from torch import nn

from piggy_lightning.sites.positions import resolve_layers

Component = Literal["kv", "key", "value", "block_input", "block_output"]
HookKind = Literal["input", "output"]
Slot = tuple[int, str]  # (layer, module path inside the block)
KEY_PATH, VALUE_PATH, KEY_NORM_PATH = "self_attn.k_proj", "self_attn.v_proj", "self_attn.k_norm"

# component -> ((module path inside a decoder block, hook kind), ...); "" is the block itself. Read-only: an
# architecture with other module names is a change to this table (with a test), not a runtime registration.
SITE_TABLE: MappingProxyType[str, tuple[tuple[str, HookKind], ...]] = MappingProxyType(
    {
        "key": ((KEY_PATH, "output"),),
        "value": ((VALUE_PATH, "output"),),
        "kv": ((KEY_PATH, "output"), (VALUE_PATH, "output")),
        "block_input": (("", "input"),),
        "block_output": (("", "output"),),
    }
)


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
        try:
            out.append((layer.get_submodule(KEY_PATH), layer.get_submodule(VALUE_PATH)))
        except AttributeError as err:
            raise TypeError(f"layer {i} of {type(model).__name__} has no {KEY_PATH} / {VALUE_PATH}") from err
    return out


def key_norms(model: nn.Module) -> list[nn.Module]:
    """Every layer's per-head key norm (Qwen3's ``self_attn.k_norm``, applied after ``k_proj``, before RoPE)."""
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        try:
            norm = layer.get_submodule(KEY_NORM_PATH)
        except AttributeError:
            norm = None
        if norm is None:
            raise TypeError(
                f"layer {i} of {type(model).__name__} has no self_attn.k_norm, so normed keys equal the k_proj "
                "outputs; use source: kv"
            )
        out.append(norm)
    return out


def site_modules(
    model: nn.Module, component: Component, layers: list[int] | None
) -> dict[Slot, tuple[nn.Module, HookKind]]:
    """The modules ``component`` names in ``layers`` of ``model`` (peft-wrapped or not), keyed by ``(layer, path)``.

    Args:
        model: The causal LM.
        component: What to read or write (see :data:`SITE_TABLE`).
        layers: 0-based decoder layers (negative counts from the end); None means every layer.
    """
    blocks = decoder_layers(model)
    out = {}
    for layer in resolve_layers(layers, len(blocks)):
        for path, kind in SITE_TABLE[component]:
            out[(layer, path)] = (blocks[layer].get_submodule(path) if path else blocks[layer], kind)
    return out
