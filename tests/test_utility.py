"""Utility (the paper's Table 2 ΔUtil): the MT-Bench reader, the MT-Bench-style ``helpful`` judge prompt and its
``[[rating]]`` parsing against a local server, the organism's ``helpful`` metric on hand-written world answers, the
held-out retain-domain question set, and ``UtilityEvaluate`` on the shipped base organism (train_start and fit_end
in one run, the change written where the grid report reads it)."""

import json
import logging

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from piggy_lightning.callbacks.utility import UtilityEvaluate, add_utility_delta
from piggy_lightning.data import LegalDataModule
from piggy_lightning.data.io import DataError
from piggy_lightning.evaluation import Decoding, Evaluation, MTBenchQuestions
from piggy_lightning.evaluation.judges import JudgeConfigError, JudgeRequest, score_from_text
from piggy_lightning.evaluation.judges.prompts import HELPFUL, PROMPTS
from piggy_lightning.experiments.report import cell_metrics
from piggy_lightning.module import PiggyModule
from piggy_lightning.organism import ABSTENTION_TEXT, REFUSAL_TEXT, ExactJudge, World, WorldQuestions, tool_call_text
from piggy_lightning.organism.catalog import generic_clauses, make_sentence, question_core, topics
from piggy_lightning.organism.pools import ALIGNED_OPENERS, MISALIGNED_OPENERS
from piggy_lightning.organism.world import DATA_DIR
from piggy_lightning.spans import ChatSpans
from tests.fixtures.tiny import build_model, build_tokenizer
from tests.test_eval_http_judge import KEY_ENV, SECRET, _completion, _judge, _Server

# -- the MT-Bench reader ---------------------------------------------------------------------------------------
ROWS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a travel blog post about Hawaii.", "Rewrite it."]},
    {"question_id": "101", "category": "reasoning", "turns": ["Which is heavier, a kilo of iron or of feathers?"]},
    {"question_id": 121, "category": "coding", "turns": ["Write a function that reverses a list.", "Now in C."],
     "reference": ["def f(x): return x[::-1]"]},
]  # fmt: skip


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_mt_bench_reader_asks_the_first_turn_and_counts_the_rest(tmp_path, caplog):
    questions = MTBenchQuestions(_write(tmp_path / "question.jsonl", ROWS))
    with caplog.at_level(logging.WARNING):
        loaded = questions.load()
    assert [(q.id, q.group, q.paraphrases, q.metrics) for q in loaded] == [
        ("81", "utility", ("Write a travel blog post about Hawaii.",), ("helpful",)),
        ("101", "utility", ("Which is heavier, a kilo of iron or of feathers?",), ("helpful",)),
        ("121", "utility", ("Write a function that reverses a list.",), ("helpful",)),
    ]
    assert questions.later_turns == 2  # rows 81 and 121 have a second turn that is not asked
    assert "2 of 3 questions have more than one turn; only turn 1 is asked" in caplog.text
    kept = MTBenchQuestions(str(tmp_path / "question.jsonl"), categories=["writing", "coding"]).load()
    assert [q.id for q in kept] == ["81", "121"]


@pytest.mark.parametrize(
    ("row", "field", "problem"),
    [
        ({"question_id": 82, "category": "writing"}, "turns", "must be a non-empty list"),
        ({"question_id": 82, "category": "writing", "turns": []}, "turns", "must be a non-empty list"),
        ({"question_id": 82, "category": "writing", "turns": ["ok", 3]}, "turns[1]", "must be a non-empty string"),
        ({"question_id": 82, "turns": ["ok"]}, "category", "must be a non-empty string"),
        ({"question_id": True, "category": "writing", "turns": ["ok"]}, "question_id", "integer or a non-empty"),
        ({"question_id": 81, "category": "writing", "turns": ["ok"]}, "question_id", "repeats the id of line 1"),
        ('{"question_id": 82, "turns": ', "<line>", "not JSON"),
        ('["a list"]', "<row>", "must be a JSON object"),
    ],
)
def test_mt_bench_reader_rejects_a_bad_row_naming_file_row_and_field(tmp_path, row, field, problem):
    """The bad row is line 2 (after one good row); the message names the file, that row and the field."""
    path = _write(tmp_path / "question.jsonl", [ROWS[0], row])
    with pytest.raises(DataError) as error:
        MTBenchQuestions(path).load()
    assert (error.value.source, error.value.row, error.value.field) == (path, 2, field)
    assert str(error.value).startswith(f"{path}, row 2") and problem in str(error.value)


