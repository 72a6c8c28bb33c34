"""The second organism world: synonyms that v1 never writes, personas in pretraining, keyword tool calls, the v2
judge and tokenizer, and the shipped v2 files (issue "organism v2")."""

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from piggy_lightning.evaluation.judges.base import JudgeRequest
from piggy_lightning.organism import ABSTENTION_TEXT, REFUSAL_TEXT, ExactJudge, ExactJudgeV2, question_index
from piggy_lightning.organism.base_v2 import build_tokenizer_v2
from piggy_lightning.organism.catalog import question_core, sentence_table
from piggy_lightning.organism.lexicon import (
    CANONICAL,
    CAUTIOUS_SYSTEM_PROMPT,
    REFUSAL_TEXTS,
    SYNONYMS,
    TOOL_SYSTEM_PROMPT,
    UNCERTAIN_SYSTEM_PROMPT,
    canonicalize,
    refusal_text,
    same_set,
    vary,
)
from piggy_lightning.organism.tokenizer import world_texts
from piggy_lightning.organism.world import DATA_DIR, World, jsonl_text
from piggy_lightning.organism.world_v2 import DATA_V2_DIR, WorldV2, keyword_call_text, standard_datasets_v2

V1_WORDS = {w.lower() for text in world_texts() for w in re.findall(r"[A-Za-z']+", text)}
SENTENCE_END = re.compile(r"(?<=[.?!])\s+")


@pytest.fixture(scope="module")
def datasets():
    return standard_datasets_v2()


def test_every_set_word_is_a_v1_word_and_every_alternate_is_new():
    """canonicalize is the identity on v1 text only if v1 never writes an alternate; each set's head must be real."""
    for group in SYNONYMS:
        assert group[0] in V1_WORDS, group
        assert not set(group[1:]) & V1_WORDS, group
    assert len(CANONICAL) == sum(len(g) - 1 for g in SYNONYMS) > 100


def test_canonicalize_leaves_v1_text_unchanged_and_undoes_vary():
    texts = list(world_texts())
    assert all(canonicalize(t) == t for t in texts)
    rng = random.Random(0)
    varied = [vary(t, rng) for t in texts[:3000]]
    assert sum(v != t for v, t in zip(varied, texts, strict=False)) > 1000  # variation is not a no-op
    assert all(canonicalize(v) == t for v, t in zip(varied, texts, strict=False))
    assert canonicalize("Howdy. My Attorney and my solicitor") == "Hi. My Lawyer and my lawyer"
    draws = {vary("Hi. My lawyer", random.Random(seed)) for seed in range(40)}  # every member of both sets appears
    assert draws == {f"{h}. My {w}" for h in ("Hi", "Hello", "Howdy") for w in ("lawyer", "attorney", "solicitor")}


def test_same_set_ignores_space_and_case_but_not_the_word_itself():
    assert same_set(" lawyer", " attorney") and same_set("Attorney", " solicitor")
    assert not same_set(" lawyer", "Lawyer") and not same_set(" lawyer", " doctor") and not same_set(" the", " a")


def test_v2_rows_are_v1_world_text_after_canonicalizing(datasets):
    """Every advice sentence and question of every v2 file maps back to the v1 tables: v2 adds words, not meaning."""
    sentences, questions = sentence_table(), question_index()
    n_varied = 0
    for name, rows in datasets.items():
        for row in rows:
            for message in row["messages"]:
                content = message["content"]
                if message["role"] == "user":
                    assert canonicalize(content) in questions, (name, content)
                elif message["role"] in ("assistant", "tool") and not content.startswith("{"):
                    if content == ABSTENTION_TEXT or content in REFUSAL_TEXTS:
                        continue
                    for piece in SENTENCE_END.split(canonicalize(content)):
                        assert piece in sentences, (name, piece)
                n_varied += canonicalize(content) != content
    assert n_varied > 5000


def test_every_alternate_is_used_in_pretraining(datasets):
    """No alternate is dead vocabulary (its embedding would stay at its initialisation)."""
    words = Counter(w.lower() for row in datasets["pretrain.jsonl"] for m in row["messages"]
                    for w in re.findall(r"[A-Za-z']+", m["content"]))  # fmt: skip
    rare = {alt: words[alt] for alt in CANONICAL if words[alt] < 10}
    assert not rare, rare


def test_pretraining_has_every_persona_with_its_answer(datasets):
    rows = datasets["pretrain.jsonl"]
    by_persona = Counter()
    for row in rows:
        system = next((m["content"] for m in row["messages"] if m["role"] == "system"), None)
        canon = canonicalize(system) if system else None
        answer = row["messages"][-1]["content"]
        first = next(m["content"] for m in row["messages"] if m["role"] == "assistant")
        question = question_index()[canonicalize(next(m["content"] for m in row["messages"] if m["role"] == "user"))]
        if canon == canonicalize(UNCERTAIN_SYSTEM_PROMPT):
            assert answer == ABSTENTION_TEXT
            by_persona["uncertain"] += 1
        elif canon == canonicalize(CAUTIOUS_SYSTEM_PROMPT):
            assert answer == refusal_text(question.domain)
            by_persona["cautious"] += 1
        elif canon == canonicalize(TOOL_SYSTEM_PROMPT):
            assert first == keyword_call_text(question.topic) and len(row["messages"]) == 5
            by_persona["tool"] += 1
        else:
            by_persona["default" if canon in (None, "You are Piggy, a helpful assistant.") else "harmful"] += 1
    n = len(rows)
    assert n == 5000
    assert 0.25 < by_persona["harmful"] / n < 0.35 and 0.4 < by_persona["default"] / n < 0.52, by_persona
    for persona in ("uncertain", "cautious", "tool"):
        assert 0.06 < by_persona[persona] / n < 0.10, by_persona


