"""TReFT on the template's default prefix whatever prefix the training rows carry (e.g. an inoculation prompt).

``PrefixKVDrift`` reads the policy's prefix keys and values from the training batch, so every row must start with
the default prefix. Rows trained under another system prompt (``piggy_lightning.data.Inoculation``) do not, while
the evaluation still asks under the default one: :class:`DefaultPrefixKVDrift` holds that test-time prefix near the
initial model's by running the policy on it alone, as a batch of its own (``Regularizer.inputs``), against the
reference cached once at set-up. ``PerRowPrefixKVDrift`` is the other choice: each row's own prefix.
"""

from __future__ import annotations

import torch
from torch import Tensor

from piggy_lightning.regularizers.prefix_kv import PrefixKVDrift


class DefaultPrefixKVDrift(PrefixKVDrift):
    """TReFT on the default (test-time) prefix, computed on that prefix alone every step, whatever the batch holds.

    The penalty is ``PrefixKVDrift``'s: the relative K/V drift of the template's default prefix (P tokens), against
    the initial model's keys and values cached once at set-up (no reference forward during training, no frozen
    copy under full finetuning). Its policy side is one extra ``(1, P)`` policy forward per step instead of the
    first P positions of the training rows, which need not start with that prefix. By causality that forward's keys
    and values equal those of any row that does start with it, so on default-prompt rows the penalty and its
    gradient are ``PrefixKVDrift``'s (tested). A class of its own rather than a mode of ``PrefixKVDrift``
    because it runs another forward on other inputs.

    Args:
        weight: The regularization strength lambda.
        name: Metric name (``train/reg/<name>``); default ``prefix_kv``.
        layers: Decoder layers to regularize (negative counts from the end); None means all layers.
        source: ``kv``, ``kv_normed`` or ``hidden``, as for ``PrefixKVDrift``.
        schedule: How the weighted penalty enters the loss over training (hinge, window, warm-up); None: always.
    """

    def inputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The default prefix as a one-row batch ``(1, P)`` on the training batch's device."""
        if self.prefix_ids is None:
            raise RuntimeError(f"regularizer {self.name!r}: inputs() before setup()")
        ids = self.prefix_ids.to(batch["input_ids"].device)[None]  # (1, P)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