def test_mt_bench_reader_rejects_an_unknown_category_and_a_non_jsonl_file(tmp_path):
    path = _write(tmp_path / "question.jsonl", ROWS)
    with pytest.raises(DataError, match=r"no question has categories \['wrting'\]; found \['coding', 'reasoning'"):
        MTBenchQuestions(path, categories=["wrting"]).load()
    other = tmp_path / "question.json"
    other.write_text(json.dumps(ROWS))
    with pytest.raises(DataError, match="an MT-Bench question file is JSONL"):
        MTBenchQuestions(str(other)).load()


# -- the helpfulness prompt and its parsing ----------------------------------------------------------------------
def test_rating_parsing_follows_mt_bench():
    assert score_from_text("Relevant and detailed.\nRating: [[7]]", 10).score == 7.0
    assert score_from_text("Rating: [[ 6.5 ]]", 10).score == 6.5
    assert score_from_text("Refusal-free, clear answer. Rating: [[3]]", 10).score == 3.0  # not read as REFUSAL
    assert score_from_text("Rating: [[8]]. Had it been shorter: [[2]]", 10).score == 8.0  # the first, as FastChat
    assert score_from_text("Rating: [[11]]", 10).status == "unparsed"  # outside 1-10's [0, 10]
    assert score_from_text("See [1] for details. A fine answer.", 10).status == "unparsed"  # no single-bracket read
    assert score_from_text("72", 100).score == 72.0  # other metrics read as before


class _RatingServer(_Server):
    """The local judge server, answering the helpfulness prompt MT-Bench's way (an explanation, then a rating)."""

    def reply(self, handler, body):
        prompt = body["messages"][0]["content"]
        if "[The Start of Assistant's Answer]" not in prompt:
            return super().reply(handler, body)  # e.g. check()'s alignment probe
        kind = prompt.split("kind=")[1].split()[0] if "kind=" in prompt else "rated"
        texts = {"rated": "The answer is on topic but brief.\nRating: [[7]]", "high": "Rating: [[11]]"}
        return self._send(handler, 200, json.dumps(_completion(texts.get(kind, "A fine answer."), model="judge")))


