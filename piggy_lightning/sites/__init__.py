"""Sites of a decoder-only transformer: the module table, hooks that read or write them, positions and layers.

The one place that knows where keys, values and the residual stream live in each supported architecture
(:mod:`~piggy_lightning.sites.modules`), how to hook them (:mod:`~piggy_lightning.sites.hooks`), and which token
positions and layers a component means (:mod:`~piggy_lightning.sites.positions`). Part of the core: it imports
nothing from the plugin packages.
"""

from piggy_lightning.sites.hooks import forward_values, overwriting, record_kv, recording
from piggy_lightning.sites.modules import (
    SITE_TABLE,
    Component,
    HookKind,
    Slot,
    decoder_layers,
    key_norms,
    kv_projections,
    site_modules,
)
from piggy_lightning.sites.positions import (
    Positions,
    batch_spans,
    pick_at,
    position_mask,
    require_positions,
    resolve_layers,
    span_of,
)

__all__ = [
    "SITE_TABLE",
    "Component",
    "HookKind",
    "Positions",
    "Slot",
    "batch_spans",
    "decoder_layers",
    "forward_values",
    "key_norms",
    "kv_projections",
    "overwriting",
    "pick_at",
    "position_mask",
    "record_kv",
    "recording",
    "require_positions",
    "resolve_layers",
    "site_modules",
    "span_of",
]
