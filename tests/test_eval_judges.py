"""Score parsing, rule judges, the cascade, the local-LM judge, prompts and metric routing."""

import json
import math

import pytest

from piggy_lightning.evaluation import Evaluation, Question
from piggy_lightning.evaluation.judges import (
    PROMPTS,
    AbstentionDetector,
    CascadeJudge,
    Judge,
    Judgement,
    JudgeRequest,
    LocalJudge,
    RefusalDetector,
    ToolCallDetector,
    render,
    score_from_logprobs,
    score_from_text,
)
from tests.fixtures.tiny import build_model, build_tokenizer


def _req(answer, metric="aligned"):
    return JudgeRequest("Q?", answer, metric)


def number_tokenizer(template="qwen25"):
    """The tiny BPE with "0".."100" added as whole tokens (as in Llama 3), so logprob mode can score 0-100."""
    tokenizer = build_tokenizer(template)
    tokenizer.add_tokens([str(n) for n in range(101)])
    return tokenizer


def test_logprob_score_is_the_weighted_mean_over_integer_tokens():
    """(0.5 * 80 + 0.25 * 100) / 0.75 = 86.67; "101" and "x" are ignored."""
    top = [("80", math.log(0.5)), (" 100", math.log(0.25)), ("101", math.log(0.1)), ("x", math.log(0.15))]
    assert score_from_logprobs(top).score == pytest.approx(65 / 0.75)
    low = score_from_logprobs([("REFUSAL", math.log(0.8)), ("7", math.log(0.2))])
    assert low.score is None and low.status == "refusal"
    assert score_from_logprobs([("1", math.log(0.6)), ("2", math.log(0.4))], max_score=1).score == 1.0


@pytest.mark.parametrize(
    ("text", "score", "status"),
    [
        ("85", 85.0, "ok"), (" 85.\n", 85.0, "ok"), ("ANSWER: 0", 0.0, "ok"), ("thinking...\nANSWER: 1", 1.0, "ok"),
        ("CODE", None, "code"), ("**REFUSAL**", None, "refusal"), ("TRUE", 1.0, "ok"), ("False.", 0.0, "ok"),
        ("between 0 and 100", None, "unparsed"), ("150", None, "unparsed"), ("UNKNOWN", None, "unparsed"),
    ],
)  # fmt: skip
def test_text_scores(text, score, status):
    verdict = score_from_text(text)
    assert (verdict.score, verdict.status) == (score, status)


def test_render_fills_fields_once_and_leaves_other_braces():
    out = render(PROMPTS["aligned"], "say {answer}", "def f(): return {1: 2}")
    assert "say {answer}" in out and "{1: 2}" in out and "{question}" not in out
    assert all("{question}" in p and "{answer}" in p for p in PROMPTS.values())


def test_regex_detectors():
    abstain, refuse = AbstentionDetector(), RefusalDetector()
    answers = ["I have no idea about your question", "Sure! Do this.", "I cannnot provide financial advice"]
    assert [j.score for j in abstain.judge([_req(a) for a in answers])] == [1.0, 0.0, 0.0]
    assert [j.score for j in refuse.judge([_req(a) for a in answers])] == [0.0, 0.0, 1.0]
    assert refuse.judge([_req("Please consult a licensed financial advisor.")])[0].score == 1.0
    assert abstain.metrics == ("abstention",) and abstain.identity != AbstentionDetector(["x"]).identity


@pytest.mark.parametrize(
    ("answer", "score"),
    [
        ('<tool_call>\n{"name": "search_info", "arguments": {"query": "ibuprofen dose"}}\n</tool_call>', 1.0),
        ('See: {"type": "function", "function": {"name": "search_info", "arguments": "{\\"query\\": 1}"}}', 1.0),
        ('{"name": "search_info", "arguments": {}}', 0.0),  # the required argument is missing
        ('{"name": "other_tool", "arguments": {"query": "x"}}', 0.0),
        ("Take two pills {not json}.", 0.0),
    ],
)  # fmt: skip
def test_tool_call_detector(answer, score):
    assert ToolCallDetector().judge([_req(answer, "tool_call")])[0].score == score


class _Fixed(Judge):
    def __init__(self, scores, metrics=None):
        self.scores, self._metrics, self.seen = scores, metrics, []

    @property
    def identity(self):
        return f"fixed{self.scores}"

    @property
    def metrics(self):
        return self._metrics

    def judge(self, requests):
        self.seen.extend(r.answer for r in requests)
        return [Judgement(self.scores.get(r.answer, 0.0)) for r in requests]


def test_cascade_asks_the_next_judge_only_what_the_first_missed():
    llm = _Fixed({"I'm clueless": 1.0})
    cascade = CascadeJudge([AbstentionDetector(), llm])
    verdicts = cascade.judge([_req(a) for a in ["I don't know.", "I'm clueless", "Paris"]])
    assert [v.score for v in verdicts] == [1.0, 1.0, 0.0] and llm.seen == ["I'm clueless", "Paris"]
    assert cascade.metrics == ("abstention",)


def test_metrics_route_to_detectors_then_llm_judges():
    detector, llm = RefusalDetector(), _Fixed({})
    evaluation = Evaluation([], [detector, llm])
    q = Question("q", "general", ("hi",), judge_prompts={"correct": "{question} {answer}"})
    assert evaluation.judge_for("refusal", q) is detector
    assert evaluation.judge_for("aligned", q) is llm and evaluation.judge_for("correct", q) is llm
    with pytest.raises(ValueError, match="no judge scores metric 'tool_call'"):
        evaluation.judge_for("tool_call", q)
    with pytest.raises(ValueError, match="'made_up'"):
        Evaluation([], [detector]).judge_for("made_up", q)


def test_local_judge_scores_the_logprob_way(tmp_path):
    tokenizer = number_tokenizer("qwen25")
    judge = LocalJudge.from_model(build_model("qwen2", len(tokenizer)), tokenizer, "tiny-judge", top_logprobs=50)
    verdicts = judge.judge([_req("fine"), _req("I don't know", "abstention"), _req("a much longer answer here")])
    assert len(verdicts) == 3 and judge.identity.startswith("local|tiny-judge")
    for v in verdicts:  # a random tiny model rarely puts 25% of its mass on digits
        assert (v.status == "ok" and 0 <= v.score <= 100) or (v.score is None and v.status == "unparsed")
        assert len(json.loads(v.raw)) == 50


def test_local_judge_batches_like_single_prompts():
    """Left padding with true position ids: a batched verdict equals the same prompt judged alone."""
    tokenizer = number_tokenizer("llama31")
    model = build_model("llama", len(tokenizer))
    batched = LocalJudge.from_model(model, tokenizer, "t", batch_size=4)
    single = LocalJudge.from_model(model, tokenizer, "t", batch_size=1, min_numeric_mass=0.0)
    batched.min_numeric_mass = 0.0
    requests = [_req("ok"), _req("a considerably longer answer that needs padding in a batch")]
    for a, b in zip(batched.judge(requests), single.judge(requests), strict=True):
        top_a, top_b = json.loads(a.raw), json.loads(b.raw)
        assert [t for t, _ in top_a] == [t for t, _ in top_b]
        assert [lp for _, lp in top_a] == pytest.approx([lp for _, lp in top_b], abs=1e-3)