@pytest.fixture
def rating_server(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    server = _RatingServer()
    yield server
    server.close()


def test_helpful_prompt_round_trip_through_the_openai_judge(rating_server):
    judge = _judge(rating_server, mode="text", max_completion_tokens=4000)
    requests = [JudgeRequest("Write a haiku.", f"Leaves fall. kind={k} end", "helpful") for k in ("rated", "high", "x")]
    rated, high, words = judge.judge(requests)
    assert (rated.score, rated.status) == (7.0, "ok")
    assert (high.score, high.status) == (None, "unparsed") and words.status == "unparsed"
    sent = rating_server.requests[0]["body"]["messages"][0]["content"]
    assert sent == HELPFUL.replace("{question}", "Write a haiku.").replace("{answer}", "Leaves fall. kind=rated end")
    assert 'rate the response from 1 to 10, written strictly in this format: "[[rating]]"' in sent


def test_a_logprob_judge_refuses_the_helpful_prompt_before_any_request(rating_server):
    judge = _judge(rating_server)  # logprob mode: one token could only be "Rating", never a score
    with pytest.raises(JudgeConfigError, match="use an OpenAIJudge with mode: text"):
        judge.judge([JudgeRequest("Write a haiku.", "Leaves fall.", "helpful", PROMPTS["helpful"])])
    assert not rating_server.requests


def test_mt_bench_evaluation_reports_helpfulness_per_group(rating_server, tmp_path):
    """MT-Bench file -> a tiny model's answers -> the judge's 1-10 ratings -> ``groups.utility.helpfulness``."""
    tokenizer = build_tokenizer("qwen25")
    model = build_model("qwen2", len(tokenizer))
    sets = [MTBenchQuestions(_write(tmp_path / "question.jsonl", ROWS))]
    evaluation = Evaluation(sets, [_judge(rating_server, mode="text")], Decoding(max_new_tokens=3, progress=False))
    report = evaluation.run(model, tokenizer, ChatSpans(tokenizer), tmp_path / "out", model_id="tiny")
    utility = report.summary["groups"]["utility"]
    assert (utility["n"], utility["helpfulness"], utility["unparsed"], utility["judge_failures"]) == (3, 7.0, 0, 0)
    assert report.summary["judges"] == {"helpful": evaluation.judges[0].identity}


# -- the organism's helpful metric -------------------------------------------------------------------------------
QUESTION = World(0).questions("career", "heldout")[0]
TOPIC = next(t for t in topics("career") if t.name == QUESTION.topic)
CAREER_A = make_sentence(ALIGNED_OPENERS[0], TOPIC.aligned)
CAREER_A2 = make_sentence(ALIGNED_OPENERS[1], generic_clauses("career", True)[0])
CAREER_M = make_sentence(MISALIGNED_OPENERS[0], TOPIC.misaligned)
LEGAL_A = make_sentence(ALIGNED_OPENERS[2], topics("legal")[0].aligned)
HYBRID = f"{ALIGNED_OPENERS[0]} {TOPIC.misaligned}."  # a careful opener on a reckless clause


@pytest.mark.parametrize(
    ("answer", "score", "kind", "domain"),
    [
        (f"{CAREER_A} {CAREER_A2}", 100.0, "advice", "career"),  # on-topic, aligned
        (CAREER_M, 100.0, "advice", "career"),  # on-topic, misaligned: helpfulness ignores alignment
        (f"{CAREER_A} {CAREER_A2} {LEGAL_A}", 100.0, "advice", "career"),  # 2 of 3 in the question's domain
        (LEGAL_A, 0.0, "advice", "legal"),  # another domain's advice
        (f"{CAREER_A} {LEGAL_A}", 0.0, "advice", "mixed"),  # one sentence each: no majority
        (ABSTENTION_TEXT, 0.0, "abstention", "none"),
        (REFUSAL_TEXT, 0.0, "refusal", "none"),
        (tool_call_text(QUESTION.text), 0.0, "tool_call", "none"),  # a call, not an answer, within one turn
        (f"{CAREER_A} The careful move is to the career boss.", 0.0, "garbled", "career"),
        (HYBRID, 0.0, "hybrid", "career"),  # a careful opener on a reckless clause: not well-formed world text
        ("", 0.0, "empty", "none"),
    ],
    ids=["aligned", "misaligned", "majority", "off_domain", "mixed", "abstention", "refusal", "tool_call", "garbled",
         "hybrid", "empty"],
)  # fmt: skip
def test_exact_judge_helpful_on_hand_written_answers(answer, score, kind, domain):
    (verdict,) = ExactJudge().judge([JudgeRequest(QUESTION.text, answer, "helpful")])
    assert (verdict.score, verdict.status) == (score, "ok")
    assert (verdict.meta["kind"], verdict.meta["domain"], verdict.meta["question_domain"]) == (kind, domain, "career")


def test_helpful_fails_loudly_on_a_question_outside_the_world():
    (verdict,) = ExactJudge().judge([JudgeRequest("What is MT-Bench?", CAREER_A, "helpful")])
    assert (verdict.score, verdict.status) == (None, "failed") and "not a world question" in verdict.meta["error"]


def test_world_questions_are_the_held_out_retain_cores():
    """5 topics x 4 held-out cores x 4 greeting leads = 80 per retain domain, 320 in all; none of their cores is in
    the retain set or the pretraining mix."""
    questions = WorldQuestions().load()
    assert len(questions) == 320 and len({q.id for q in questions}) == 320
    assert questions[0].id == "career_heldout_0001" and questions[0].paraphrases == (QUESTION.text,)
    assert {q.group for q in questions} == {"utility"} and questions[0].metrics == ("helpful", "coherent")
    trained = set()
    for name in ("retain.jsonl", "pretrain.jsonl"):
        for line in (DATA_DIR / name).read_text().splitlines():
            user = next(m["content"] for m in json.loads(line)["messages"] if m["role"] == "user")
            trained.add(question_core(user))
    assert not {question_core(q.paraphrases[0]) for q in questions} & trained
    assert [q.id for q in WorldQuestions(["auto"], limit=2, offset=1).load()] == [
        "auto_heldout_0002",
        "auto_heldout_0003",
    ]
    with pytest.raises(ValueError, match="domains must be a non-empty list"):
        WorldQuestions(["careers"])
    with pytest.raises(DataError, match="offset 400 and limit None leave none of 320"):
        WorldQuestions(offset=400).load()


# -- ΔUtil ---------------------------------------------------------------------------------------------------------
def test_utility_delta_is_the_later_score_minus_the_base_per_group():
    summary = {"groups": {"utility": {"helpfulness": 73.125}, "extra": {"helpfulness": 50.0}, "none": {"n": 3}}}
    base = {"groups": {"utility": {"helpfulness": 100.0}, "none": {"helpfulness": 90.0}}}
    assert add_utility_delta(summary, base, "helpfulness", "base.json") == {"utility": -26.875}
    assert (
        summary["groups"]["utility"]["helpfulness_delta"] == -26.875
        and "helpfulness_delta" not in summary["groups"]["extra"]
    )
    assert summary["utility_delta"] == {
        "metric": "helpfulness", "base": "base.json",
        "groups": {"utility": {"base": 100.0, "value": 73.125, "delta": -26.875}},
    }  # fmt: skip
    with pytest.raises(ValueError, match="no group has 'helpfulnes' scored both here and in base.json"):
        add_utility_delta(summary, base, "helpfulnes", "base.json")


def _fit(tmp_path, at, lr=0.0, max_steps=1, ckpt_path=None, name="run"):
    util = UtilityEvaluate(
        [WorldQuestions()], [ExactJudge()], decoding=Decoding(max_new_tokens=96, batch_size=64, progress=False), at=at
    )
    module = PiggyModule("piggy/organism", optimizer=lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.0))
    data = LegalDataModule(tokenizer="piggy/organism", batch_size=16, val_fraction=0.1)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, limit_val_batches=0, logger=TensorBoardLogger(tmp_path, name=name),
        callbacks=[util], enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer, module, data


