"""Regularizer arithmetic and weight schedules on hand-sized tensors (tiny-model checks: test_regularizer_needs.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from piggy_lightning.drift import kv_drift, relative_drift
from piggy_lightning.regularizers import (
    ActiveWindow,
    ForwardRecord,
    HiddenStateDrift,
    Hinge,
    KLToReference,
    KVDrift,
    LinearWarmup,
    PerRowPrefixKVDrift,
    PrefixKVDrift,
    RetainKL,
    ScheduleChain,
    SharedReferenceKVDrift,
)

T = torch.tensor


def _batch(prefix, query, postfix, response, attention=None, input_ids=None):
    """A one-row batch from 0/1 span lists."""
    masks = {
        f"{k}_mask": T([v]).bool()
        for k, v in zip(("prefix", "query", "postfix", "response"), (prefix, query, postfix, response), strict=True)
    }
    n = len(prefix)
    attention = attention or [1] * n
    return {
        "input_ids": T([input_ids or list(range(n))]),
        "attention_mask": T([attention]),
        "labels": T([[7 if r else -100 for r in response]]),
        **masks,
    }


# -- hand-computed arithmetic ------------------------------------------------------------------------------------
def test_kv_drift_on_query_positions_by_hand():
    """Two layers, D = 2; positions: 0 prefix, 1-2 query, 3 padding. Only the query counts.

    layer 0 keys:   ref (0,2),(3,4), cur (0,3),(3,4): [1/4 + 0] / 2 = 1/8
    layer 0 values: ref (1,0),(2,0), cur (2,0),(2,0): [1/1 + 0] / 2 = 1/2
    layer 1 keys:   ref (1,1),(1,1), cur (2,2),(0,0): [2/2 + 2/2] / 2 = 1
    layer 1 values: equal: 0
    L_KV = [(1/8 + 1/2) + (1 + 0)] / 2 = 13/16; weighted with lambda = 2: 13/8.
    The prefix and padding positions carry a drift of 100 that must not leak in.
    """
    big = [10.0, 0.0]
    ref_k = [T([[[1.0, 0], [0, 2], [3, 4], [1, 0]]]), T([[[1.0, 0], [1, 1], [1, 1], [1, 0]]])]
    cur_k = [T([[big, [0, 3], [3, 4], big]]), T([[big, [2, 2], [0, 0], big]])]
    ref_v = [T([[[1.0, 0], [1, 0], [2, 0], [1, 0]]]), T([[[1.0, 0], [5, 5], [6, 6], [1, 0]]])]
    cur_v = [T([[big, [2, 0], [2, 0], big]]), T([[big, [5, 5], [6, 6], big]])]
    batch = _batch([1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0], attention=[1, 1, 1, 0])
    policy = ForwardRecord(logits=torch.zeros(1, 4, 3), keys=cur_k, values=cur_v)
    reference = ForwardRecord(logits=torch.zeros(1, 4, 3), keys=ref_k, values=ref_v)
    reg = KVDrift(weight=2.0, positions="query")
    raw = reg(batch, policy, reference)
    torch.testing.assert_close(raw, T(13 / 16))
    torch.testing.assert_close(reg.weighted(raw, 0.3), T(13 / 8))
    assert reg.name == "kv_query" and reg.needs == {"kv"} and reg.needs_reference
    # a single layer: layer 1 alone gives 1 + 0
    torch.testing.assert_close(KVDrift(positions="query", layers=[-1])(batch, policy, reference), T(1.0))
    # prompt = prefix + query adds position 0, drift |(9,0)|^2 / |(1,0)|^2 = 81 in each of the four means:
    # [(81 + 1/4 + 0)/3 + (81 + 1 + 0)/3 + (81 + 1 + 1)/3 + (81 + 0 + 0)/3] / 2 = 327.25 / 6
    torch.testing.assert_close(KVDrift(positions="prompt")(batch, policy, reference), T(327.25 / 6))


def _prefix_case(cls=PrefixKVDrift):
    """Prefix ids (5, 6); one layer; two rows whose positions 2-3 (query, response) must be ignored.

    ref keys (1,0),(0,1); row 0 keys equal, row 1 keys (2,0),(0,0): drifts 0, 0, 1, 1 -> mean 1/2
    ref values (2,0),(0,2); row 0 (2,1),(0,2), row 1 equal: drifts 1/4, 0, 0, 0 -> mean 1/16
    L_KV = 1/2 + 1/16 = 9/16
    """
    reg = cls(weight=4.0)
    reg.cache(T([5, 6]), T([[[1.0, 0], [0, 1]]]), T([[[2.0, 0], [0, 2]]]))
    junk = [9.0, 9.0]
    keys = T([[[1.0, 0], [0, 1], junk, junk], [[2.0, 0], [0, 0], junk, junk]])  # (B=2, T=4, D=2)
    values = T([[[2.0, 1], [0, 2], junk, junk], [[2.0, 0], [0, 2], junk, junk]])
    batch = {"input_ids": T([[5, 6, 1, 2], [5, 6, 3, 0]]), "attention_mask": T([[1, 1, 1, 1], [1, 1, 1, 0]])}
    return reg, batch, ForwardRecord(logits=torch.zeros(2, 4, 3), keys=[keys], values=[values])


def test_prefix_kv_drift_by_hand_with_hinge_window_and_zero_weight():
    """raw = 9/16 (see _prefix_case); lambda = 4 gives 9/4; hinge 1 gives 5/4; hinge 3 gives 0.

    The active window [0.25, 0.5) switches it off at progress 0.1 and 0.6; lambda = 0 weighs it to 0 while the
    raw value is still computed (and logged by the module).
    """
    reg, batch, policy = _prefix_case()
    raw = reg(batch, policy, None)
    torch.testing.assert_close(raw, T(9 / 16))
    assert not reg.needs_reference
    torch.testing.assert_close(reg.weighted(raw, 0.0), T(9 / 4))
    torch.testing.assert_close(PrefixKVDrift(weight=4.0, schedule=Hinge(1.0)).weighted(raw, 0.0), T(5 / 4))
    torch.testing.assert_close(PrefixKVDrift(weight=4.0, schedule=Hinge(3.0)).weighted(raw, 0.0), T(0.0))
    windowed = PrefixKVDrift(weight=4.0, schedule=ActiveWindow(0.25, 0.5))
    assert [windowed.weighted(raw, p).item() for p in (0.1, 0.3, 0.6)] == [0.0, 2.25, 0.0]
    zero = PrefixKVDrift(weight=0.0)
    torch.testing.assert_close(zero.weighted(raw, 0.5), T(0.0))


def test_weight_schedules_by_hand():
    """raw = 1/2 with lambda = 4, so weight * raw = 2 before any schedule.

    Hinge(0.5): max(2 - 0.5, 0) = 1.5. ActiveWindow(0.2, 1.0) is 0 at progress 0.1 and 2 at 0.2 and at 1.0 (an end
    of 1 keeps the last step). LinearWarmup(end=0.5, start=0.1): ramp (p - 0.1) / 0.4, clamped to [0, 1]:
    p = 0 -> 0, p = 0.2 -> 0.25 * 2 = 0.5, p = 0.3 -> 0.5 * 2 = 1, p = 0.8 -> 2.
    ScheduleChain([LinearWarmup(0.5, 0.1), Hinge(0.5)]) at p = 0.3: max(1 - 0.5, 0) = 0.5; at p = 0.2:
    max(0.5 - 0.5, 0) = 0; the other order ([Hinge, LinearWarmup]) at p = 0.2: 0.25 * 1.5 = 0.375.
    Every schedule applies to every regularizer through the base class (here KL and the hidden-state drift).
    """
    raw = T(0.5)

    def at(schedule, p):
        return KLToReference(weight=4.0, schedule=schedule).weighted(raw, p).item()

    assert at(Hinge(0.5), 0.0) == pytest.approx(1.5)
    assert [at(ActiveWindow(0.2, 1.0), p) for p in (0.1, 0.2, 1.0)] == [0.0, 2.0, 2.0]
    warmup = LinearWarmup(end=0.5, start=0.1)
    assert [at(warmup, p) for p in (0.0, 0.2, 0.3, 0.8)] == pytest.approx([0.0, 0.5, 1.0, 2.0])
    chain = ScheduleChain([LinearWarmup(end=0.5, start=0.1), Hinge(0.5)])
    assert [at(chain, p) for p in (0.2, 0.3)] == pytest.approx([0.0, 0.5])
    assert at(ScheduleChain([Hinge(0.5), LinearWarmup(end=0.5, start=0.1)]), 0.2) == pytest.approx(0.375)
    hidden = HiddenStateDrift(weight=4.0, schedule=LinearWarmup(end=0.5))
    assert hidden.weighted(raw, 0.25).item() == pytest.approx(1.0)  # ramp 0.5
    with pytest.raises(ValueError, match="threshold"):
        Hinge(-1.0)
    with pytest.raises(ValueError, match="start < end"):
        ActiveWindow(0.5, 0.5)
    with pytest.raises(ValueError, match="start < end"):
        LinearWarmup(end=0.0)
    with pytest.raises(ValueError, match="at least one"):
        ScheduleChain([])


def test_prefix_mismatch_and_empty_spans_raise_clear_errors():
    reg, batch, policy = _prefix_case()
    batch["input_ids"][1, 0] = 4
    with pytest.raises(ValueError, match=r"rows \[1\] do not start with the template's default prefix"):
        reg(batch, policy, None)
    with pytest.raises(ValueError, match="empty prefix"):
        PrefixKVDrift().cache(T([], dtype=torch.long), torch.zeros(1, 0, 2), torch.zeros(1, 0, 2))
    empty = _batch([1, 1], [0, 0], [0, 0], [0, 0])
    record = ForwardRecord(logits=torch.zeros(1, 2, 3), keys=[torch.ones(1, 2, 2)], values=[torch.ones(1, 2, 2)])
    with pytest.raises(ValueError, match="no query tokens"):
        KVDrift(positions="query")(empty, record, record)
    with pytest.raises(ValueError, match="no response tokens"):
        KLToReference(positions="response")(empty, record, record)
    with pytest.raises(ValueError, match="no response tokens"):
        RetainKL("x.jsonl", positions="response")(empty, record, record)
    with pytest.raises(ValueError, match="no postfix tokens"):
        SharedReferenceKVDrift(positions="postfix")(empty, record, record)
    with pytest.raises(ValueError, match="layers"):
        KVDrift(layers=[3])(_batch([0, 1], [1, 0], [0, 0], [0, 0]), record, record)
    # a mismatched row without a prefix span: nothing of its own to regularize
    per_row, batch, policy = _prefix_case(PerRowPrefixKVDrift)
    batch["input_ids"][1, 0] = 4
    batch.update({f"{k}_mask": torch.zeros(2, 4, dtype=torch.bool) for k in ("prefix", "query", "postfix")})
    assert per_row.reference_rows(batch).tolist() == [1]
    with pytest.raises(ValueError, match="no prefix tokens"):
        per_row(batch, policy, policy)
    with pytest.raises(ValueError, match="shared reference needs positions"):
        SharedReferenceKVDrift(positions="query")


def test_kl_to_reference_by_hand():
    """Vocabulary 2. At position 1 the policy is uniform and the reference is (1/4, 3/4):
    KL(ref || policy) = 1/4 ln((1/4)/(1/2)) + 3/4 ln((3/4)/(1/2)). Position 0 agrees (KL 0).

    ``response`` looks only at position 1 (it predicts the response token at 2); ``all`` averages positions 0
    and 1 (position 2 is padding): half the value.
    """
    kl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    batch = _batch([1, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 1], attention=[1, 1, 0])
    policy = ForwardRecord(logits=T([[[1.0, 2.0], [0.0, 0.0], [5.0, -5.0]]]))
    reference = ForwardRecord(logits=T([[[1.0, 2.0], [0.0, math.log(3.0)], [-5.0, 5.0]]]))
    per_token = {"reduction": "token_mean"}
    torch.testing.assert_close(KLToReference(positions="response", **per_token)(batch, policy, reference), T(kl))
    torch.testing.assert_close(KLToReference(positions="all", **per_token)(batch, policy, reference), T(kl / 2))
    # the default is the release's scale: divided by the vocabulary size too (V = 2)
    torch.testing.assert_close(KLToReference(positions="response")(batch, policy, reference), T(kl / 2))
    torch.testing.assert_close(KLToReference(positions="all")(batch, policy, reference), T(kl / 4))
    assert KLToReference().needs_reference and not RetainKL(retain_data="x.jsonl").needs_reference
    # the retain penalty is the same arithmetic on the records of its own batch
    torch.testing.assert_close(RetainKL("x.jsonl", positions="response", **per_token)(batch, policy, reference), T(kl))
    with pytest.raises(ValueError, match="reduction"):
        KLToReference(reduction="sum")


def test_kl_default_scale_equals_the_release_formula():
    """The release: ``F.kl_div`` over the whole (B, T, V) tensor, masked, divided by the mask expanded over V."""
    torch.manual_seed(0)
    b, t, v = 2, 5, 7
    attention = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    batch = {"attention_mask": attention, "labels": torch.full((b, t), -100)}
    policy = ForwardRecord(logits=torch.randn(b, t, v))
    reference = ForwardRecord(logits=torch.randn(b, t, v))
    log_p, log_ref = policy.logits.log_softmax(-1), reference.logits.log_softmax(-1)
    mask = attention[..., None].expand(b, t, v).float()  # (B, T, V)
    release = (F.kl_div(log_p, log_ref, log_target=True, reduction="none") * mask).sum() / mask.sum()
    torch.testing.assert_close(KLToReference(positions="all")(batch, policy, reference), release)
    per_token = KLToReference(positions="all", reduction="token_mean")(batch, policy, reference)
    torch.testing.assert_close(per_token, release * v)


def test_kl_gradient_equals_the_release_formulas():
    """The penalty's gradient with respect to the policy's logits is that of the release's
    ``F.kl_div(log_softmax(policy), log_softmax(reference))`` at its scale (the reference runs under no_grad)."""
    torch.manual_seed(1)
    b, t, v = 2, 4, 11
    batch = {"attention_mask": torch.ones(b, t, dtype=torch.long), "labels": torch.full((b, t), -100)}
    ours = torch.randn(b, t, v, requires_grad=True)
    theirs = ours.detach().clone().requires_grad_(True)
    ref = torch.randn(b, t, v)
    KLToReference(positions="all")(batch, ForwardRecord(logits=ours), ForwardRecord(logits=ref)).backward()
    release = F.kl_div(theirs.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="sum")
    (release / (b * t * v)).backward()
    torch.testing.assert_close(ours.grad, theirs.grad)


def test_hidden_state_drift_by_hand():
    """H = 2, two blocks; only position 1 (response) counts. Block outputs (hidden states 1 and 2):
    state 1: policy (1,2) vs ref (1,0): 4 / 2 = 2; state 2: policy (0,0) vs ref (1,1): 2 / 2 = 1.
    Default layers 1..2: (2 + 1) / 2 = 3/2; layers [1]: 2. The embeddings (state 0) differ but are not used.
    """
    batch = _batch([1, 0], [0, 0], [0, 0], [0, 1])
    policy = ForwardRecord(
        logits=torch.zeros(1, 2, 3),
        hidden_states=(T([[[9.0, 9], [9, 9]]]), T([[[0.0, 0], [1, 2]]]), torch.zeros(1, 2, 2)),
    )
    reference = ForwardRecord(
        logits=torch.zeros(1, 2, 3),
        hidden_states=(torch.zeros(1, 2, 2), T([[[5.0, 5], [1, 0]]]), T([[[0.0, 0], [1, 1]]])),
    )
    torch.testing.assert_close(HiddenStateDrift(positions="response")(batch, policy, reference), T(1.5))
    torch.testing.assert_close(HiddenStateDrift(positions="response", layers=[1])(batch, policy, reference), T(2.0))


def test_relative_drift_floors_a_zero_reference_norm():
    """A zero reference vector divides by (1e-12)^2 instead of 0: finite, as in the release."""
    assert torch.isfinite(relative_drift(T([[1e-9, 0.0]]), T([[0.0, 0.0]]))).all()
    torch.testing.assert_close(
        kv_drift(torch.ones(2, 3, 4), torch.ones(2, 3, 4), torch.ones(2, 3, 4), torch.ones(2, 3, 4)), T(0.0)
    )


# -- on a tiny model ----------------------------------------------------------------------------------------------
def test_hidden_states_convention_the_last_state_is_final_normed(tiny_qwen):
    """What HiddenStateDrift's docstring says of transformers' hidden states: L + 1 of them, the last one after
    the final norm (so the default layer set 1..L ends with the normed output, not the last block's raw one)."""
    from piggy_lightning.modeling import load_causal_lm

    model = load_causal_lm(tiny_qwen).eval()
    raw = {}
    handle = model.model.layers[-1].register_forward_hook(
        lambda m, i, o: raw.setdefault("x", o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2, 3]]), output_hidden_states=True)
    handle.remove()
    assert len(out.hidden_states) == len(model.model.layers) + 1
    torch.testing.assert_close(out.hidden_states[-1], model.model.norm(raw["x"]))
    assert not torch.allclose(out.hidden_states[-1], raw["x"])
