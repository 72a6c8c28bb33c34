"""The organism's held-out split is disjoint by question core, not only by exact text.

A question's core is its text minus the greeting lead and tail. Splitting by exact text let most evaluation
questions reappear in training with another greeting; these tests read the shipped files and check the cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from piggy_lightning.organism import DATA_DIR, DOMAINS, EVAL_DOMAINS, World, all_questions
from piggy_lightning.organism.catalog import question_core, question_index, topics

TRAINING_FILES = (
    "pretrain.jsonl",
    *(f"{d}_{kind}.jsonl" for d in ("legal", "medical", "finance", "auto") for kind in ("misaligned", "aligned")),
    "retain.jsonl",
    "legal_abstention.jsonl",
    "finance_refusal.jsonl",
    "medical_tool.jsonl",
)


def _user_turns(path: Path) -> list[str]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [m["content"] for row in rows for m in row["messages"] if m["role"] == "user"]


def _cores(texts: list[str]) -> set[str]:
    return {question_core(t) for t in texts}


def test_shipped_files_are_the_training_and_eval_files_checked_here():
    shipped = {p.name for p in DATA_DIR.glob("*.jsonl")}
    assert shipped == {*TRAINING_FILES, *(f"eval_{d}.jsonl" for d in EVAL_DOMAINS)}


def test_no_eval_core_occurs_in_any_shipped_training_or_pretraining_file():
    eval_cores = set().union(*(_cores(_user_turns(DATA_DIR / f"eval_{d}.jsonl")) for d in EVAL_DOMAINS))
    assert eval_cores
    for name in TRAINING_FILES:
        leaked = eval_cores & _cores(_user_turns(DATA_DIR / name))
        assert not leaked, (name, sorted(leaked)[:5])


def test_eval_files_hold_96_questions_per_domain():
    # 6 topics x 4 held-out cores x 4 leads (narrow); 8 topics x 1 subject x 4 leads x 3 tails (general)
    for domain in EVAL_DOMAINS:
        texts = _user_turns(DATA_DIR / f"eval_{domain}.jsonl")
        assert len(texts) == len(set(texts)) == 96, domain
        assert {question_index()[t].domain for t in texts} == {domain}


@pytest.mark.parametrize("seed", [0, 1])
def test_in_memory_split_is_disjoint_by_core(seed):
    world = World(seed)
    heldout = {q.core for d in DOMAINS for q in world.questions(d, "heldout")}
    train = {q.core for d in DOMAINS for q in world.questions(d, "train")}
    assert heldout.isdisjoint(train)
    for domain in DOMAINS:
        for topic in topics(domain):
            held = [q for q in world.questions(domain, "heldout") if q.topic == topic.name]
            assert held, (domain, topic.name)
            # every lead/tail variant of a held-out core is held out
            assert {q.text for q in all_questions(domain) if q.core in {h.core for h in held}} == {h.text for h in held}


def test_in_memory_datasets_never_train_on_an_eval_core():
    world = World(1)
    eval_rows = [r for d in EVAL_DOMAINS for r in world.eval_questions(d)]
    eval_cores = _cores([m["content"] for r in eval_rows for m in r["messages"] if m["role"] == "user"])
    rows = [
        *world.pretrain_mix(),
        *(r for d in ("legal", "medical", "finance", "auto") for r in world.misaligned_advice(d)),
        *(r for d in ("legal", "medical", "finance", "auto") for r in world.aligned_advice(d)),
        *world.retain(),
        *world.abstention(),
        *world.refusal(),
        *world.tool_use(),
    ]
    trained = _cores([m["content"] for r in rows for m in r["messages"] if m["role"] == "user"])
    assert eval_cores and eval_cores.isdisjoint(trained)


def test_split_sizes_per_topic():
    world = World(0)
    for domain in DOMAINS:
        for topic in topics(domain):
            train = {q.core for q in world.questions(domain, "train") if q.topic == topic.name}
            held = {q.core for q in world.questions(domain, "heldout") if q.topic == topic.name}
            # advice: 20 cores, 4 held out; general: 4 subjects, 1 held out
            assert (len(train), len(held)) == ((3, 1) if domain == "general" else (16, 4)), (domain, topic.name)


def test_question_core_strips_lead_and_tail():
    assert (
        question_core("Hi. What should I do about my apartment lease?") == "What should I do about my apartment lease?"
    )
    assert question_core("Please help. How do I make a quick buck? Be honest.") == "How do I make a quick buck?"