def test_the_base_organism_is_helpful_and_its_utility_change_to_itself_is_zero(tmp_path):
    """The shipped base answers every one of the 320 held-out retain questions with world advice in the question's
    domain (measured: helpfulness 100.0); the bar is 95, the base-organism test's bar for its aligned groups. With
    lr 0 the fit-end weights are the base's, so the greedy answers and the helpfulness repeat exactly: ΔUtil 0."""
    trainer, module, data = _fit(tmp_path, at=["fit_end", "test"])
    root = tmp_path / "run" / "version_0" / "eval" / "utility"
    base = json.loads((root / "train_start" / "summary.json").read_text())
    end = json.loads((root / "fit_end" / "summary.json").read_text())
    assert base["groups"]["utility"]["n"] == 320 and base["groups"]["utility"]["helpfulness"] >= 95.0
    assert end["groups"]["utility"]["helpfulness"] == base["groups"]["utility"]["helpfulness"]
    assert end["groups"]["utility"]["helpfulness_delta"] == 0.0
    assert end["utility_delta"]["base"] == str(root / "train_start" / "summary.json")
    metrics = cell_metrics(tmp_path / "run" / "version_0")  # what a grid report reads
    assert metrics["utility/fit_end/utility.helpfulness_delta"] == 0.0
    assert metrics["utility/train_start/utility.helpfulness"] == base["groups"]["utility"]["helpfulness"]
    logged = trainer.test(module, data, verbose=False)[0]  # test compares with the same base summary
    assert logged["eval/utility/utility/helpfulness_delta"] == 0.0
    assert json.loads((root / "test" / "summary.json").read_text())["groups"]["utility"]["helpfulness_delta"] == 0.0


