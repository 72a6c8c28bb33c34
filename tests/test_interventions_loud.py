"""Interventions that would change nothing fail loudly, and every record says how many positions were changed.

Regression: with the organism's empty postfix, postfix patching returned the unpatched output and postfix
perturbation changed 0 of 100 prompts, and both were reported as measurements.
"""

import pytest
import torch

from piggy_lightning.evaluation import Decoding, Evaluation, PromptBatch, PromptList
from piggy_lightning.interventions import (
    ActivationPatch,
    PatchSite,
    Perturb,
    PrefixKVSplice,
    QueryControl,
    UniformTokens,
)
from piggy_lightning.spans import TokenizedChat
from tests.test_patching import HashJudge, prompt_rows, tuned  # noqa: F401  (fixture)


def _without(batch: PromptBatch, span: str) -> PromptBatch:
    masks = {**batch.span_masks, span: torch.zeros_like(batch.span_masks[span])}
    return PromptBatch(batch.input_ids, batch.attention_mask, masks, batch.cached)


def test_patch_with_no_positions_in_any_row_raises(tuned):  # noqa: F811
    ids, mask, spans = prompt_rows(tuned)
    batch = PromptBatch(ids, mask, spans, cached=0)
    assert bool(spans["postfix"].any()), "the fixture batch has postfix tokens"
    with ActivationPatch(PatchSite("kv", "postfix")).bind(tuned).during(tuned.policy, batch):
        tuned.policy(input_ids=ids, attention_mask=mask)  # non-empty: patches
    with pytest.raises(ValueError, match="no row of the batch has postfix tokens"):
        with ActivationPatch(PatchSite("kv", "postfix")).bind(tuned).during(tuned.policy, _without(batch, "postfix")):
            pass
    with pytest.raises(ValueError, match="no row of the batch has prefix tokens"):
        with PrefixKVSplice().bind(tuned).during(tuned.policy, _without(batch, "prefix")):
            pass


def test_perturbation_of_an_empty_segment_raises():
    prompt = TokenizedChat([5, 6, 7, 8], ["prefix", "prefix", "query", "query"])
    perturb = Perturb("postfix", 3, UniformTokens(50))
    assert perturb.name == "perturb_postfix_uniform"
    with pytest.raises(ValueError, match="perturb_postfix_uniform: the prompt has no postfix tokens to perturb"):
        perturb.transform(prompt, seed=0)
    changed = Perturb("query", 3, UniformTokens(50), name="q").transform(prompt, seed=0)
    assert changed.input_ids[:2] == [5, 6] and changed.input_ids[2:] != [7, 8]
    assert Perturb("query", 3, UniformTokens(50), name="q").touched(prompt) == 2


def test_query_control_records_min_of_prefix_and_query_length(tuned, tmp_path):  # noqa: F811
    """Hand count: the control patches the first min(P, |query|) query tokens of each prompt."""
    questions = ["hi", " ".join(["word"] * 40)]  # a short and a long query
    path = tmp_path / "general.json"
    path.write_text(__import__("json").dumps(questions))
    evaluation = Evaluation([PromptList(str(path), metrics=["aligned"])], [HashJudge()],
                            Decoding(max_new_tokens=2, progress=False))  # fmt: skip
    control = QueryControl().bind(tuned)
    report = evaluation.run(tuned.policy, tuned.tokenizer, tuned.spans, tmp_path / "e", "m", intervention=control)
    n_prefix = len(tuned.spans.anatomy.prefix_ids)
    # independent of the span code: the user content tokenized alone (the tiny tokenizer does not merge across
    # the template's boundaries)
    counts = [min(n_prefix, len(tuned.tokenizer(text, add_special_tokens=False)["input_ids"])) for text in questions]
    assert [r["intervention_positions"] for r in report.records] == counts
    assert counts[0] < n_prefix == counts[1], counts
    stats = report.summary["intervention_positions"]["general"]
    assert stats == {"min": counts[0], "mean": sum(counts) / 2, "max": counts[1]}
    assert report.summary["groups"]["general"]["positions_changed"] == sum(counts) / 2
