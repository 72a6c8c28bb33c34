"""``source: kv_normed``: TReFT on the keys after Qwen3's per-head ``k_norm`` (what enters RoPE and the cache)."""

import pytest
import torch

from piggy_lightning.forward import run_forward
from piggy_lightning.modeling import load_causal_lm
from piggy_lightning.reference import FrozenCopyReference
from piggy_lightning.regularizers import ForwardRecord, KVDrift
from piggy_lightning.sites import record_kv
from tests.fixtures.tiny import save_tiny


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("tiny_qwen3"), template="qwen25", arch="qwen3"))


def test_normed_keys_equal_k_norm_of_k_proj_computed_by_hand(tiny_qwen3):
    model = load_causal_lm(tiny_qwen3).eval()
    ids = torch.tensor([[3, 7, 11, 5]])  # (1, T)
    with torch.no_grad(), record_kv(model, normed_keys=True) as (keys, _):
        model(input_ids=ids)
    attn, layer = model.model.layers[0].self_attn, model.model.layers[0]
    with torch.no_grad():
        x = layer.input_layernorm(model.model.embed_tokens(ids))  # (1, T, H)
        by_hand = attn.k_norm(attn.k_proj(x).view(1, 4, -1, attn.head_dim)).flatten(2)  # (1, T, n_kv * d)
    torch.testing.assert_close(keys[0], by_hand)
    with torch.no_grad(), record_kv(model) as (raw, _):
        model(input_ids=ids)
    torch.testing.assert_close(raw[0], attn.k_proj(x).detach())
    assert not torch.allclose(raw[0], keys[0])


def test_a_finetuned_k_norm_drifts_normed_keys_only(tiny_qwen3):
    """Change only layer 0's k_norm weight: its k_proj outputs and values stay put (drift 0 with ``kv``) while the
    keys that reach the cache move (drift > 0 with ``kv_normed``)."""
    policy = load_causal_lm(tiny_qwen3)
    reference = FrozenCopyReference(policy)
    with torch.no_grad():
        policy.model.layers[0].self_attn.k_norm.weight.mul_(1.5)
    batch = {"input_ids": torch.tensor([[3, 7, 11, 5]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    batch.update({f"{n}_mask": torch.tensor([[n == "query"] * 4]) for n in ("prefix", "query", "postfix")})
    drifts = {}
    for source in ("kv", "kv_normed"):
        reg = KVDrift(positions="query", layers=[0], source=source)
        need = reg.needs
        drifts[source] = reg(batch, run_forward(policy, batch, need), reference.forward(batch, need)).item()
    assert drifts["kv"] == pytest.approx(0.0, abs=1e-10)
    assert drifts["kv_normed"] == pytest.approx(1.5**2 - 2 * 1.5 + 1, rel=1e-4)  # ||1.5k - k||^2 / ||k||^2 = 0.25


def test_kv_normed_refuses_models_without_k_norm_and_mixed_sources(tiny_qwen, tiny_qwen3):
    with pytest.raises(TypeError, match="no self_attn.k_norm"):
        with record_kv(load_causal_lm(tiny_qwen), normed_keys=True):
            pass
    batch = {"input_ids": torch.tensor([[3, 7]]), "attention_mask": torch.ones(1, 2, dtype=torch.long)}
    with pytest.raises(ValueError, match="before or after k_norm"):
        run_forward(load_causal_lm(tiny_qwen3), batch, frozenset({"kv", "kv_normed"}))
    assert isinstance(ForwardRecord(logits=torch.zeros(1)), ForwardRecord)
