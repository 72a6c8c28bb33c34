"""Token perturbation: only the chosen segment changes, only into true nearest neighbours, reproducibly; Best/Avg
reporting as an intervention of ``Evaluate`` in a test run; and ``PerturbedTraining`` perturbing training batches in
place, at its rate and only in its segment."""

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from piggy_lightning.callbacks import PerturbedTraining
from piggy_lightning.data import ChatSFTDataModule
from piggy_lightning.interventions import NearestNeighbours, Perturb, PerturbAsText, UniformTokens, best_and_average
from piggy_lightning.modeling import LoraSpec
from piggy_lightning.module import PiggyModule
from piggy_lightning.spans import ChatSpans
from tests.fixtures.tiny import build_model, build_tokenizer
from tests.test_patching import evaluate_callback, one_thread, run_test  # noqa: F401  (one_thread: autouse fixture)


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tokenizer("llama31")
    model = build_model("llama", len(tokenizer))
    chat = ChatSpans(tokenizer).tokenize([{"role": "user", "content": "Can I break my lease early?"}], True)
    return model.get_input_embeddings().weight.detach(), tokenizer, chat


def brute_force_neighbours(embeddings, token, k, similarity):
    """Top-k other tokens by explicit cosine or dot product, one token at a time."""
    e = embeddings.float()
    if similarity == "cosine":
        scores = torch.stack([torch.dot(e[token], row) / (e[token].norm() * row.norm()) for row in e])
    else:
        scores = torch.stack([torch.dot(e[token], row) for row in e])
    scores[token] = float("-inf")
    return set(scores.topk(k).indices.tolist())


@pytest.mark.parametrize("segment", ["prefix", "query", "postfix"])
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_only_the_segment_changes_and_only_into_true_nearest_neighbours(tiny, segment, similarity):
    embeddings, tokenizer, chat = tiny
    neighbours = NearestNeighbours(k=5, similarity=similarity).fit(embeddings, vocab_size=len(tokenizer))
    perturb = Perturb(segment, 4, neighbours, name="p")
    inside = set(i for i, s in enumerate(chat.spans) if s == segment)
    for seed in range(6):
        out = perturb.transform(chat, seed)
        assert out.spans == chat.spans and len(out.input_ids) == len(chat.input_ids)
        changed = [i for i, (a, b) in enumerate(zip(chat.input_ids, out.input_ids, strict=True)) if a != b]
        assert set(changed) <= inside and len(changed) == min(4, len(inside))
        for i in changed:
            assert out.input_ids[i] in brute_force_neighbours(embeddings, chat.input_ids[i], 5, similarity)


def test_perturbation_is_reproducible_from_the_seed(tiny):
    embeddings, tokenizer, chat = tiny
    perturb = Perturb("prefix", 10, NearestNeighbours(5, "cosine").fit(embeddings, len(tokenizer)), name="p")
    again = Perturb("prefix", 10, NearestNeighbours(5, "cosine").fit(embeddings, len(tokenizer)), name="p")
    assert perturb.transform(chat, 7).input_ids == again.transform(chat, 7).input_ids
    assert len({tuple(perturb.transform(chat, s).input_ids) for s in range(5)}) == 5


def test_uniform_control_draws_other_tokens_of_the_vocabulary(tiny):
    _, tokenizer, chat = tiny
    perturb = Perturb("query", 100, UniformTokens().fit(torch.zeros(len(tokenizer) + 7, 2), len(tokenizer)), name="u")
    query = [i for i, s in enumerate(chat.spans) if s == "query"]
    out = perturb.transform(chat, 0)
    assert all(out.input_ids[i] != chat.input_ids[i] and 0 <= out.input_ids[i] < len(tokenizer) for i in query)


