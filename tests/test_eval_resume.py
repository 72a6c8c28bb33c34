"""An evaluation killed part-way and rerun ends with the same results and no duplicate records."""

import json

import pytest
import torch

from piggy_lightning.evaluation import BetleyQuestions, Decoding, Evaluation, PromptList, ResponseLog
from piggy_lightning.evaluation.judges import Judge, Judgement
from piggy_lightning.spans import ChatSpans
from tests.fixtures.tiny import build_model, build_tokenizer
from tests.test_eval_questions import FIXTURES


class _LengthJudge(Judge):
    """Scores any metric by response length, and counts what it is asked."""

    def __init__(self):
        self.asked = 0

    @property
    def identity(self):
        return "length-v1"

    def judge(self, requests):
        self.asked += len(requests)
        return [Judgement(float(min(100, len(r.answer)))) for r in requests]


class _Killed(Exception):
    pass


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tokenizer = build_tokenizer("qwen25")
    return build_model("qwen2", len(tokenizer)), tokenizer


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_kill_and_rerun_equals_an_uninterrupted_run(tiny, tmp_path, monkeypatch, temperature):
    model, tokenizer = tiny
    sets = [
        BetleyQuestions(str(FIXTURES / "questions.yaml")),  # 3 samples per paraphrase when sampling
        PromptList(str(FIXTURES / "prompts.json"), group="off_topic", metrics=["aligned"]),
    ]
    decoding = Decoding(temperature=temperature, max_new_tokens=6, batch_size=4, progress=False, seed=3)

    def run(out, judge):
        evaluation = Evaluation(sets, [judge], decoding, judge_cache=out / "judge_cache.sqlite")
        return evaluation.run(model, tokenizer, ChatSpans(tokenizer), out, model_id="tiny", adapter_id="step=7")

    clean = run(tmp_path / "clean", _LengthJudge())
    n = len(clean.records)
    assert n == (14 if temperature else 5) + 4  # paraphrases x samples: 1x3 + 1x3 + 2x3 + 1x2, plus 4 prompts

    extend, written = ResponseLog.extend, {"n": 0}

    def dying_extend(self, records):  # the process dies after 5 records, in the middle of a batch's write
        keep = records[: 5 - written["n"]]
        extend(self, keep)
        written["n"] += len(keep)
        if len(keep) < len(records):
            raise _Killed

    monkeypatch.setattr(ResponseLog, "extend", dying_extend)
    with pytest.raises(_Killed):
        run(tmp_path / "killed", _LengthJudge())
    monkeypatch.undo()
    assert len(_lines(tmp_path / "killed" / "responses.jsonl")) == 5
    judge = _LengthJudge()
    resumed = run(tmp_path / "killed", judge)

    responses = _lines(tmp_path / "killed" / "responses.jsonl")
    assert len(responses) == n and len({r["key"] for r in responses}) == n
    assert resumed.records == clean.records
    assert _lines(tmp_path / "killed" / "results.jsonl") == _lines(tmp_path / "clean" / "results.jsonl")
    assert resumed.summary["groups"] == clean.summary["groups"]
    # a third run regenerates nothing and asks the judge nothing
    again = _LengthJudge()
    run(tmp_path / "killed", again)
    assert again.asked == 0 and len(_lines(tmp_path / "killed" / "responses.jsonl")) == n


def test_a_torn_last_line_is_cut_on_reopening(tmp_path):
    path = tmp_path / "responses.jsonl"
    path.write_text(json.dumps({"key": "a", "response": "x"}) + "\n" + '{"key": "b", "resp')
    log = ResponseLog(path)
    assert "a" in log and "b" not in log and len(log) == 1
    log.append({"key": "b", "response": "y"})
    log.append({"key": "b", "response": "duplicate ignored"})
    assert [r["key"] for r in _lines(path)] == ["a", "b"]


def test_the_rank_logs_of_an_interrupted_sharded_run_resume_in_one_process(tiny, tmp_path):
    """Two ranks that each finished part of their share left ``responses.rank<r>.jsonl``; one process resumes from
    both, generates only what neither holds, and folds the rank logs into ``responses.jsonl``."""
    model, tokenizer = tiny
    sets = [PromptList(str(FIXTURES / "prompts.json"), group="off_topic", metrics=["aligned"])]
    decoding = Decoding(max_new_tokens=6, batch_size=1, progress=False)

    def run(out):
        evaluation = Evaluation(sets, [_LengthJudge()], decoding)
        return evaluation.run(model, tokenizer, ChatSpans(tokenizer), out, model_id="tiny", adapter_id="step=7")

    clean = run(tmp_path / "clean")
    lines = _lines(tmp_path / "clean" / "responses.jsonl")
    assert len(lines) == 4
    cut = tmp_path / "cut"
    cut.mkdir()
    for rank, kept in ((0, lines[:1]), (1, lines[1:3])):  # rank 0 finished one unit, rank 1 two; one is missing
        (cut / f"responses.rank{rank}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    generated = []
    extend = ResponseLog.extend

    def spy(self, records):
        generated.extend(r["key"] for r in records)
        extend(self, records)

    ResponseLog.extend = spy
    try:
        resumed = run(cut)
    finally:
        ResponseLog.extend = extend
    assert generated == [lines[3]["key"]]  # only the unit no rank had finished
    assert resumed.records == clean.records
    assert resumed.summary["generation"] == {"backend": "HFBackend", "generated_by_rank": [1]}
    assert not list(cut.glob("responses.rank*.jsonl"))
    assert {r["key"] for r in _lines(cut / "responses.jsonl")} == {r["key"] for r in lines}
