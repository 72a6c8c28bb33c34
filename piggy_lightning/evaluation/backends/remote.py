"""What the backends that generate outside this process's forward share (:mod:`.server`, :mod:`.vllm`): which
weights to serve (the engine's base, or the base plus the policy's LoRA adapter exported to a directory), each
item's seed.

Such an engine serves its own weights, so the policy must be shown to be those weights, or the base plus an adapter
the engine can load: a trained policy generated as the base would record the base model's answers as the trained
model's. :func:`adapter_to_serve` decides, and refuses what cannot be served (full finetuning, merged adapters).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from piggy_lightning.evaluation.backends.base import BackendMismatch
from piggy_lightning.evaluation.decoding import Decoding, WorkItem, stable_seed
from piggy_lightning.evaluation.identity import weights_digest


def adapter_to_serve(model: nn.Module, adapter_id: str | None) -> nn.Module | None:
    """The peft model whose adapter turns the base weights into the policy, or None when the policy is the base.

    A LoRA update is zero when every adapted layer's ``lora_B`` (or ``lora_A``) is all zeros (peft initialises B to
    zero, so the policy at step 0 is the base). A model without LoRA layers is the base only when the caller says
    so (``adapter_id`` None): its weights cannot be compared with the server's.

    Raises:
        BackendMismatch: The policy has no LoRA layers and names a trained state (full finetuning), or its adapter
            cannot be checked (merged into the weights, ``modules_to_save``).
    """
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers:
        if adapter_id is None:
            return None
        raise BackendMismatch(
            f"the policy has no LoRA adapter and names a trained state ({adapter_id!r}): a server serves its own "
            "weights, so full finetuning cannot be generated there; export the finetuned model and serve it (then "
            "evaluate it as the base, adapter_id None), or use piggy_lightning.evaluation.backends.HFBackend"
        )
    configs = getattr(model, "peft_config", {})
    if any(getattr(c, "modules_to_save", None) for c in configs.values()) or any(m.merged for m in layers):
        raise BackendMismatch("the policy's adapter is merged or has modules_to_save: it cannot be served as LoRA")

    def nonzero(layer: LoraLayer) -> bool:
        pairs = [(layer.lora_A, layer.lora_B), (layer.lora_embedding_A, layer.lora_embedding_B)]
        for a_dict, b_dict in pairs:
            for name in set(a_dict) & set(b_dict):
                a, b = a_dict[name], b_dict[name]
                a, b = (getattr(a, "weight", a), getattr(b, "weight", b))
                if bool(a.detach().any()) and bool(b.detach().any()):
                    return True
        return False

    return model if any(nonzero(m) for m in layers) else None


def export_adapter(model: nn.Module, root: Path) -> tuple[str, Path]:
    """Save ``model``'s adapter as ``root/piggy-<digest>`` (once per content) and return (name, directory).

    The name is the weights digest that also names the evaluated state in every record key
    (:func:`~piggy_lightning.evaluation.identity.weights_digest`), so the same weights always load under the same
    name (a server's "already loaded" is then correct) and different weights never do."""
    name = f"piggy-{weights_digest(model)}"
    path = root / name
    if not (path / "adapter_config.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
        model.save_pretrained(tmp)
        try:
            os.replace(tmp, path)  # atomic: a server never reads a half-written adapter
        except OSError:  # another rank won the race with the same content
            shutil.rmtree(tmp, ignore_errors=True)
    return name, path.resolve()


def request_seed(decoding: Decoding, item: WorkItem) -> int:
    """Each item's seed (a server request carries one): 31 bits, since llama.cpp reads 2**32 - 1 as "random"."""
    return stable_seed(decoding.seed, item.key) & 0x7FFFFFFF
