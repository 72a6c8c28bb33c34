"""Task vectors (paper Fig. 8): full-finetuning deltas and LoRA products, checked against independent paths."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from piggy_lightning.analysis import layer_cosines, task_vector_from_state
from piggy_lightning.modeling import LoraSpec


def _tiny(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def test_full_finetuning_task_vector_is_the_weight_delta_per_layer():
    model = _tiny()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    q0, k1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"
    state = {f"policy.{k}": v.clone() for k, v in initial.items()}
    state[f"policy.{q0}"] += 1.0
    state[f"policy.{k1}"][0, 0] += 3.0
    vectors = task_vector_from_state(state, None, initial)
    assert set(vectors) == {0, 1, "other"}
    assert float(vectors[0].sum()) == pytest.approx(initial[q0].numel())  # every q_proj entry moved by 1
    assert float(vectors[1].abs().sum()) == pytest.approx(3.0) and float(vectors["other"].abs().sum()) == 0.0

    # a second run that moved layer 0 the same way and layer 1 orthogonally; cosines by hand
    other = {k: v.clone() for k, v in state.items()}
    other[f"policy.{k1}"][0, 0] -= 3.0
    other[f"policy.{k1}"][0, 1] += 4.0
    cos = layer_cosines(vectors, task_vector_from_state(other, None, initial))
    assert cos[0] == pytest.approx(1.0) and cos[1] == pytest.approx(0.0, abs=1e-7)
    assert layer_cosines(vectors, vectors)[1] == pytest.approx(1.0)
    scaled = {f"policy.{k}": initial[k] + 2 * (state[f"policy.{k}"] - initial[k]) for k in initial}
    assert layer_cosines(vectors, task_vector_from_state(scaled, None, initial))[0] == pytest.approx(1.0)


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_task_vector_equals_the_merged_weights_minus_the_base(rslora):
    from peft import get_peft_model

    spec = LoraSpec(r=4, alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=rslora)
    base = _tiny()
    initial = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, spec.to_peft())
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()  # B starts at zero; give the adapter an update
    state = {f"policy.{n}": p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    lora = {"r": spec.r, "alpha": spec.alpha, "use_rslora": rslora}
    vectors = task_vector_from_state(state, lora, None)

    merged = model.merge_and_unload().state_dict()  # peft's own arithmetic: an independent path
    adapted = [k for k in initial if k.endswith(("q_proj.weight", "v_proj.weight"))]
    expected = task_vector_from_state({f"policy.{k}": merged[k] for k in adapted}, None, initial)
    assert set(vectors) == {0, 1}
    for layer in (0, 1):
        assert torch.allclose(vectors[layer], expected[layer], atol=1e-5)
    scale = spec.alpha / (math.sqrt(spec.r) if rslora else spec.r)
    a = state["policy.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    b = state["policy.base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"]
    assert torch.allclose(vectors[0][: 16 * 16], (scale * b @ a).flatten(), atol=1e-6)  # q_proj sorts first


def test_a_checkpoint_without_trainable_tensors_or_a_lora_half_fails_loudly():
    with pytest.raises(ValueError, match="no trainable tensors"):
        task_vector_from_state({}, None, {})
    with pytest.raises(ValueError, match="lacks its B matrix"):
        task_vector_from_state(
            {"m.layers.0.q_proj.lora_A.default.weight": torch.ones(2, 2)}, {"r": 2, "alpha": 2}, None
        )
    with pytest.raises(ValueError, match="different layers"):
        layer_cosines({0: torch.ones(2)}, {1: torch.ones(2)})
