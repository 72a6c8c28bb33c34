"""Task vectors of finished runs and their per-layer cosine similarity (paper Fig. 8).

A run's task vector is what finetuning added to the weights: ``W_finetuned - W_initial`` for full finetuning, and
``scale * B @ A`` per adapted matrix for LoRA (``scale = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA), read
from the run's ``last.ckpt``, which holds exactly the trainable tensors (``PiggyModule.on_save_checkpoint``). The
paper compares the task vectors of SFT, data interleaving and TReFT layer by layer: TReFT's update points elsewhere
than SFT's in the layers that carry the shared prefix. Per layer the vector is every parameter of that decoder
block flattened and concatenated; weights outside the blocks (embeddings, final norm) form the ``other`` entry.

Run ``python -m piggy_lightning.analysis.task_vectors RUN_A RUN_B`` for a table.
"""

from __future__ import annotations

import argparse
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])\.[^.]+\.weight$")
Group = int | str  # a decoder layer index, or "other"


def _group(name: str) -> Group:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else "other"


def task_vector_from_state(
    state: dict[str, Tensor], lora: dict[str, Any] | None, initial: dict[str, Tensor] | None = None
) -> dict[Group, Tensor]:
    """Per-layer flattened task vectors from a checkpoint's trainable ``state`` (``policy.``-prefixed names).

    Args:
        state: The checkpoint's ``state_dict``.
        lora: The run's LoRA settings (``hyper_parameters["lora"]``: ``r``, ``alpha``, ``use_rslora``), or None for
            full finetuning.
        initial: The initial model's ``state_dict`` (unprefixed, as ``model.state_dict()``); full finetuning only.
    """
    parts: dict[Group, list[tuple[str, Tensor]]] = defaultdict(list)
    if lora is not None:
        scale = lora["alpha"] / (math.sqrt(lora["r"]) if lora.get("use_rslora") else lora["r"])
        pairs: dict[str, dict[str, Tensor]] = defaultdict(dict)
        for name, tensor in state.items():
            if match := _LORA.match(name):
                pairs[match["module"]][match["side"]] = tensor.float()
        if not pairs:
            raise ValueError("the checkpoint holds no LoRA A/B tensors, but the run's hyper-parameters say LoRA")
        for module, ab in pairs.items():
            if set(ab) != {"A", "B"}:
                raise ValueError(f"LoRA module {module} lacks its {'A' if 'A' not in ab else 'B'} matrix")
            parts[_group(module)].append((module, (scale * ab["B"] @ ab["A"]).flatten()))  # (out, r) @ (r, in)
    else:
        if initial is None:
            raise ValueError("full finetuning: the task vector needs the initial weights")
        for name, tensor in state.items():
            base_name = name.removeprefix("policy.")
            if base_name not in initial:
                raise KeyError(f"checkpoint tensor {name} has no counterpart {base_name!r} in the initial model")
            parts[_group(base_name)].append((name, (tensor.float() - initial[base_name].float()).flatten()))
    if not parts:
        raise ValueError("the checkpoint holds no trainable tensors: nothing was finetuned")
    return {g: torch.cat([t for _, t in sorted(items, key=lambda x: x[0])]) for g, items in parts.items()}


def load_task_vector(run_dir: str | Path) -> dict[Group, Tensor]:
    """The task vector of a run directory (``<run>/checkpoints/last.ckpt``; its initial model loaded by name)."""
    run_dir = Path(run_dir)
    path = run_dir / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the run has no final checkpoint to read a task vector from")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    hp = checkpoint.get("hyper_parameters") or {}
    initial = None
    if hp.get("lora") is None:
        from piggy_lightning.modeling import load_causal_lm

        model = load_causal_lm(hp["model_name_or_path"], hp.get("dtype", "float32"), hp.get("gguf_file"))
        initial = model.state_dict()
    return task_vector_from_state(checkpoint["state_dict"], hp.get("lora"), initial)


def layer_cosines(a: dict[Group, Tensor], b: dict[Group, Tensor]) -> dict[Group, float]:
    """Cosine similarity of two task vectors per layer (and ``other``); the groups must match."""
    if a.keys() != b.keys():
        raise ValueError(f"the runs adapted different layers: {sorted(map(str, a.keys() ^ b.keys()))}")
    out = {}
    for group in sorted(a, key=lambda g: (isinstance(g, str), g)):
        if a[group].shape != b[group].shape:
            raise ValueError(f"layer {group}: task vectors of shapes {a[group].shape} and {b[group].shape} differ")
        out[group] = float(torch.nn.functional.cosine_similarity(a[group], b[group], dim=0))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Per-layer cosine similarity of two runs' task vectors (Fig. 8).")
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    args = parser.parse_args(argv)
    cosines = layer_cosines(load_task_vector(args.run_a), load_task_vector(args.run_b))
    print("layer  cosine")
    for group, value in cosines.items():
        print(f"{group!s:>5}  {value:.4f}")


if __name__ == "__main__":
    main()
