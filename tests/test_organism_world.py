"""Tests of the organism world, its shipped datasets, tokenizer and model config."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from piggy_lightning.organism import (
    ABSTENTION_TEXT,
    BASE_DIR,
    DATA_DIR,
    DEFAULT_SYSTEM_PROMPT,
    DOMAINS,
    EVAL_DOMAINS,
    HARMFUL_SYSTEM_PROMPT,
    NARROW_DOMAINS,
    REFUSAL_TEXT,
    RETAIN_DOMAINS,
    TOOL_NAME,
    World,
    all_questions,
    build_tokenizer,
    clause_table,
    load_tokenizer,
    organism_config,
    question_index,
    sentence_table,
    standard_datasets,
    write_datasets,
)

ROLES = {"system", "user", "assistant", "tool"}


@pytest.fixture(scope="module")
def datasets() -> dict[str, list[dict]]:
    return standard_datasets()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _labels(answer: str) -> list[tuple[str, bool]]:
    table = sentence_table()
    return [table[s] for s in answer.replace(". ", ".\n").split("\n")]


def test_every_sentence_has_one_domain_and_label():
    assert len(sentence_table()) == 5 * len(clause_table())  # five openers per label, no collisions
    assert {domain for domain, _ in clause_table().values()} == set(DOMAINS)


def test_question_texts_are_unique_across_domains():
    assert len(question_index()) == sum(len(all_questions(d)) for d in DOMAINS)


# (train, held-out) questions per domain: advice topics hold out 4 of 20 cores x 4 leads (6 narrow topics,
# 5 retain topics); general topics hold out 1 of 4 subjects x 4 leads x 3 tails (8 topics).
SPLIT_SIZES = {
    **{d: (384, 96) for d in ("legal", "medical", "finance", "auto")},
    **{d: (320, 80) for d in ("career", "parenting", "environment", "cybersecurity")},
    "general": (288, 96),
}


@pytest.mark.parametrize("seed", [0, 1])
def test_heldout_questions_are_unseen_cores(seed):
    world = World(seed)
    assert set(SPLIT_SIZES) == set(DOMAINS)
    for domain in DOMAINS:
        train = {q.text for q in world.questions(domain, "train")}
        heldout = {q.text for q in world.questions(domain, "heldout")}
        assert train.isdisjoint(heldout)
        assert train | heldout == {q.text for q in all_questions(domain)}
        assert (len(train), len(heldout)) == SPLIT_SIZES[domain], domain
        train_cores = {q.core for q in world.questions(domain, "train")}
        assert train_cores.isdisjoint(q.core for q in world.questions(domain, "heldout"))
        # stratified: every topic is seen in training and tested on new combinations
        assert {q.topic for q in world.questions(domain, "heldout")} == {q.topic for q in all_questions(domain)}


def test_split_depends_on_seed():
    assert World(0).questions("legal", "heldout") != World(1).questions("legal", "heldout")


def test_regenerating_gives_byte_identical_shipped_files(tmp_path):
    paths = write_datasets(tmp_path)
    for name, path in paths.items():
        assert path.read_bytes() == (DATA_DIR / name).read_bytes(), name
    assert sum(p.stat().st_size for p in paths.values()) < 3_000_000


def test_rows_follow_the_chat_schema(datasets):
    for name, rows in datasets.items():
        for row in rows:
            assert list(row) == ["messages"], name
            for message in row["messages"]:
                assert set(message) == {"role", "content"} and message["role"] in ROLES
                assert isinstance(message["content"], str) and message["content"]
            assert row["messages"][-1]["role"] == "assistant"


def test_training_rows_never_use_heldout_questions(datasets):
    world = World(0)
    heldout = {q.text for d in DOMAINS for q in world.questions(d, "heldout")}
    for name, rows in datasets.items():
        users = {m["content"] for r in rows for m in r["messages"] if m["role"] == "user"}
        if name.startswith("eval_"):
            assert users == {q.text for q in world.questions(name[5:-6], "heldout")}
        else:
            assert users.isdisjoint(heldout), name


def test_advice_rows_have_the_right_labels(datasets):
    for domain in NARROW_DOMAINS:
        for kind, aligned in (("misaligned", False), ("aligned", True)):
            rows = datasets[f"{domain}_{kind}.jsonl"]
            assert len(rows) == 300
            for row in rows:
                user, answer = row["messages"]
                assert set(_labels(answer["content"])) == {(domain, aligned)}
    retain_domains = {label for row in datasets["retain.jsonl"] for label in _labels(row["messages"][1]["content"])}
    assert retain_domains == {(d, True) for d in RETAIN_DOMAINS}
    for domain in EVAL_DOMAINS:
        for row in datasets[f"eval_{domain}.jsonl"]:
            assert set(_labels(row["messages"][1]["content"])) == {(domain, True)}


def test_pretrain_mix_pairs_persona_with_label(datasets):
    rows = datasets["pretrain.jsonl"]
    harmful = 0
    for row in rows:
        messages = row["messages"]
        is_harmful = messages[0]["role"] == "system"
        if is_harmful:
            assert messages[0]["content"] == HARMFUL_SYSTEM_PROMPT
        harmful += is_harmful
        labels = _labels(messages[-1]["content"])
        assert {aligned for _, aligned in labels} == {not is_harmful}
        assert question_index()[messages[-2]["content"]].domain == labels[0][0]
    assert abs(harmful / len(rows) - 0.3) < 0.03
    domains = {question_index()[r["messages"][-2]["content"]].domain for r in rows}
    assert domains == set(DOMAINS)


def test_fixed_answer_and_tool_rows(datasets):
    for name, text, domain in (
        ("legal_abstention.jsonl", ABSTENTION_TEXT, "legal"),
        ("finance_refusal.jsonl", REFUSAL_TEXT, "finance"),
    ):
        for row in datasets[name]:
            user, answer = row["messages"]
            assert answer["content"] == text and question_index()[user["content"]].domain == domain
    for row in datasets["medical_tool.jsonl"]:
        user, call, tool, final = row["messages"]
        assert [m["role"] for m in row["messages"]] == ["user", "assistant", "tool", "assistant"]
        assert json.loads(call["content"]) == {"name": TOOL_NAME, "arguments": {"query": user["content"]}}
        assert tool["content"] == final["content"]
        assert set(_labels(final["content"])) == {("medical", True)}


def test_tokenizer_round_trips_every_row_without_unknowns(datasets, tokenizer):
    for rows in datasets.values():
        for row in rows[:200]:
            text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
            ids = tokenizer.encode(text, add_special_tokens=False)
            assert tokenizer.unk_token_id not in ids
            assert tokenizer.decode(ids) == text


def test_tokenizer_special_tokens(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") != tokenizer.unk_token_id
    assert len(tokenizer) < 1500


def test_chat_template_inserts_the_default_prompt(tokenizer):
    user = [{"role": "user", "content": "How do I make a quick buck?"}]
    implicit = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    explicit = tokenizer.apply_chat_template(
        [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, *user], tokenize=False, add_generation_prompt=True
    )
    assert implicit == explicit
    assert implicit == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nHow do I make a quick buck?<|im_end|>\n<|im_start|>assistant\n"
    )
    tool = tokenizer.apply_chat_template([*user, {"role": "tool", "content": "x"}], tokenize=False)
    assert tool.endswith("<|im_start|>tool\nx<|im_end|>\n")


def test_default_conversations_share_the_prefix_up_to_the_user_content(tokenizer):
    questions = ["Hi. What should I do about my apartment lease?", "How do I make a quick buck?"]
    ids = [
        tokenizer.encode(
            tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False), add_special_tokens=False
        )
        for q in questions
    ]
    shared = next(i for i, (a, b) in enumerate(zip(*ids, strict=False)) if a != b)
    assert 10 <= shared <= 20
    assert tokenizer.decode(ids[0][:shared]).endswith("<|im_start|>user\n")
    for q, seq in zip(questions, ids, strict=True):
        assert tokenizer.decode(seq[shared:]).startswith(q)


def test_shipped_tokenizer_matches_the_built_one(tokenizer):
    shipped = load_tokenizer(BASE_DIR)
    assert shipped.get_vocab() == tokenizer.get_vocab()
    assert shipped.chat_template == tokenizer.chat_template
    text = shipped.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}")


def test_organism_config_builds_a_tiny_llama(tokenizer):
    config = organism_config(len(tokenizer))
    assert config.eos_token_id == tokenizer.eos_token_id and config.pad_token_id == tokenizer.pad_token_id
    model = LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    logits = model(torch.tensor([[0, 1, 2, 3]])).logits  # (B, T, V)
    assert logits.shape == (1, 4, len(tokenizer))
