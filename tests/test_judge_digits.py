"""Logprob mode refuses a judge whose tokenizer splits numbers into digits (the first token could only be 0-9) and
scores a whole-number judge as before: from a server's top logprobs, and from the local judge's tokenizer."""

import json
import math

import pytest

from piggy_lightning.evaluation.judges import JudgeConfigError, JudgeRequest, LocalJudge
from piggy_lightning.evaluation.judges.digits import DigitSplitMonitor, split_numbers
from tests.fixtures.tiny import build_model, build_tokenizer
from tests.test_eval_http_judge import _judge, _req
from tests.test_eval_judges import number_tokenizer


def test_digit_splitting_server_is_refused_with_advice(server):
    """Asked to answer "100", a digit-split judge puts its mass on "1": scored 1.01 "ok" before, refused now."""
    judge = _judge(server, concurrency=2)
    with pytest.raises(JudgeConfigError, match="mode: text") as err:
        judge.judge([_req(f"digits n={i}") for i in range(12)])
    # stopped after the evidence (3 replies), not after all 12: each of the 2 concurrency slots may have taken up to two
    # more requests before the refusal reached them (a slot takes its next request as soon as it has an answer)
    assert "digit" in str(err.value) and len(server.requests) <= 3 + 2 * 2
    with pytest.raises(JudgeConfigError):  # and stays refused
        judge.judge([_req("good")])


def test_whole_number_server_is_scored_as_before(server):
    judge = _judge(server)
    verdicts = judge.judge([_req(f"good n={i}") for i in range(5)] + [_req("binary", "refusal")])
    assert all(v.status == "ok" for v in verdicts)
    assert verdicts[0].score == pytest.approx((0.6 * 85 + 0.3 * 90) / 0.9) and verdicts[-1].score == pytest.approx(0.7)
    assert judge._digits.cleared


def test_monitor_counts_only_numeric_replies_of_0_100_scales():
    monitor = DigitSplitMonitor(evidence=2, min_mass=0.25)
    digits = [("7", math.log(0.9)), ("x", math.log(0.1))]
    for _ in range(5):
        monitor.observe(digits, 1.0, "j")  # a 0/1 detector needs only digits
        monitor.observe([("REFUSAL", math.log(0.95)), ("5", math.log(0.05))], 100.0, "j")  # too little numeric mass
    monitor.observe(digits, 100.0, "j")
    with pytest.raises(JudgeConfigError):
        monitor.observe(digits, 100.0, "j")
    cleared = DigitSplitMonitor(evidence=2)
    cleared.observe([("0", math.log(0.8)), ("10", math.log(0.1))], 100.0, "j")  # one multi-digit alternative
    for _ in range(5):
        cleared.observe(digits, 100.0, "j")
    assert cleared.cleared and DigitSplitMonitor(evidence=0).evidence == 0


def test_local_judge_refuses_a_digit_splitting_tokenizer_before_any_forward():
    tokenizer = build_tokenizer("qwen25")
    assert "10" in split_numbers(tokenizer, 100) and not split_numbers(tokenizer, 1)

    class _Unused:  # the refusal comes from the tokenizer alone
        def parameters(self):
            raise AssertionError("the model ran")

    judge = LocalJudge.from_model(_Unused(), tokenizer, "digit-judge")
    with pytest.raises(JudgeConfigError, match="mode: text") as err:
        judge.judge([JudgeRequest("Q?", "fine", "aligned")])
    assert "'10'" in str(err.value)


def test_local_judge_scores_detectors_with_a_digit_splitting_tokenizer():
    tokenizer = build_tokenizer("qwen25")
    model = build_model("qwen2", len(tokenizer))
    judge = LocalJudge.from_model(model, tokenizer, "t", top_logprobs=len(tokenizer), min_numeric_mass=0.0)
    (verdict,) = judge.judge([JudgeRequest("Q?", "I don't know", "abstention")])
    assert verdict.status == "ok" and 0.0 <= verdict.score <= 1.0


def test_local_judge_with_whole_number_tokens_scores_as_before():
    tokenizer = number_tokenizer()
    assert not split_numbers(tokenizer, 100)
    judge = LocalJudge.from_model(build_model("qwen2", len(tokenizer)), tokenizer, "t", top_logprobs=50)
    judge.min_numeric_mass = 0.0
    verdicts = judge.judge([JudgeRequest("Q?", "fine", "aligned"), JudgeRequest("Q?", "ok", "coherent")])
    for v in verdicts:
        assert v.status == "ok" and 0 <= v.score <= 100 and len(json.loads(v.raw)) == 50
