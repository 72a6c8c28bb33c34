"""The training batch: right-padded token ids with labels and span masks, and the sizes ``ThroughputMonitor`` reads.

A batch is a ``dict[str, Tensor]`` with right padding:

* ``input_ids``, ``attention_mask``: ``(B, T)``;
* ``labels``: ``(B, T)`` token ids on response tokens, -100 elsewhere (loss on responses only);
* ``prefix_mask``, ``query_mask``, ``postfix_mask``, ``response_mask``: ``(B, T)`` booleans (see ``spans.py``).

Callbacks that touch batches replace values by key and never rebind the dict.
"""

from __future__ import annotations

import torch
from torch import Tensor

from piggy_lightning.spans import SPAN_NAMES, TokenizedChat


def collate(examples: list[TokenizedChat], pad_id: int) -> dict[str, Tensor]:
    """Right-pad tokenized chats into a batch dict (see module docstring)."""
    width = max(len(e.input_ids) for e in examples)
    batch = {
        "input_ids": torch.full((len(examples), width), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros(len(examples), width, dtype=torch.long),
        "labels": torch.full((len(examples), width), -100, dtype=torch.long),
    }
    batch.update({f"{name}_mask": torch.zeros(len(examples), width, dtype=torch.bool) for name in SPAN_NAMES})
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids = torch.tensor(example.input_ids, dtype=torch.long)
        batch["input_ids"][row, :n] = ids
        batch["attention_mask"][row, :n] = 1
        for name in SPAN_NAMES:
            batch[f"{name}_mask"][row, :n] = torch.tensor(example.mask(name))
        response = batch["response_mask"][row, :n]
        batch["labels"][row, :n] = torch.where(response, ids, torch.full_like(ids, -100))
    return batch


def batch_size(batch: dict[str, Tensor]) -> int:
    """Examples in a batch (``ThroughputMonitor``'s ``batch_size_fn``)."""
    return batch["input_ids"].size(0)


def batch_tokens(batch: dict[str, Tensor]) -> int:
    """Non-padding tokens in a batch (``ThroughputMonitor``'s ``length_fn``: its items are tokens)."""
    return int(batch["attention_mask"].sum())