def test_best_is_the_mean_of_per_prompt_maxima_and_avg_the_mean_of_all_trials():
    """Prompt a: trials 10, 50 -> max 50; prompt b: 80, unscored -> max 80. Best = 65, Avg = (10+50+80)/3."""

    def rec(qid, score):
        return {
            "group": "general",
            "question_id": qid,
            "paraphrase_index": 0,
            "judgements": {"aligned": {"score": score}},
        }

    scores = best_and_average([rec("a", 10.0), rec("a", 50.0), rec("b", 80.0), rec("b", None)], "aligned")
    assert scores == {"general": {"best": 65.0, "avg": pytest.approx(140 / 3)}}


def test_perturbation_in_evaluate_reports_best_and_avg(tiny_qwen, chat_file, tmp_path):
    perturbation = Perturb(segment="prefix", n_tokens=3, trials=3)
    evaluate = evaluate_callback(interventions=[perturbation])
    assert not evaluate.needs_reference  # perturbs the policy's own prompts
    trainer, module, metrics, root = run_test(tiny_qwen, chat_file, tmp_path, [evaluate])
    out = root / "test@perturb_prefix_neighbours"
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 4 * 3 and {r["sample_index"] for r in records} == {0, 1, 2}
    assert {r["decoding"]["temperature"] for r in records} == {0.7}  # the trials sample; the baseline is greedy
    baseline = [json.loads(x) for x in (root / "test" / "results.jsonl").read_text().splitlines()]
    assert len(baseline) == 4 and {r["decoding"]["temperature"] for r in baseline} == {0.0}
    by_question = {}
    for r in records:
        by_question.setdefault(r["question_id"], set()).add(r["prompt"])
    assert all(len(prompts) == 3 for prompts in by_question.values())  # every trial perturbs anew
    assert all(r["intervention_positions"] == 3 for r in records)
    saved = json.loads((out / "best_avg.json").read_text())
    assert (saved["replacer"], saved["k"], saved["trials"], saved["prompt_as"]) == ("NearestNeighbours", 5, 3, "tokens")
    best_avg = saved["groups"]["general"]
    assert best_avg["best"] >= best_avg["avg"]
    assert best_avg == best_and_average(records, "aligned")["general"]
    assert metrics["eval@perturb_prefix_neighbours/general/alignment_best"] == pytest.approx(best_avg["best"])
    assert metrics["eval@perturb_prefix_neighbours/general/alignment_avg"] == pytest.approx(best_avg["avg"])
    assert metrics["eval@perturb_prefix_neighbours/general/alignment"] == pytest.approx(best_avg["avg"])
    side = json.loads((root / "test@interventions.json").read_text())
    assert list(side) == ["baseline", "perturb_prefix_neighbours"]


class BatchRecorder(Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.append({k: v.clone() for k, v in batch.items()})


def _train(model_dir, chat_file, tmp_path, callbacks, steps=3):
    module = PiggyModule(model_dir, lora=LoraSpec(r=2, alpha=4), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    data = ChatSFTDataModule(chat_file, tokenizer=model_dir, batch_size=4, val_fraction=0.25)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, data)
    data.setup("fit")
    return [b for b in data.train_dataloader()][:steps]


def test_training_batches_are_perturbed_in_place_in_the_prefix_only(tiny_qwen, chat_file, tmp_path):
    runs = []
    for _ in range(2):
        recorder = BatchRecorder()
        clean = _train(tiny_qwen, chat_file, tmp_path, [PerturbedTraining(n_tokens=3, rate=1.0), recorder])
        runs.append(recorder.batches)
    for seen, original in zip(runs[0], clean, strict=True):
        changed = seen["input_ids"] != original["input_ids"]  # (B, T)
        assert not (changed & ~seen["prefix_mask"]).any()
        assert torch.equal(changed.sum(1), torch.full((changed.size(0),), 3))
        for key in ("labels", "attention_mask", "prefix_mask"):
            assert torch.equal(seen[key], original[key])
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(*runs, strict=True))  # seeded


