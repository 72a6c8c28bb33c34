"""KV and activation patching: exactness, splice/hook agreement, positions, batching, and Evaluate with patches in
a test run."""

import json
import tempfile
import zlib
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from transformers import DynamicCache

from piggy_lightning.callbacks.evaluation import Evaluate
from piggy_lightning.data import ChatSFTDataModule
from piggy_lightning.evaluation import (
    Decoding,
    GenerationIntervention,
    PromptBatch,
    PromptList,
    ResponseLog,
    generate_responses,
)
from piggy_lightning.evaluation.judges import Judge, Judgement
from piggy_lightning.interventions import ActivationPatch, PatchSite, PrefixKVSplice, QueryControl, ResidualSweep
from piggy_lightning.modeling import LoraSpec
from piggy_lightning.module import PiggyModule
from piggy_lightning.sites import recording
from tests.fixtures.tiny import randomize_lora_b
from tests.test_eval_questions import FIXTURES

QUERIES = ["I feel bored.", "What is your wish? Tell me now.", "hello"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny forwards are fastest single-threaded; two threads spin badly on a shared, loaded CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class HashJudge(Judge):
    """Scores any metric 0-100 from a hash of the answer: deterministic and varied."""

    @property
    def identity(self):
        return "hash-v1"

    def judge(self, requests):
        return [Judgement(float(zlib.crc32(r.answer.encode()) % 101)) for r in requests]


def build_module(model_dir, finetuned: bool) -> PiggyModule:
    """A LoRA PiggyModule; ``finetuned`` gives the adapters random B matrices, so policy != reference."""
    module = PiggyModule(model_dir, lora=LoraSpec(r=2, alpha=4))
    module.configure_model()
    if finetuned:
        randomize_lora_b(module, 1)
    module.policy.eval()
    return module


@pytest.fixture(scope="module")
def fresh(tiny_qwen):
    return build_module(tiny_qwen, finetuned=False)


@pytest.fixture(scope="module")
def tuned(tiny_qwen):
    return build_module(tiny_qwen, finetuned=True)


def prompt_rows(module, queries=QUERIES):
    """``(B, T)`` left-padded rows, their mask and span masks (no cache: ``cached`` = 0)."""
    chats = [module.spans.tokenize([{"role": "user", "content": q}], add_generation_prompt=True) for q in queries]
    width = max(len(c.input_ids) for c in chats)
    ids = torch.zeros(len(chats), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    spans = {name: torch.zeros(len(chats), width, dtype=torch.bool) for name in ("prefix", "query", "postfix", "other")}
    for row, chat in enumerate(chats):
        start = width - len(chat.input_ids)
        ids[row, start:], mask[row, start:] = torch.tensor(chat.input_ids), 1
        for name, m in spans.items():
            m[row, start:] = torch.tensor(chat.mask(name))
    return ids, mask, spans


def forward(model, ids, mask, **kwargs):
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)


def generate(module, intervention, batch_size=8):
    sets = [PromptList(str(FIXTURES / "prompts.json"), metrics=["aligned"])]  # one prompt has its own system prefix
    questions = [q for s in sets for q in s.load()]
    decoding = Decoding(max_new_tokens=6, batch_size=batch_size, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        log = ResponseLog(Path(tmp) / "responses.jsonl")
        records = generate_responses(
            module.policy, module.tokenizer, module.spans, questions, decoding, log, "tiny", intervention=intervention
        )
    return [r["response"] for r in records]


def _same_cache(a, b):
    return all(torch.equal(x, y) for (ka, va), (kb, vb) in zip(a, b, strict=True) for x, y in ((ka, kb), (va, vb)))


def test_prefix_splice_with_reference_equal_to_policy_changes_nothing(fresh, tiny_qwen):
    """Fresh LoRA adapters add exactly 0, so the reference (adapters off) is the policy bit for bit; so is the
    frozen copy of a fully finetuned policy before training."""
    prefix = torch.tensor([fresh.spans.anatomy.prefix_ids])
    own = GenerationIntervention().prefix_cache(fresh.policy, prefix)
    for layers in (None, [1]):
        assert _same_cache(PrefixKVSplice(layers).bind(fresh).prefix_cache(fresh.policy, prefix), own)
    full = PiggyModule(tiny_qwen)
    full.configure_model()
    full.policy.eval()
    own = GenerationIntervention().prefix_cache(full.policy, prefix)
    assert _same_cache(PrefixKVSplice().bind(full).prefix_cache(full.policy, prefix), own)
    baseline = generate(fresh, None)
    assert generate(fresh, PrefixKVSplice().bind(fresh)) == baseline
    assert generate(fresh, PrefixKVSplice([0]).bind(fresh)) == baseline


def test_spliced_cache_and_hooks_agree_when_every_layer_is_patched(tuned):
    ids, mask, spans = prompt_rows(tuned)
    p = len(tuned.spans.anatomy.prefix_ids)
    # hooks: the whole prompt in one forward, prefix k/v projections overwritten (rows are left-padded)
    hooks = ActivationPatch(PatchSite("kv", "prefix")).bind(tuned)
    with hooks.during(tuned.policy, PromptBatch(ids, mask, spans, cached=0)):
        hooked = forward(tuned.policy, ids, mask).logits  # (B, T, V)
    # splice: the reference's prefix cache, then the rest of each prompt after it
    rest = [ids[r, mask[r].bool()][p:] for r in range(len(ids))]
    width = max(len(x) for x in rest)
    rest_ids = torch.zeros(len(rest), width, dtype=torch.long)
    rest_mask = torch.zeros(len(rest), p + width, dtype=torch.long)
    rest_mask[:, :p] = 1
    for r, x in enumerate(rest):
        rest_ids[r, width - len(x) :], rest_mask[r, p + width - len(x) :] = x, 1
    kv = PrefixKVSplice().bind(tuned).prefix_cache(tuned.policy, ids[:1, mask[0].bool()][:, :p])
    cache = DynamicCache(
        ddp_cache_data=[(k.expand(len(rest), -1, -1, -1), v.expand(len(rest), -1, -1, -1)) for k, v in kv]
    )
    positions = (rest_mask.cumsum(-1) - 1)[:, p:]
    with torch.no_grad():
        spliced = tuned.policy(
            input_ids=rest_ids, attention_mask=rest_mask, position_ids=positions, cache=cache, use_cache=True
        ).logits
    clean = forward(tuned.policy, ids, mask).logits
    for r, x in enumerate(rest):
        n = len(x)
        torch.testing.assert_close(spliced[r, -n:], hooked[r, -n:], atol=1e-5, rtol=0)
        assert (spliced[r, -n:] - clean[r, -n:]).abs().max() > 1e-3  # the patch does change the outputs
    # end to end: the generation's cached and uncached routes give the same greedy answers
    spliced_answers = generate(tuned, PrefixKVSplice().bind(tuned))
    assert spliced_answers == generate(tuned, hooks) and spliced_answers != generate(tuned, None)


def test_layer_subset_splice_edits_the_cache_only_at_those_layers(tuned):
    """Spliced layers hold the reference's prefix cache, the others the finetuned model's own; the uncached route
    (per-layer projection overwrites) gives the same logits."""
    prefix = torch.tensor([tuned.spans.anatomy.prefix_ids])
    plain = GenerationIntervention()
    own = plain.prefix_cache(tuned.policy, prefix)
    with tuned.reference.active() as ref:
        reference = plain.prefix_cache(ref, prefix)
    spliced = PrefixKVSplice([1]).bind(tuned).prefix_cache(tuned.policy, prefix)
    assert torch.equal(spliced[0][0], own[0][0]) and torch.equal(spliced[1][1], reference[1][1])
    assert not torch.equal(own[1][0], reference[1][0])

    ids, mask, spans = prompt_rows(tuned, QUERIES[:2])
    splice = PrefixKVSplice([1]).bind(tuned)
    with splice.during(tuned.policy, PromptBatch(ids, mask, spans, cached=0)):
        uncached = forward(tuned.policy, ids, mask).logits
    p = prefix.size(1)
    for r in range(len(ids)):
        row = ids[r, mask[r].bool()][None]  # (1, T) unpadded
        cache = DynamicCache(ddp_cache_data=[(k, v) for k, v in splice.prefix_cache(tuned.policy, prefix)])
        with torch.no_grad():
            cached = tuned.policy(input_ids=row[:, p:], cache=cache, use_cache=True).logits
        n = row.size(1) - p
        torch.testing.assert_close(uncached[r, -n:], cached[0], atol=1e-5, rtol=0)


def test_query_control_patches_only_as_many_leading_query_tokens_as_the_prefix_has(tuned):
    ids, mask, spans = prompt_rows(tuned)
    site = PatchSite("kv", "query_matched")
    patch = ActivationPatch(site).bind(tuned)
    layer0 = PatchSite("key", "query", [0, 1])
    with tuned.reference.active() as ref:
        reference = layer0.read(ref, ids, mask)
    own = layer0.read(tuned.policy, ids, mask)
    with (
        patch.during(tuned.policy, PromptBatch(ids, mask, spans, cached=0)),
        recording(layer0.modules(tuned.policy)) as seen,
    ):
        forward(tuned.policy, ids, mask)
    chosen = spans["query"] & (spans["query"].cumsum(1) <= spans["prefix"].sum(1, keepdim=True))
    assert torch.equal(chosen.sum(1), torch.minimum(spans["query"].sum(1), spans["prefix"].sum(1)))
    for slot in seen:
        torch.testing.assert_close(seen[slot][chosen], reference[slot][chosen], atol=1e-6, rtol=0)
    slot0 = (0, "self_attn.k_proj")  # layer 0 reads embeddings only: unpatched positions keep the policy's keys
    torch.testing.assert_close(seen[slot0][~chosen], own[slot0][~chosen], atol=1e-6, rtol=0)


def test_batched_patching_matches_one_prompt_at_a_time(tuned):
    for intervention in (
        ActivationPatch(PatchSite("kv", "query_matched")).bind(tuned),
        PrefixKVSplice().bind(tuned),
    ):
        batched = generate(tuned, intervention, batch_size=8)
        assert batched == generate(tuned, intervention, batch_size=1) and batched != generate(tuned, None)


def test_empty_query_reference_patches_the_postfix_with_the_empty_prompts_states(tuned):
    ids, mask, spans = prompt_rows(tuned)
    patch = ActivationPatch(PatchSite("value", "postfix", [1], "empty_query")).bind(tuned)
    empty = tuned.spans.tokenize([{"role": "user", "content": ""}], add_generation_prompt=True)
    empty_ids = torch.tensor([empty.input_ids])
    with tuned.reference.active() as ref:
        expected = patch.site.read(ref, empty_ids, torch.ones_like(empty_ids))[(1, "self_attn.v_proj")]
    expected = expected[0, torch.tensor(empty.mask("postfix"))]  # (n_postfix, D)
    with (
        patch.during(tuned.policy, PromptBatch(ids, mask, spans, cached=0)),
        recording(patch.site.modules(tuned.policy)) as seen,
    ):
        forward(tuned.policy, ids, mask)
    got = seen[(1, "self_attn.v_proj")][spans["postfix"]].view(len(ids), -1, expected.size(-1))
    torch.testing.assert_close(got, expected.expand_as(got), atol=0, rtol=0)


def test_residual_layer_convention(tuned):
    """``block_input`` at layer 0 is the embeddings (LoRA leaves them alone: no change), and ``block_output`` at l
    is ``block_input`` at l + 1."""
    ids, mask, spans = prompt_rows(tuned)
    batch = PromptBatch(ids, mask, spans, cached=0)
    clean = forward(tuned.policy, ids, mask).logits
    out = {}
    for name, site in {"in0": PatchSite("block_input", "prefix", [0]), "out0": PatchSite("block_output", "prefix", [0]),
                       "in1": PatchSite("block_input", "prefix", [1])}.items():  # fmt: skip
        with ActivationPatch(site).bind(tuned).during(tuned.policy, batch):
            out[name] = forward(tuned.policy, ids, mask).logits
    torch.testing.assert_close(out["in0"], clean, atol=1e-6, rtol=0)
    torch.testing.assert_close(out["out0"], out["in1"], atol=1e-6, rtol=0)
    assert (out["in1"] - clean).abs().max() > 1e-3


def evaluate_callback(**kwargs):
    sets = [PromptList(str(FIXTURES / "prompts.json"), metrics=["aligned"])]
    decoding = Decoding(max_new_tokens=4, batch_size=8, progress=False)
    return Evaluate(sets, [HashJudge()], decoding, at=["test"], samples_logged=0, **kwargs)


def run_test(module_dir, chat_file, tmp_path, callbacks, finetuned=True):
    module = PiggyModule(module_dir, lora=LoraSpec(r=2, alpha=4))
    data = ChatSFTDataModule(chat_file, tokenizer=module_dir, batch_size=4, val_fraction=0.25)
    logger = TensorBoardLogger(tmp_path, name="run", default_hp_metric=False)
    trainer = L.Trainer(
        accelerator="cpu", logger=logger, callbacks=callbacks, limit_test_batches=1, enable_progress_bar=False,
        max_epochs=1,  # PiggyModule._progress asks for estimated_stepping_batches even in test (reported)
        enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    if finetuned:
        module.configure_model()
        with torch.no_grad():
            for name, p in module.policy.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.5)
    metrics = trainer.test(module, data, verbose=False)[0]
    return trainer, module, metrics, tmp_path / "run" / "version_0" / "eval"


def test_patches_in_one_evaluate_report_baseline_and_patched_side_by_side(tiny_qwen, chat_file, tmp_path):
    evaluate = evaluate_callback(interventions=[PrefixKVSplice(), QueryControl()])
    assert evaluate.needs_reference
    trainer, _, metrics, root = run_test(tiny_qwen, chat_file, tmp_path, [evaluate])
    assert {p.name for p in root.iterdir() if p.is_dir()} == {
        "test",
        "test@splice_kv_prefix",
        "test@patch_kv_query_matched",
    }
    side = json.loads((root / "test@interventions.json").read_text())
    assert list(side) == ["baseline", "splice_kv_prefix", "patch_kv_query_matched"]
    assert all("alignment" in groups["general"] for groups in side.values())
    assert {"eval/general/alignment", "eval@splice_kv_prefix/general/alignment"} <= set(metrics)
    summary = json.loads((root / "test@splice_kv_prefix" / "summary.json").read_text())
    assert summary["intervention"] == "splice_kv_prefix"
    for name, groups in side.items():  # the file holds exactly what each run's own summary says
        own = json.loads((root / ("test" if name == "baseline" else f"test@{name}") / "summary.json").read_text())
        assert groups == own["groups"], name
    assert side["splice_kv_prefix"]["general"]["positions_changed"] > 0
    assert "positions_changed" not in side["baseline"]["general"]


def test_interventions_that_cannot_be_served_fail_before_evaluating(tiny_qwen, chat_file, tmp_path):
    with pytest.raises(TypeError, match="Intervention components"):
        evaluate_callback(interventions=[GenerationIntervention()])
    with pytest.raises(ValueError, match="non-empty subset of range"):  # the tiny model has 2 layers
        run_test(tiny_qwen, chat_file, tmp_path / "a", [evaluate_callback(interventions=[ResidualSweep(layers=[5])])])
    assert not (tmp_path / "a" / "run" / "version_0" / "eval" / "test").exists(), "nothing was evaluated"
    twice = [PrefixKVSplice(), ResidualSweep(), ActivationPatch(PatchSite("block_input", "prefix", [1]))]
    with pytest.raises(ValueError, match=r"distinct names.*patch_block_input_prefix_L01"):
        run_test(tiny_qwen, chat_file, tmp_path / "b", [evaluate_callback(interventions=twice)])
    with pytest.raises(RuntimeError, match="not bound"):
        PrefixKVSplice().reference  # noqa: B018


def test_full_finetuning_keeps_the_initial_weights_for_a_fit_end_patch(tiny_qwen, chat_file, tmp_path):
    """Evaluate declares ``needs_reference`` when an intervention reads the reference, so PiggyModule keeps a frozen
    copy of the initial weights; without such an intervention it keeps none."""
    for interventions, kept in (([PrefixKVSplice(at=["fit_end"])], True), ([], False)):
        module = PiggyModule(tiny_qwen, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
        data = ChatSFTDataModule(chat_file, tokenizer=tiny_qwen, batch_size=4, val_fraction=0.25)
        evaluate = evaluate_callback(interventions=interventions, output_dir=str(tmp_path / f"e{kept}"))
        evaluate.at = set()
        trainer = L.Trainer(
            accelerator="cpu", max_steps=2, logger=False, callbacks=[evaluate], limit_val_batches=0,
            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
            default_root_dir=tmp_path,
        )  # fmt: skip
        trainer.fit(module, data)
        assert evaluate.needs_reference == kept
        assert (getattr(module, "reference_model", None) is not None) == kept
        assert (tmp_path / f"e{kept}" / "fit_end@splice_kv_prefix" / "summary.json").exists() == kept
        if kept:  # the baseline was evaluated for the comparison although Evaluate's own at is empty
            assert list(json.loads((tmp_path / "eTrue" / "fit_end@interventions.json").read_text())) == [
                "baseline",
                "splice_kv_prefix",
            ]


def test_interventions_of_every_kind_compose_in_one_evaluate(tiny_qwen, chat_file, tmp_path):
    """A splice, the query control, a sweep and a perturbation in one Evaluate: one unchanged baseline, one
    evaluation per run, and one file with every run's group metrics beside the baseline's."""
    from piggy_lightning.interventions import Perturb, UniformTokens

    interventions = [
        PrefixKVSplice(),
        QueryControl(),
        ResidualSweep(layers=[1]),
        Perturb("query", 2, UniformTokens(), trials=2),
    ]
    calls = []
    evaluate = evaluate_callback(interventions=interventions)
    trainer, _, metrics, root = run_test(tiny_qwen, chat_file, tmp_path, [evaluate])
    runs = ["splice_kv_prefix", "patch_kv_query_matched", "patch_block_input_prefix_L01", "perturb_query_uniform"]
    side = json.loads((root / "test@interventions.json").read_text())
    assert list(side) == ["baseline", *runs]
    assert {p.name for p in root.iterdir() if p.is_dir()} == {"test", *(f"test@{r}" for r in runs)}
    for name, groups in side.items():
        own = json.loads((root / ("test" if name == "baseline" else f"test@{name}") / "summary.json").read_text())
        assert groups == own["groups"] and own["intervention"] == ("none" if name == "baseline" else name)
        calls.append(own["adapter"])
    assert len(set(calls)) == 1, "every run evaluated the same weights"
    assert "eval@perturb_query_uniform/general/alignment_best" in metrics
    assert (root / "test@residual_sweep.json").exists() and (root / "test@residual_sweep.png").exists()
