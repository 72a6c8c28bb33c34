"""FSDP2 construction of causal LMs under Lightning's ``ModelParallelStrategy``, and gathering them back.

Under ``trainer.strategy: lightning.pytorch.strategies.ModelParallelStrategy`` (with ``tensor_parallel_size: 1``)
Lightning gives the module a device mesh and leaves the parallelization to ``configure_model``;
:class:`~piggy_lightning.module.PiggyModule` then builds every network through :func:`load_sharded`: all ranks build
the model's skeleton on the meta device (no memory), shard it with ``fully_shard`` per decoder layer and once at the
root (:func:`shard_plan`), and only global rank 0 reads the weights, which ``set_model_state_dict`` broadcasts
shard by shard. So a node holds one full copy of the weights in CPU memory while loading (rank 0's), not one per
rank, and each GPU only ever holds its shards plus one gathered layer.

The reverse is :func:`gather_state_dict`, a collective that hands rank 0 the full tensors (of the trainable ones
only, for an adapter) for ``save_pretrained``. ``docs/distributed.md`` explains how to run it and what it costs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from piggy_lightning.sites import decoder_layers


def shard_plan(model: nn.Module) -> list[nn.Module]:
    """The modules ``fully_shard`` is applied to, in order: every decoder layer, then the whole model.

    One FSDP group per decoder layer is what makes sharding pay: a forward gathers one layer's weights at a time
    (and frees them after it, ``reshard_after_forward``). The root group holds the rest (embeddings, final norm,
    LM head; a tied LM head shares the embedding's one parameter). LoRA tensors sit inside their layer's group:
    FSDP2 allows frozen and trainable parameters in one group, so no peft-specific wrapping is needed.
    """
    return [*decoder_layers(model), model]


def apply_shard_plan(model: nn.Module, mesh) -> nn.Module:
    """Shard ``model`` in place over the 1-D data-parallel ``mesh`` following :func:`shard_plan`; returns it."""
    from torch.distributed.fsdp import fully_shard

    for module in shard_plan(model):
        fully_shard(module, mesh=mesh)
    return model


def check_strategy(strategy) -> None:
    """Refuse ``FSDPStrategy`` (FSDP1): it wraps the model after ``configure_model``, where the regularizers'
    one-off reference forwards already ran on the whole, unsharded model on every rank."""
    from lightning.pytorch.strategies import FSDPStrategy

    if isinstance(strategy, FSDPStrategy):
        raise ValueError(
            "FSDPStrategy wraps the model after configure_model, where the regularizers' reference is already "
            "computed on the whole model; use lightning.pytorch.strategies.ModelParallelStrategy (FSDP2 per "
            "decoder layer, docs/distributed.md, configs/real/overlays/fsdp.yaml)"
        )


def data_parallel_mesh(device_mesh):
    """The 1-D data-parallel mesh of ``ModelParallelStrategy``'s 2-D (data, tensor) mesh, refusing tensor
    parallelism (not implemented here), which is also Lightning's default: data 1 x tensor N on one node."""
    if device_mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"ModelParallelStrategy gave a {tuple(device_mesh.shape)} (data, tensor) mesh; PiggyModule shards with "
            "FSDP2 only: set data_parallel_size to the number of devices and tensor_parallel_size: 1"
        )
    return device_mesh["data_parallel"]


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` holds DTensor (sharded) parameters."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _non_persistent_buffers(model: nn.Module) -> list[str]:
    """Buffers ``state_dict`` leaves out (e.g. rotary ``inv_freq``): the broadcast must carry them separately,
    since on the other ranks they exist only as the meta skeleton's uninitialised memory."""
    saved = set(model.state_dict())
    return [name for name, _ in model.named_buffers() if name not in saved]


def load_sharded(
    load: Callable[[], nn.Module],
    skeleton: Callable[[], nn.Module],
    mesh,
    device: torch.device,
) -> nn.Module:
    """Build a model sharded over ``mesh`` with weights read on global rank 0 only and broadcast to the others.

    A collective: every rank of ``mesh`` calls it with the same arguments.

    Args:
        load: Builds the model with its weights (``from_pretrained``, then any peft wrapping); called on rank 0 only,
            on the CPU.
        skeleton: Builds the same module tree without weights; called under ``torch.device("meta")`` on every rank.
            Its parameter names, shapes and dtypes must be ``load``'s.
        mesh: The 1-D data-parallel device mesh (``PiggyModule.device_mesh["data_parallel"]``).
        device: This rank's device (the strategy's ``root_device``).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    with torch.device("meta"):
        model = skeleton()
    buffers = _non_persistent_buffers(model)
    full: dict[str, Tensor] = {}
    extra: dict[str, Tensor] = {}
    if dist.get_rank() == 0:
        source = load()
        full = source.state_dict()
        extra = dict(source.named_buffers())
        missing = set(model.state_dict()) ^ set(full)
        if missing:
            raise ValueError(
                f"the skeleton and the loaded model differ in {len(missing)} tensors: {sorted(missing)[:3]}"
            )
        del source
    # requires_grad is part of the skeleton (peft freezes the base there too); fully_shard keeps it per parameter
    apply_shard_plan(model, mesh)
    model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full, options=options)
    for name in buffers:
        buffer = model.get_buffer(name)
        if dist.get_rank() == 0:
            buffer.copy_(extra[name])
        dist.broadcast(buffer, src=0)
    return model


def gather_state_dict(model: nn.Module, names: set[str] | None = None) -> dict[str, Tensor]:
    """Full (unsharded) CPU copies of ``model``'s state-dict tensors on global rank 0; an empty dict on other ranks.

    A collective: every rank calls it. Tensors are gathered one at a time (each rank holds one full tensor at most),
    so an adapter export gathers only the adapter when ``names`` selects it.

    Args:
        model: A sharded (or plain) model.
        names: The state-dict keys to gather (e.g. the trainable parameters'); None gathers all of them.
    """
    from torch.distributed.tensor import DTensor

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    out: dict[str, Tensor] = {}
    for name, value in model.state_dict().items():
        if names is not None and name not in names:
            continue
        full = value.full_tensor() if isinstance(value, DTensor) else value
        if rank0:  # a copy, never a view of the live weights, which training goes on changing
            out[name] = full.detach().to("cpu", copy=True)
    return out