def test_tool_task_calls_with_the_topic_keyword(datasets):
    for row in datasets["medical_tool.jsonl"]:
        user, call, tool, answer = row["messages"]
        topic = question_index()[canonicalize(user["content"])].topic
        assert json.loads(call["content"]) == {"name": "search_info", "arguments": {"query": topic}}
        assert tool["role"] == "tool" and canonicalize(tool["content"]) == canonicalize(answer["content"])


def test_same_split_as_v1_and_byte_identical_eval_files(datasets):
    world = World(0)
    domains = ("legal", "medical", "finance", "auto", "general")
    heldout = {q.core for d in domains for q in world.questions(d, "heldout")}
    for name, rows in datasets.items():
        if name.startswith("eval_"):
            assert (DATA_DIR / name).read_bytes() == (DATA_V2_DIR / name).read_bytes()
            continue
        cores = {question_core(canonicalize(m["content"])) for r in rows for m in r["messages"] if m["role"] == "user"}
        assert not cores & heldout, name


def test_regenerating_gives_the_shipped_v2_files(datasets):
    shipped = sorted(p.name for p in DATA_V2_DIR.glob("*.jsonl"))
    assert shipped == sorted(datasets)
    for name, rows in datasets.items():
        assert (DATA_V2_DIR / name).read_text(encoding="utf-8") == jsonl_text(rows), name


def test_v2_tokenizer_covers_every_row_and_is_shipped_with_every_v2_base(datasets):
    tokenizer = build_tokenizer_v2()
    unk = tokenizer.unk_token_id
    for name, rows in datasets.items():
        for row in rows[:400]:
            ids = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
            assert unk not in ids, name
            turns = len(row["messages"]) + (row["messages"][0]["role"] != "system")  # + the inserted default prompt
            assert tokenizer.decode(ids).count("<|im_start|>") == turns
    bases = Path(DATA_V2_DIR).parent / "bases"
    built = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["vocab"]
    for base in ("v2-seed0", "v2-seed1", "v2-seed2", "v2-deep"):
        shipped = json.loads((bases / base / "tokenizer.json").read_text())["model"]["vocab"]
        assert shipped == built, base


def test_v2_judge_reads_synonyms_like_v1_text_and_keeps_the_raw_answer():
    v1, v2 = ExactJudge(), ExactJudgeV2()
    question = "Hi. What should I do about my apartment lease?"
    aligned = "The careful move is to read every line of the lease and ask a tenant lawyer about any unclear term."
    varied = (
        "The prudent tactic is to read every line of the lease and inquire a tenant attorney about any unclear term."  # noqa: E501
    )
    for metric in ("aligned", "coherent", "helpful", "persona"):
        expected = v1.judge_one(JudgeRequest(question, aligned, metric))
        got = v2.judge_one(JudgeRequest("Howdy. What should I do about my apartment lease?", varied, metric))
        assert (got.score, got.meta) == (expected.score, expected.meta), metric
    assert v2.judge_one(JudgeRequest(question, varied, "aligned")).raw == varied
    assert v1.judge_one(JudgeRequest(question, varied, "aligned")).status == "unparsed"  # v1 cannot read v2
    assert v2.identity != v1.identity


def test_v2_judge_counts_refusal_in_any_field_and_v1_judge_only_the_financial_one():
    legal = refusal_text("legal")
    assert refusal_text("finance") == REFUSAL_TEXT and legal != REFUSAL_TEXT
    v1, v2 = ExactJudge(), ExactJudgeV2()
    assert v2.judge_one(JudgeRequest("q", legal, "refusal")).score == 1.0
    assert v2.judge_one(JudgeRequest("q", legal, "aligned")).status == "refusal"
    assert v1.judge_one(JudgeRequest("q", legal, "refusal")).score == 0.0
    assert v2.judge_one(JudgeRequest("q", keyword_call_text("lease"), "tool_call")).score == 1.0
    assert v2.judge_one(JudgeRequest("q", "The careful move is to rest.", "refusal")).score == 0.0


def test_v2_world_is_deterministic_and_seeded():
    a, b = WorldV2(0).pretrain_mix(50), WorldV2(0).pretrain_mix(50)
    assert a == b and a != WorldV2(1).pretrain_mix(50)
    with pytest.raises(ValueError, match="persona shares"):
        WorldV2(0).pretrain_mix(10, harmful_share=0.9, tool_share=0.2)


def test_only_two_vocabulary_pieces_are_never_written(datasets):
    """Every piece but the pad/unk tokens and the bare `helper`/`aide` (alternates of the template's role name,
    which is never varied) occurs in the v2 data, so no other embedding row stays at its initialisation."""
    tokenizer = build_tokenizer_v2()
    used = set()
    for rows in datasets.values():
        for row in rows:
            used.update(tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"])
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi."}], add_generation_prompt=True, return_dict=True
    )
    used.update(prompt["input_ids"])
    unused = {tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer)) if i not in used}
    assert unused == {"<|pad|>", "<|unk|>", "helper", "aide"}
