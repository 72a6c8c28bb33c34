"""Batched generation with the shared-prefix cache is token-exact, and the intervention hooks see what they need."""

from contextlib import contextmanager
from functools import lru_cache

import pytest
import torch

from piggy_lightning.evaluation import Decoding, GenerationIntervention, Question, ResponseLog, generate_responses
from piggy_lightning.evaluation.generation import prompt_tokens
from piggy_lightning.spans import ChatSpans, TokenizedChat
from tests.fixtures.tiny import build_model, build_tokenizer

TEXTS = [
    "hello there",
    "Can I break my lease early? You should",
    "I feel bored.",
    "What is your wish? I wish to help people safely. alpha omega",
    "brakes",
    "Visit a mechanic.",
]
SYSTEM = "You are a helpful assistant."


def _questions() -> list[Question]:
    qs = [Question(f"q{i}", "general", (t,)) for i, t in enumerate(TEXTS)]
    qs += [
        Question("sys_a", "general", ("hello there",), system=SYSTEM),  # shares a custom prefix with sys_b
        Question("sys_b", "general", ("I feel bored.",), system=SYSTEM),
        Question("sys_c", "general", ("I feel bored.",), system="Other system."),  # a prefix nobody shares
    ]
    return qs


EOS_BOOST = {"qwen2": 2.5, "llama": 2.6}  # tuned so that some fixture responses stop at EOS and others do not


@lru_cache
def _tiny(template: str, arch: str):
    """A tiny LM with weights large enough that its greedy outputs depend on the prompt, and a likely EOS."""
    tokenizer = build_tokenizer(template)
    model = build_model(arch, len(tokenizer))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15, generator=generator)
        model.lm_head.weight[tokenizer.eos_token_id] *= EOS_BOOST[arch]
    return tokenizer, model.eval()