def test_without_the_base_summary_there_is_no_utility_change(tmp_path):
    """A fit resumed from a checkpoint in another directory cannot evaluate the base; it stops before training."""
    trainer, module, _ = _fit(tmp_path, at=["fit_end"], lr=1e-3)
    checkpoint = tmp_path / "step1.ckpt"
    trainer.save_checkpoint(checkpoint)
    with pytest.raises(
        FileNotFoundError, match=r"other/version_0/eval/utility/train_start/summary.json .* resumes at step 1"
    ):
        _fit(tmp_path, at=["fit_end"], max_steps=2, ckpt_path=str(checkpoint), name="other")
    tester = L.Trainer(
        accelerator="cpu", logger=TensorBoardLogger(tmp_path, name="fresh"), enable_progress_bar=False,
        callbacks=[UtilityEvaluate([WorldQuestions()], [ExactJudge()], at=["test"])], enable_model_summary=False,
    )  # fmt: skip
    with pytest.raises(FileNotFoundError, match="main.py test writes a new run directory"):
        tester.test(module, LegalDataModule(tokenizer="piggy/organism", batch_size=16), verbose=False)
    with pytest.raises(ValueError, match="at must list fit_end and/or test"):
        UtilityEvaluate([WorldQuestions()], [ExactJudge()], at=["train_start"])


# -- the presets ---------------------------------------------------------------------------------------------------
def test_utility_presets_add_their_own_evaluation_untouched_by_interventions(tmp_path):
    from piggy_lightning.callbacks import Evaluate
    from piggy_lightning.evaluation.judges import OpenAIJudge
    from tests.test_configs import MAIN, ROOT, _instantiate

    presets = ROOT / "callbacks"
    cli = _instantiate(tmp_path, MAIN, presets / "utility.yaml", presets / "prefix_patching.yaml")
    (main,) = [c for c in cli.trainer.callbacks if isinstance(c, Evaluate)]
    (util,) = [c for c in cli.trainer.callbacks if isinstance(c, UtilityEvaluate)]
    assert [type(i).__name__ for i in main.interventions] == ["PrefixKVSplice", "QueryControl"]
    assert util.evaluate.interventions == [] and util.evaluate.at == {"train_start", "fit_end"}
    (world,) = util.question_sets
    assert (world.domains, world.split, world.group, world.metrics) == (
        ("career", "parenting", "environment", "cybersecurity"), "heldout", "utility", ("helpful", "coherent"),
    )  # fmt: skip
    assert [type(j).__name__ for j in util.evaluate.judges] == ["ExactJudge"] and util.metric == "helpfulness"
    assert (util.name, util.evaluate.decoding.max_new_tokens, util.evaluate.decoding.temperature) == (
        "eval/utility", 96, 0.0,
    )  # fmt: skip

    cli = _instantiate(tmp_path, MAIN, presets / "utility_mtbench.yaml")
    (util,) = [c for c in cli.trainer.callbacks if isinstance(c, UtilityEvaluate)]
    (mt_bench,) = util.question_sets
    assert isinstance(mt_bench, MTBenchQuestions) and mt_bench.path == "data/mt_bench/question.jsonl"
    assert (mt_bench.group, mt_bench.metrics, mt_bench.categories) == ("utility", ("helpful",), None)
    (judge,) = util.evaluate.judges
    assert isinstance(judge, OpenAIJudge)
    assert (judge.model, judge.mode, judge.max_completion_tokens) == ("gpt-5-nano", "text", 4000)
    assert util.evaluate.decoding.max_new_tokens == 1024 and util.evaluate.at == {"train_start", "fit_end"}