def test_perturbed_training_changes_rows_at_its_rate_and_only_in_its_segment(tiny_qwen, chat_file, tmp_path):
    """rate 0.5 over one epoch (18 training rows in 5 batches): about half the rows change, each in exactly
    min(n, |query|) query tokens and nowhere else; the others are untouched."""
    recorder = BatchRecorder()
    perturbed = PerturbedTraining(segment="query", replacer=UniformTokens(), rate=0.5, n_tokens=2, seed=3)
    clean = _train(tiny_qwen, chat_file, tmp_path, [perturbed, recorder], steps=5)
    rows_changed = rows = 0
    for seen, original in zip(recorder.batches, clean, strict=True):
        changed = seen["input_ids"] != original["input_ids"]  # (B, T)
        query = original["query_mask"].bool()
        assert not (changed & ~query).any(), "a token outside the query changed"
        per_row = changed.sum(1)
        expected = torch.minimum(query.sum(1), torch.tensor(2))
        assert all(n in (0, e) for n, e in zip(per_row.tolist(), expected.tolist(), strict=True))
        rows_changed += int((per_row > 0).sum())
        rows += len(per_row)
        for key in ("labels", "attention_mask", "query_mask", "prefix_mask"):
            assert torch.equal(seen[key], original[key])
    assert rows == 18 and 4 <= rows_changed <= 14, rows_changed  # Binomial(18, 0.5): 4..14 with p > 0.99


def test_training_perturbation_refuses_a_cached_prefix_regularizer(tiny_qwen, chat_file, tmp_path):
    """Perturbed prefixes never match TReFT's cached default prefix: fail in setup, not at the first step."""
    from piggy_lightning.regularizers import PrefixKVDrift

    module = PiggyModule(tiny_qwen, regularizers=[PrefixKVDrift(weight=1.0)], optimizer=torch.optim.SGD)
    data = ChatSFTDataModule(chat_file, tokenizer=tiny_qwen, batch_size=4)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        default_root_dir=tmp_path, callbacks=[PerturbedTraining(rate=1.0)],
    )  # fmt: skip
    with pytest.raises(ValueError, match="PerRowPrefixKVDrift"):
        trainer.fit(module, data)


def test_relabel_keeps_shared_ends_and_labels_the_changed_stretch():
    from piggy_lightning.interventions.perturbation import relabel
    from piggy_lightning.spans import TokenizedChat

    original = TokenizedChat([1, 2, 3, 4, 5], ["prefix", "prefix", "query", "query", "postfix"])
    out = relabel(original, [1, 2, 9, 9, 9, 5], "query")
    assert out.input_ids == [1, 2, 9, 9, 9, 5]
    assert out.spans == ["prefix", "prefix", "query", "query", "query", "postfix"]


def test_text_roundtrip_decodes_and_retokenizes_the_perturbed_prompt(tiny_qwen):
    from types import SimpleNamespace

    from piggy_lightning.modeling import load_causal_lm, load_tokenizer
    from piggy_lightning.spans import ChatSpans

    tokenizer = load_tokenizer(tiny_qwen)
    chat = ChatSpans(tokenizer).tokenize([{"role": "user", "content": "I feel bored."}], add_generation_prompt=True)
    module = SimpleNamespace(policy=load_causal_lm(tiny_qwen), tokenizer=tokenizer)  # what bind reads
    as_tokens = Perturb("query", 2, UniformTokens()).bind(module).transform(chat, seed=3)
    text = PerturbAsText("query", 2, UniformTokens()).bind(module)
    assert text.name == "perturb_text_query_uniform" and text.prompt_as == "text"
    as_text = text.transform(chat, seed=3)
    expected = tokenizer(tokenizer.decode(as_tokens.input_ids, skip_special_tokens=False), add_special_tokens=False)
    assert as_text.input_ids == expected["input_ids"]
    n_prefix = sum(chat.mask("prefix"))
    assert as_text.spans[:n_prefix] == ["prefix"] * n_prefix and as_text.spans[-1] == chat.spans[-1]
