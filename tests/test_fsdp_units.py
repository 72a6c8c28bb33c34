"""The FSDP2 construction's pieces in one process (``piggy_lightning/fsdp.py``): the shard plan, the meta-device
skeleton, and a world-size-1 gloo group in which the sharded build must equal the plain one (weights, the rotary
buffers the state dict leaves out, the cached prefix reference, the loss, the checkpoint filter and the export).
The two-process run is ``tests/test_fsdp.py``."""

import json

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from piggy_lightning.callbacks import ExportPretrained
from piggy_lightning.data import ChatSFTDataModule
from piggy_lightning.fsdp import gather_state_dict, is_sharded, load_sharded, shard_plan
from piggy_lightning.modeling import LoraSpec, causal_lm_skeleton, load_causal_lm
from piggy_lightning.module import PiggyModule
from piggy_lightning.regularizers import PrefixKVDrift
from piggy_lightning.sites import decoder_layers


@pytest.fixture
def mesh(tmp_path):
    """A (1, 1) (data, tensor) CPU mesh over a one-process gloo group, as ModelParallelStrategy builds it."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    dist.destroy_process_group()


def test_shard_plan_is_every_decoder_layer_then_the_root(tiny_qwen):
    from peft import get_peft_model

    model = get_peft_model(load_causal_lm(tiny_qwen), LoraSpec(r=4).to_peft())
    plan = shard_plan(model)
    assert plan[:-1] == list(decoder_layers(model)) and len(plan) == 3 and plan[-1] is model


def test_skeleton_is_the_loaded_model_without_memory(tiny_qwen):
    loaded = load_causal_lm(tiny_qwen, "bfloat16").state_dict()
    with torch.device("meta"):
        skeleton = causal_lm_skeleton(tiny_qwen, "bfloat16").state_dict()
    assert {k: (v.shape, v.dtype) for k, v in skeleton.items()} == {k: (v.shape, v.dtype) for k, v in loaded.items()}
    assert all(v.is_meta for v in skeleton.values())
    with torch.device("meta"):  # "auto" keeps the checkpoint's own dtype (float32 here), as from_pretrained does
        assert next(causal_lm_skeleton(tiny_qwen, "auto").parameters()).dtype == torch.float32


def test_load_sharded_in_one_process_equals_the_plain_load(tiny_qwen, mesh):
    plain = load_causal_lm(tiny_qwen)
    sharded = load_sharded(lambda: load_causal_lm(tiny_qwen), lambda: causal_lm_skeleton(tiny_qwen), mesh, "cpu")
    assert is_sharded(sharded) and not is_sharded(plain)
    full, expected = gather_state_dict(sharded), plain.state_dict()
    assert sorted(full) == sorted(expected) and all(torch.equal(full[k], expected[k]) for k in full)
    # non-persistent buffers (rotary inv_freq) are broadcast separately: else uninitialised memory
    for name, buffer in plain.named_buffers():
        torch.testing.assert_close(sharded.get_buffer(name), buffer, rtol=0, atol=0)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(sharded(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_gather_state_dict_selects_names_without_a_process_group(tiny_qwen):
    model = load_causal_lm(tiny_qwen)
    out = gather_state_dict(model, {"lm_head.weight"})
    assert list(out) == ["lm_head.weight"] and torch.equal(out["lm_head.weight"], model.lm_head.weight)


def _module(name: str) -> PiggyModule:
    return PiggyModule(name, lora=LoraSpec(r=4, alpha=8), regularizers=[PrefixKVDrift(weight=5.0)])


def test_sharded_module_equals_the_unsharded_one(tiny_qwen, chat_file, mesh, tmp_path):
    """Same seed, same LoRA init; the prefix reference computed after sharding; same loss; a sharded (DTensor)
    checkpoint keeps every tensor (Lightning's sharded loader needs them), a full one only the adapter; the export
    writes the same files."""
    torch.manual_seed(0)
    plain = _module(tiny_qwen)
    plain.configure_model()
    torch.manual_seed(0)
    sharded = _module(tiny_qwen)
    sharded._device_mesh = mesh  # what ModelParallelStrategy sets before configure_model
    sharded.configure_model()
    assert is_sharded(sharded.policy) and not is_sharded(plain.policy)
    full, expected = gather_state_dict(sharded.policy), plain.policy.state_dict()
    assert all(torch.equal(full[k], expected[k]) for k in expected)
    (reg,), (plain_reg,) = sharded.regularizers, plain.regularizers
    torch.testing.assert_close(reg.ref_keys, plain_reg.ref_keys)
    torch.testing.assert_close(reg.ref_values, plain_reg.ref_values)
    data = ChatSFTDataModule(chat_file, tokenizer=tiny_qwen, batch_size=4, val_fraction=0.0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    torch.testing.assert_close(sharded._losses(batch)["loss"], plain._losses(batch)["loss"])

    checkpoint = {"state_dict": sharded.state_dict()}
    assert any(isinstance(v, DTensor) for v in checkpoint["state_dict"].values())
    sharded.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == set(sharded.state_dict())  # kept whole
    checkpoint = {"state_dict": gather_state_dict(sharded)}  # save_distributed_checkpoint: false
    sharded.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == set(sharded.trainable_parameter_names)

    ExportPretrained.export(sharded, tmp_path / "sharded", write=True)
    ExportPretrained.export(plain, tmp_path / "plain", write=True)
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("sharded", "plain"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    base = [json.loads((tmp_path / d / "piggy_base.json").read_text()) for d in ("sharded", "plain")]
    assert base[0] == base[1]


class _Mesh:
    """A stand-in for a (1, 2) (data, tensor) mesh, ModelParallelStrategy's default on 2 devices of one node, and
    for its 1-D sub-meshes (``size()``)."""

    def __init__(self, shape: tuple[int, ...] = (1, 2)) -> None:
        self.shape = shape

    def __getitem__(self, name: str) -> "_Mesh":
        return _Mesh((self.shape[("data_parallel", "tensor_parallel").index(name)],))

    def size(self) -> int:
        return self.shape[0]


def test_tensor_parallel_meshes_are_refused(tiny_qwen):
    module = _module(tiny_qwen)
    module._device_mesh = _Mesh()
    with pytest.raises(ValueError, match="tensor_parallel_size: 1"):
        module.configure_model()


def test_fsdp_overlay_stacks_on_a_real_config(tmp_path):
    """configs/real/overlays/fsdp.yaml (not in tests/test_configs.py, which globs configs/real/*.yaml only) sets
    ModelParallelStrategy over 8 devices, all of them data parallel, and nothing else."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from piggy_lightning.cli import PiggyCLI

    real = "configs/real/llama31_8b_treft_legal.yaml"
    args = [
        "--config",
        real,
        "--config",
        "configs/real/overlays/fsdp.yaml",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    cli = PiggyCLI(run=False, args=args)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, ModelParallelStrategy) and cli.trainer.num_devices == 8
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (8, 1)
    assert cli.model.policy is None and cli.model.lora.r == 8  # still the real config's LoRA recipe, no weights
