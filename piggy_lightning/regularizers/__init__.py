"""Regularizers added to the cross-entropy, chosen by class path in ``model.regularizers``.

| class | penalty | reference forward per step | source |
|---|---|---|---|
| ``PrefixKVDrift`` | relative K/V drift of the prefix, reference cached once (TReFT) | none | Zhao et al. 2026, §5.1 |
| ``PerRowPrefixKVDrift`` | the same, rows with their own system prompt against their own prefix | those rows | ibid. |
| ``DefaultPrefixKVDrift`` | the default (test-time) prefix, whatever prompt rows train under | none | inoculation |
| ``KVDrift`` | relative K/V drift at query / postfix / prompt positions | every batch | Zhao et al. 2026, Table 3, 4 |
| ``SharedReferenceKVDrift`` | the same against one example's postfix (the release's shortcut) | once | the release |
| ``KLToReference`` | KL(reference ‖ policy) on the training batches | every batch | Zhao et al. 2026, App. D.4 |
| ``RetainKL`` | KL(reference ‖ policy) on a retain set | until cached | Zhao et al. 2026, App. D.4 |
| ``HiddenStateDrift`` | mean squared residual-stream distance (LDIFS-style) | every batch | Mukhoti et al. 2024 |

Weight schedules (``schedule:`` of any regularizer): ``Hinge``, ``ActiveWindow``, ``LinearWarmup``,
``ScheduleChain``; they live in the core (``piggy_lightning.regularizer``) and are re-exported here.
"""

from piggy_lightning.forward import ForwardRecord
from piggy_lightning.regularizer import (
    ActiveWindow,
    Hinge,
    LinearWarmup,
    Regularizer,
    RegularizerContext,
    ScheduleChain,
    WeightSchedule,
)
from piggy_lightning.regularizers.default_prefix_kv import DefaultPrefixKVDrift
from piggy_lightning.regularizers.hidden_drift import HiddenStateDrift
from piggy_lightning.regularizers.kl import KLToReference, RetainKL
from piggy_lightning.regularizers.kv_drift import KVDrift, SharedReferenceKVDrift
from piggy_lightning.regularizers.prefix_kv import PerRowPrefixKVDrift, PrefixKVDrift

__all__ = [
    "ActiveWindow",
    "DefaultPrefixKVDrift",
    "ForwardRecord",
    "Hinge",
    "HiddenStateDrift",
    "KLToReference",
    "KVDrift",
    "LinearWarmup",
    "PerRowPrefixKVDrift",
    "PrefixKVDrift",
    "Regularizer",
    "RegularizerContext",
    "RetainKL",
    "ScheduleChain",
    "SharedReferenceKVDrift",
    "WeightSchedule",
]
