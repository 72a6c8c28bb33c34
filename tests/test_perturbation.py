"""Token perturbation: only the chosen segment changes, only into true nearest neighbours, reproducibly; Best/Avg
reporting in a test run; and the same perturbation applied to training batches in place."""

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from piggy_lightning.callbacks.perturbation import TokenPerturbation, best_and_average
from piggy_lightning.data import ChatSFTDataModule
from piggy_lightning.interventions import NearestNeighbours, PromptPerturbation, UniformTokens
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
    neighbours = NearestNeighbours(embeddings, k=5, similarity=similarity, vocab_size=len(tokenizer))
    perturb = PromptPerturbation(segment, 4, neighbours, "p")
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
    perturb = PromptPerturbation("prefix", 10, NearestNeighbours(embeddings, 5, "cosine", len(tokenizer)), "p")
    again = PromptPerturbation("prefix", 10, NearestNeighbours(embeddings, 5, "cosine", len(tokenizer)), "p")
    assert perturb.transform(chat, 7).input_ids == again.transform(chat, 7).input_ids
    assert len({tuple(perturb.transform(chat, s).input_ids) for s in range(5)}) == 5


def test_uniform_control_draws_other_tokens_of_the_vocabulary(tiny):
    _, tokenizer, chat = tiny
    perturb = PromptPerturbation("query", 100, UniformTokens(len(tokenizer)), "u")
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


def test_perturbation_callback_reports_best_and_avg(tiny_qwen, chat_file, tmp_path):
    perturbation = TokenPerturbation(segment="prefix", n_tokens=3, trials=3)
    trainer, module, metrics, root = run_test(tiny_qwen, chat_file, tmp_path, [evaluate_callback(), perturbation])
    out = root / "test@perturb_prefix_neighbours"
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 4 * 3 and {r["sample_index"] for r in records} == {0, 1, 2}
    by_question = {}
    for r in records:
        by_question.setdefault(r["question_id"], set()).add(r["prompt"])
    assert all(len(prompts) == 3 for prompts in by_question.values())  # every trial perturbs anew
    best_avg = json.loads((out / "best_avg.json").read_text())["groups"]["general"]
    assert best_avg["best"] >= best_avg["avg"]
    assert metrics["eval@perturb_prefix_neighbours/general/alignment_best"] == pytest.approx(best_avg["best"])
    assert metrics["eval@perturb_prefix_neighbours/general/alignment_avg"] == pytest.approx(best_avg["avg"])
    assert metrics["eval@perturb_prefix_neighbours/general/alignment"] == pytest.approx(best_avg["avg"])


class BatchRecorder(Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.append({k: v.clone() for k, v in batch.items()})


def _train(model_dir, chat_file, tmp_path, callbacks):
    module = PiggyModule(model_dir, lora=LoraSpec(r=2, alpha=4), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    data = ChatSFTDataModule(chat_file, tokenizer=model_dir, batch_size=4, val_fraction=0.25)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, data)
    data.setup("fit")
    return [b for b in data.train_dataloader()][:3]


def test_training_batches_are_perturbed_in_place_in_the_prefix_only(tiny_qwen, chat_file, tmp_path):
    runs = []
    for _ in range(2):
        recorder = BatchRecorder()
        clean = _train(tiny_qwen, chat_file, tmp_path, [TokenPerturbation(n_tokens=3, train_rate=1.0, at=[]), recorder])
        runs.append(recorder.batches)
    for seen, original in zip(runs[0], clean, strict=True):
        changed = seen["input_ids"] != original["input_ids"]  # (B, T)
        assert not (changed & ~seen["prefix_mask"]).any()
        assert torch.equal(changed.sum(1), torch.full((changed.size(0),), 3))
        for key in ("labels", "attention_mask", "prefix_mask"):
            assert torch.equal(seen[key], original[key])
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(*runs, strict=True))  # seeded


def test_training_perturbation_refuses_a_cached_prefix_regularizer(tiny_qwen, chat_file, tmp_path):
    """Perturbed prefixes never match TReFT's cached default prefix: fail in setup, not at the first step."""
    import lightning as L
    import torch

    from piggy_lightning.callbacks import TokenPerturbation
    from piggy_lightning.data import ChatSFTDataModule
    from piggy_lightning.module import PiggyModule
    from piggy_lightning.regularizers import PrefixKVDrift

    module = PiggyModule(tiny_qwen, regularizers=[PrefixKVDrift(weight=1.0)], optimizer=torch.optim.SGD)
    data = ChatSFTDataModule(chat_file, tokenizer=tiny_qwen, batch_size=4)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        default_root_dir=tmp_path, callbacks=[TokenPerturbation(train_rate=1.0, at=[])],
    )  # fmt: skip
    with pytest.raises(ValueError, match="mismatch: per_row"):
        trainer.fit(module, data)


def test_relabel_keeps_shared_ends_and_labels_the_changed_stretch():
    from piggy_lightning.interventions.perturbation import relabel
    from piggy_lightning.spans import TokenizedChat

    original = TokenizedChat([1, 2, 3, 4, 5], ["prefix", "prefix", "query", "query", "postfix"])
    out = relabel(original, [1, 2, 9, 9, 9, 5], "query")
    assert out.input_ids == [1, 2, 9, 9, 9, 5]
    assert out.spans == ["prefix", "prefix", "query", "query", "query", "postfix"]


def test_text_roundtrip_decodes_and_retokenizes_the_perturbed_prompt(tiny_qwen):
    from piggy_lightning.interventions.perturbation import PromptPerturbation, UniformTokens
    from piggy_lightning.modeling import load_tokenizer
    from piggy_lightning.spans import ChatSpans

    tokenizer = load_tokenizer(tiny_qwen)
    chat = ChatSpans(tokenizer).tokenize([{"role": "user", "content": "I feel bored."}], add_generation_prompt=True)
    replace = UniformTokens(len(tokenizer))
    as_tokens = PromptPerturbation("query", 2, replace, "q").transform(chat, seed=3)
    as_text = PromptPerturbation("query", 2, replace, "q", roundtrip=tokenizer).transform(chat, seed=3)
    expected = tokenizer(tokenizer.decode(as_tokens.input_ids, skip_special_tokens=False), add_special_tokens=False)
    assert as_text.input_ids == expected["input_ids"]
    n_prefix = sum(chat.mask("prefix"))
    assert as_text.spans[:n_prefix] == ["prefix"] * n_prefix and as_text.spans[-1] == chat.spans[-1]
