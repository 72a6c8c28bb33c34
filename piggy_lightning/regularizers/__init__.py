"""Regularizers added to the cross-entropy, chosen by class path in ``model.regularizers``.

| class | penalty | source |
|---|---|---|
| ``PrefixKVDrift`` | relative K/V drift of the prefix, reference cached once (TReFT) | Zhao et al. 2026, Sec. 5.1 |
| ``KVDrift`` | relative K/V drift at query / postfix / prompt positions | Zhao et al. 2026, Table 3, 4 |
| ``KLToReference`` | KL(reference ‖ policy) on train or retain batches | Zhao et al. 2026, App. D.4 |
| ``HiddenStateDrift`` | mean squared residual-stream distance (LDIFS-style) | Mukhoti et al. 2024; Kaczér et al. 2025 |
"""

from piggy_lightning.forward import ForwardRecord
from piggy_lightning.regularizer import Regularizer
from piggy_lightning.regularizers.hidden_drift import HiddenStateDrift
from piggy_lightning.regularizers.kl import KLToReference
from piggy_lightning.regularizers.kv_drift import KVDrift, PrefixKVDrift

__all__ = ["ForwardRecord", "HiddenStateDrift", "KLToReference", "KVDrift", "PrefixKVDrift", "Regularizer"]