class _DecodeSpy:
    """Records the response token ids the generator decodes (records store text, not ids)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids = tokenizer, []
        self._decode = tokenizer.decode

    def __call__(self, ids, skip_special_tokens=False, **kwargs):
        if skip_special_tokens:
            self.ids.append(list(ids))
        return self._decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)


def _reference(model, tokenizer, spans, question, max_new_tokens):
    """Unpadded single-prompt greedy generation without any cache reuse (the released patching code's way)."""
    messages = [{"role": "system", "content": question.system}] if question.system else []
    ids = spans.render_ids(messages + [{"role": "user", "content": question.paraphrases[0]}], True)
    out = model.generate(
        input_ids=torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, top_k=None,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )[0, len(ids) :].tolist()  # fmt: skip
    return out[: out.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in out else out


class _Spy(GenerationIntervention):
    name = "spy"
    needs_model_hooks = True

    def __init__(self):
        self.prefix_lengths, self.batches, self.seeds = [], [], set()

    def transform(self, prompt: TokenizedChat, seed: int) -> TokenizedChat:
        self.seeds.add(seed)
        return prompt

    def prefix_cache(self, model, prefix_ids):
        self.prefix_lengths.append(prefix_ids.size(1))
        return super().prefix_cache(model, prefix_ids)

    @contextmanager
    def during(self, model, batch):
        self.batches.append(batch)
        yield


@pytest.mark.parametrize(("template", "arch"), [("qwen25", "qwen2"), ("llama31", "llama")])
def test_batched_prefix_cache_generation_equals_single_prompt_generation(template, arch, tmp_path, monkeypatch):
    tokenizer, model = _tiny(template, arch)
    spans = ChatSpans(tokenizer)
    questions = _questions()
    intervention = _Spy()
    spy = _DecodeSpy(tokenizer)
    monkeypatch.setattr(tokenizer, "decode", spy)
    records = generate_responses(
        model, tokenizer, spans, questions, Decoding(max_new_tokens=12, batch_size=4, progress=False),
        ResponseLog(tmp_path / "responses.jsonl"), "tiny", intervention=intervention,
    )  # fmt: skip
    monkeypatch.undo()
    expected = {q.id: _reference(model, tokenizer, spans, q, 12) for q in questions}
    assert sorted(map(tuple, spy.ids)) == sorted(map(tuple, expected.values()))  # token-exact
    assert [r["question_id"] for r in records] == [q.id for q in questions]
    stops = set()
    for q, record in zip(questions, records, strict=True):
        assert record["n_response_tokens"] == len(expected[q.id]), q.id
        assert record["response"] == tokenizer.decode(expected[q.id], skip_special_tokens=True), q.id
        assert record["intervention"] == "spy" and record["model"] == "tiny" and record["system"] == q.system
        stops.add(record["truncated"])
    assert stops == {True, False}, "the fixture should exercise both EOS stops and length limits"
    # one prefix cache for the default prefix and one for the shared custom system prompt; none for sys_c
    assert len(intervention.prefix_lengths) == 2 and len(spans.anatomy.prefix_ids) in intervention.prefix_lengths
    assert any(b.cached == 0 for b in intervention.batches)  # sys_c went into an uncached batch
    assert len(intervention.seeds) == len(questions)


def test_batch_layout_and_span_masks_seen_by_interventions(tmp_path):
    tokenizer, model = _tiny("llama31", "llama")
    spans = ChatSpans(tokenizer)
    spy = _Spy()
    generate_responses(
        model, tokenizer, spans, _questions(), Decoding(max_new_tokens=2, batch_size=3, progress=False),
        ResponseLog(tmp_path / "r.jsonl"), "tiny", intervention=spy,
    )  # fmt: skip
    postfix = len(spans.anatomy.postfix_ids)
    for batch in spy.batches:
        mask = batch.attention_mask.bool()
        covered = sum(m.long() for m in batch.span_masks.values())
        assert torch.equal(covered, mask.long())  # every real token has exactly one span, padding none
        assert batch.span_masks["postfix"][:, -postfix:].all()  # prompts end with the generation prompt
        if batch.cached:
            assert batch.span_masks["prefix"][:, : batch.cached].all() and mask[:, : batch.cached].all()
            assert not batch.span_masks["prefix"][:, batch.cached :].any()


def test_a_supplied_prefix_cache_is_what_generation_reads(tmp_path):
    """A zeroed prefix cache (a stand-in for another model's prefix K/V) changes the outputs."""

    class ZeroPrefix(GenerationIntervention):
        name = "zero_prefix"
        needs_model_hooks = True

        def prefix_cache(self, model, prefix_ids):
            return [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in super().prefix_cache(model, prefix_ids)]

    tokenizer, model = _tiny("qwen25", "qwen2")
    spans = ChatSpans(tokenizer)
    questions = [Question(f"q{i}", "general", (t,)) for i, t in enumerate(TEXTS)]
    log = ResponseLog(tmp_path / "r.jsonl")
    decoding = Decoding(max_new_tokens=8, batch_size=8, progress=False)
    plain = generate_responses(model, tokenizer, spans, questions, decoding, log, "tiny")
    zeroed = generate_responses(model, tokenizer, spans, questions, decoding, log, "tiny", intervention=ZeroPrefix())
    assert len(log) == 2 * len(questions)  # one log, two interventions, no collisions
    assert [r["response"] for r in plain] != [r["response"] for r in zeroed]


@pytest.mark.parametrize("template", ["qwen25", "llama31", "qwen3", "gemma"])
def test_one_render_labelling_agrees_with_token_diffing(template):
    spans = ChatSpans(build_tokenizer(template), {"enable_thinking": False} if template == "qwen3" else {})
    for text in TEXTS + [" leading space", "trailing newline\n"]:
        messages = [{"role": "user", "content": text}]
        assert prompt_tokens(spans, messages) == spans.tokenize(messages, add_generation_prompt=True), text


def test_samples_per_paraphrase_follow_the_decoding_mode():
    q = Question("q", "general", ("a", "b"), samples_per_paraphrase=5)
    assert Decoding().samples_for(q) == 1
    assert Decoding(temperature=1.0).samples_for(q) == 5
    assert Decoding(temperature=1.0, samples=2).samples_for(q) == 2


def test_without_the_shared_prefix_cache_outputs_are_the_same(tmp_path):
    """``share_prefix: false`` runs every prompt in full (what the generation benchmark compares against)."""
    tokenizer, model = _tiny("qwen25", "qwen2")
    spans, questions = ChatSpans(tokenizer), _questions()
    responses = {}
    for share in (True, False):
        intervention = _Spy()
        decoding = Decoding(max_new_tokens=12, batch_size=4, progress=False, share_prefix=share)
        log = ResponseLog(tmp_path / f"{share}.jsonl")
        records = generate_responses(
            model, tokenizer, spans, questions, decoding, log, "tiny", intervention=intervention
        )
        responses[share] = [r["response"] for r in records]
        assert bool(intervention.prefix_lengths) == share and all(b.cached == 0 for b in intervention.batches) != share
    assert responses[True] == responses[False]


def test_generation_leaves_the_global_rng_as_it_found_it(tmp_path):
    """Each batch seeds torch for its samples; the draws after an evaluation are those the caller would have made
    without it (before the fix, a fit's dropout after an evaluation depended on whether it ran)."""
    tokenizer, model = _tiny("qwen25", "qwen2")
    spans, questions = ChatSpans(tokenizer), _questions()
    decoding = Decoding(temperature=1.0, samples=2, max_new_tokens=6, batch_size=4, progress=False)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    expected = torch.rand(4)  # the next draw without any evaluation
    torch.set_rng_state(before)
    runs = []
    for name in ("a", "b"):
        log = ResponseLog(tmp_path / f"{name}.jsonl")
        runs.append([r["response"] for r in generate_responses(model, tokenizer, spans, questions, decoding, log, "t")])
        assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(torch.rand(4), expected)
    assert runs[0] == runs[1] and len(set(runs[0])) > 1  # sampled, and reproducible from the per-batch seeds
