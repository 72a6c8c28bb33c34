"""Identities of what an evaluation record answers: the weights, and the prompt plus decoding it was generated with.

A saved response may be reused only by a run that would generate exactly it. Before this module, records were
keyed by model name and training step, so a second debug run on other data, or a second checkpoint evaluated with
``main.py test`` (always "step 0"), silently got the first one's answers. Now every record key carries:

* :func:`weights_digest` of the trainable weights (the LoRA adapter, or the whole policy under full finetuning),
  which changes whenever training changed anything, whatever the step counter says;
* :func:`prompt_digest` of the exact prompt tokens (question text, system message, template, perturbation) and of
  every decoding setting that changes the output.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

# Above this many trainable elements (about 0.5 GB of fp32) the digest is a checksum computed on the weights' own
# device instead of hashing their bytes on the CPU: hashing a fully finetuned 8B policy would copy 16 GB per
# evaluation. The checksum weights every element by its position, so any change of any element changes it.
_BYTES_LIMIT = 2**27


def weights_digest(model: nn.Module) -> str:
    """A short hex digest of ``model``'s trainable parameters (names, shapes, dtypes and values).

    Args:
        model: The policy (peft-wrapped or not); parameters with ``requires_grad`` are the trainable state. A model
            with none is digested whole (e.g. a frozen model evaluated as is).
    """
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        params = list(model.named_parameters())
    # a sharded parameter (FSDP2's DTensor) is digested as the shard this rank holds; the ranks' digests are then
    # combined in rank order (callbacks/sharding.py), so the digest names the sharded run's weights
    params = [(n, p.to_local() if isinstance(p, DTensor) else p) for n, p in params]
    h = hashlib.sha256()
    large = sum(p.numel() for _, p in params) > _BYTES_LIMIT
    with torch.no_grad():
        for name, p in params:
            h.update(f"{name}|{tuple(p.shape)}|{p.dtype};".encode())
            if large:
                flat = p.detach().flatten().double()  # (N,)
                position = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64)
                sums = torch.stack([flat.sum(), (flat * position.remainder(7919)).sum(), flat.abs().sum()])
                h.update(sums.cpu().numpy().tobytes())
            else:
                h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def prompt_digest(input_ids: Sequence[int], decoding: dict[str, Any]) -> str:
    """A short hex digest of one prompt's token ids and the decoding settings that shape its response.

    Args:
        input_ids: The prompt exactly as generated from (after any intervention's ``transform``).
        decoding: Settings such as temperature, top_p, max_new_tokens and seed (JSON-serialisable).
    """
    payload = json.dumps({"ids": list(input_ids), "decoding": decoding}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]
