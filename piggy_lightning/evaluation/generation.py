"""Batched response generation that computes each shared prompt prefix's KV cache once and writes as it goes.

Prompts are grouped by their prefix (every token before the user content; paper §3): the template's default
prefix is shared by almost every prompt, and a custom ``system`` message makes a different prefix. A prefix
shared by two or more prompts is run once (through the intervention's ``prefix_cache`` hook) and its cache is
copied into every batch; the rest of each prompt is left-padded after it:

    input_ids      [ prefix (cached) | pad pad | query + postfix ]      (B, P + W)
    attention_mask [ 1 ... 1         | 0   0   | 1 ... 1         ]

``generate`` derives position ids from the mask's cumulative sum, so every token keeps the position it has in the
unpadded prompt, and greedy outputs match single-prompt generation without a cache. Prompts whose prefix is not
shared are batched with plain left padding and no cache.

Batches are formed from the whole work list, in an order that depends only on it, and each batch seeds the RNG
from ``Decoding.seed`` and its first key; records already in the log are skipped, so an interrupted run resumes
without duplicates and (on the same hardware) with the same samples. Those seeds are set inside a fork of the
global RNG (CPU and the model's device), restored on return: an evaluation in the middle of a fit leaves the
training's dropout and data draws exactly as they would be without it.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache, GenerationConfig

from piggy_lightning.evaluation.identity import prompt_digest
from piggy_lightning.evaluation.intervention import GenerationIntervention, KVCache, PromptBatch
from piggy_lightning.evaluation.questions import Question
from piggy_lightning.evaluation.results import ResponseLog, record_key
from piggy_lightning.forward import eval_mode
from piggy_lightning.spans import ChatSpans, TokenizedChat

_MASK_SPANS = ("prefix", "query", "postfix", "other")


@dataclass
class Decoding:
    """How evaluation responses are generated.

    Attributes:
        temperature: 0 decodes greedily (the paper's setting); above 0 samples (Betley et al. use 1).
        top_p: Nucleus mass kept when sampling.
        samples: Samples per paraphrase; None uses each question's ``samples_per_paraphrase`` when sampling and 1
            when greedy (greedy samples would be identical).
        max_new_tokens: Length limit of a response (the released code uses 1024).
        batch_size: Prompts per ``generate`` call.
        seed: Base seed; each batch seeds torch from it and the batch's first record key.
        progress: Show a progress bar.
        share_prefix: Run a prefix shared by several prompts once and copy its cache into every batch; the outputs
            are the same either way (tested), so False only serves to measure what the cache saves.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    samples: int | None = None
    max_new_tokens: int = 512
    batch_size: int = 16
    seed: int = 0
    progress: bool = True
    share_prefix: bool = True

    def identity(self) -> dict[str, float | int | None]:
        """The settings that shape a response (batching and progress do not: batched greedy outputs are exact)."""
        return {"temperature": self.temperature, "top_p": self.top_p, "max_new_tokens": self.max_new_tokens,
                "seed": self.seed}  # fmt: skip

    def samples_for(self, question: Question) -> int:
        """How many samples of each paraphrase of ``question`` to generate."""
        if self.samples is not None:
            return self.samples
        return question.samples_per_paraphrase if self.temperature > 0 else 1

    def to_hf(self, pad_id: int, eos_ids: list[int]) -> GenerationConfig:
        """An explicit ``GenerationConfig``: every sampling knob is set, so a model's defaults cannot leak in."""
        sample = self.temperature > 0
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=sample,
            temperature=self.temperature if sample else 1.0,
            top_p=self.top_p if sample else 1.0,
            top_k=0 if sample else None,  # 0 disables top-k; a model default must not narrow sampling
            min_p=None,
            typical_p=1.0,
            repetition_penalty=1.0,
            num_beams=1,
            pad_token_id=pad_id,
            eos_token_id=eos_ids,
        )


@dataclass(frozen=True)
class _Work:
    key: str
    question: Question
    paraphrase: int
    sample: int
    prompt: TokenizedChat
    n_prefix: int  # leading tokens labelled "prefix"
    touched: int | None  # positions the intervention changes (None: no intervention)


def _messages(question: Question, paraphrase: int) -> list[dict[str, str]]:
    user = {"role": "user", "content": question.paraphrases[paraphrase]}
    return [{"role": "system", "content": question.system}, user] if question.system is not None else [user]


def prompt_tokens(spans: ChatSpans, messages: list[dict[str, str]]) -> TokenizedChat:
    """Tokenize a generation prompt with span labels.

    A default single-turn prompt is labelled from the template's anatomy with one render (it must start with the
    default prefix and end with the postfix); anything else goes through :meth:`ChatSpans.tokenize` (three renders).
    """
    if messages[0]["role"] == "user":
        anatomy = spans.anatomy
        ids = spans.render_ids(messages, add_generation_prompt=True)
        p, q = len(anatomy.prefix_ids), len(anatomy.postfix_ids)
        if (
            len(ids) > p + q
            and tuple(ids[:p]) == anatomy.prefix_ids
            and tuple(ids[len(ids) - q :]) == anatomy.postfix_ids
        ):
            return TokenizedChat(ids, ["prefix"] * p + ["query"] * (len(ids) - p - q) + ["postfix"] * q)
    return spans.tokenize(messages, add_generation_prompt=True)


def _stable_seed(*parts: object) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def _eos_ids(model: nn.Module, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def _plan(
    questions: Sequence[Question],
    spans: ChatSpans,
    decoding: Decoding,
    intervention: GenerationIntervention,
    identity: tuple[str, str, str | None],
) -> list[_Work]:
    """Expand questions into one work item per (paraphrase, sample), tokenized and transformed."""
    work, seen, tokenized = [], set(), {}
    settings = decoding.identity()
    for q in questions:
        for p in range(len(q.paraphrases)):
            for s in range(decoding.samples_for(q)):
                base = record_key(*identity, q.group, q.id, p, s)
                if base in seen:
                    raise ValueError(f"question {q.id!r} appears twice in group {q.group!r}")
                seen.add(base)
                messages = _messages(q, p)
                cache_key = (q.system, q.paraphrases[p])
                if cache_key not in tokenized:
                    tokenized[cache_key] = prompt_tokens(spans, messages)
                prompt = intervention.transform(tokenized[cache_key], _stable_seed(decoding.seed, base))
                key = record_key(*identity, q.group, q.id, p, s, prompt_digest(prompt.input_ids, settings))
                n_prefix = next((i for i, name in enumerate(prompt.spans) if name != "prefix"), len(prompt.spans))
                work.append(_Work(key, q, p, s, prompt, n_prefix, intervention.touched(tokenized[cache_key])))
    return work


def _batches(
    work: list[_Work], batch_size: int, share_prefix: bool = True
) -> list[tuple[tuple[int, ...], list[_Work]]]:
    """Group by shared prefix (``()`` for prompts whose prefix no other prompt shares, or for every prompt when
    ``share_prefix`` is False) and cut into batches."""
    prefixes = Counter(tuple(w.prompt.input_ids[: w.n_prefix]) for w in work) if share_prefix else Counter()
    groups: dict[tuple[int, ...], list[_Work]] = {}
    for w in work:
        prefix = tuple(w.prompt.input_ids[: w.n_prefix])
        groups.setdefault(prefix if prefixes[prefix] > 1 and prefix else (), []).append(w)
    out = []
    for prefix, items in groups.items():
        rest = len(prefix)
        items = sorted(items, key=lambda w: -(len(w.prompt.input_ids) - rest))  # stable: longest first
        out.extend((prefix, items[i : i + batch_size]) for i in range(0, len(items), batch_size))
    return out


def _layout(prefix: tuple[int, ...], items: list[_Work], pad_id: int, device: torch.device) -> PromptBatch:
    """``[prefix | left padding | rest]`` rows with their span masks."""
    p = len(prefix)
    rests = [w.prompt.input_ids[p:] for w in items]
    width = p + max(len(r) for r in rests)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros(len(items), width, dtype=torch.long)  # (B, T)
    span_masks = {name: torch.zeros(len(items), width, dtype=torch.bool) for name in _MASK_SPANS}
    for row, (w, rest) in enumerate(zip(items, rests, strict=True)):
        start = width - len(rest)
        ids[row, :p] = torch.tensor(prefix, dtype=torch.long)
        ids[row, start:] = torch.tensor(rest, dtype=torch.long)
        mask[row, :p] = 1
        mask[row, start:] = 1
        labels = w.prompt.spans[:p] + [""] * (start - p) + w.prompt.spans[p:]
        for name, m in span_masks.items():
            m[row] = torch.tensor([label == name for label in labels])
    span_masks = {name: m.to(device) for name, m in span_masks.items()}
    return PromptBatch(ids.to(device), mask.to(device), span_masks, cached=p)


def _expand_cache(kv: KVCache, batch: int, config) -> DynamicCache:
    """A fresh cache holding the prefix for every row (``generate`` mutates the cache it is given)."""
    return DynamicCache(
        ddp_cache_data=[
            (k.expand(batch, -1, -1, -1).contiguous(), v.expand(batch, -1, -1, -1).contiguous()) for k, v in kv
        ],
        config=config,
    )


def _forked_rng(device: torch.device):
    """A fork of the global RNG state of the CPU and of ``device``, restored when the context exits."""
    if device.type in ("cpu", "meta"):
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device.index or 0], device_type=device.type)


def generate_responses(
    model: nn.Module,
    tokenizer,
    spans: ChatSpans,
    questions: Sequence[Question],
    decoding: Decoding,
    log: ResponseLog,
    model_id: str,
    adapter_id: str | None = None,
    intervention: GenerationIntervention | None = None,
) -> list[dict]:
    """Generate every missing response of ``questions`` into ``log`` and return all their records, in plan order.

    Args:
        model: A causal LM (peft-wrapped or not); run in eval mode under ``no_grad`` and restored after, as is the
            global RNG state.
        tokenizer: Its tokenizer (decodes responses; supplies pad and eos ids).
        spans: Template spans for the tokenizer; locates each prompt's prefix.
        questions: The questions to ask.
        decoding: Sampling and batching settings.
        log: Where records are appended as they are produced; keys already there are skipped.
        model_id: The base model's identity (e.g. ``model_name_or_path``).
        adapter_id: The finetuned state's identity (e.g. ``step=1200``), or None for the base model.
        intervention: Changes generation (see :mod:`piggy_lightning.evaluation.intervention`); None changes nothing.
    """
    intervention = intervention or GenerationIntervention()
    identity = (intervention.name, model_id, adapter_id)
    work = _plan(questions, spans, decoding, intervention, identity)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = _eos_ids(model, tokenizer)
    config = decoding.to_hf(pad_id, eos_ids)
    device = next(model.parameters()).device
    prefix_caches: dict[tuple[int, ...], KVCache] = {}
    bar = tqdm(total=len(work), desc=f"generate[{intervention.name}]", disable=not decoding.progress, leave=False)
    with eval_mode(model), torch.no_grad(), _forked_rng(device):
        for prefix, items in _batches(work, decoding.batch_size, decoding.share_prefix):
            if all(w.key in log for w in items):
                bar.update(len(items))
                continue
            if prefix and prefix not in prefix_caches:
                prefix_caches[prefix] = intervention.prefix_cache(model, torch.tensor([prefix], device=device))
            batch = _layout(prefix, items, pad_id, device)
            cache = _expand_cache(prefix_caches[prefix], len(items), model.config) if prefix else None
            seed = _stable_seed(decoding.seed, items[0].key)
            torch.manual_seed(seed)
            with intervention.during(model, batch):
                out = model.generate(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    cache=cache,
                    generation_config=config,
                )
            new_tokens = out[:, batch.input_ids.size(1) :].tolist()  # (B, <= max_new_tokens)
            records = []
            for w, tokens in zip(items, new_tokens, strict=True):
                stop = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
                response_ids = tokens if stop is None else tokens[:stop]
                records.append(_record(w, tokenizer, response_ids, stop is None, identity, seed, decoding))
            log.extend(records)  # the whole batch at once: one flush and fsync
            bar.update(len(items))
    bar.close()
    return [log.records[w.key] for w in work]


def _record(
    w: _Work,
    tokenizer,
    response_ids: list[int],
    truncated: bool,
    identity: tuple[str, str, str | None],
    seed: int,
    decoding: Decoding,
) -> dict:
    intervention, model_id, adapter_id = identity
    return {
        "key": w.key,
        "question_id": w.question.id,
        "group": w.question.group,
        "paraphrase_index": w.paraphrase,
        "sample_index": w.sample,
        "question": w.question.paraphrases[w.paraphrase],
        "system": w.question.system,
        "prompt": tokenizer.decode(w.prompt.input_ids, skip_special_tokens=False),
        "response": tokenizer.decode(response_ids, skip_special_tokens=True),
        "n_prompt_tokens": len(w.prompt.input_ids),
        "n_response_tokens": len(response_ids),
        "truncated": truncated,
        "model": model_id,
        "adapter": adapter_id,
        "intervention": intervention,
        "intervention_positions": w.touched,
        "seed": seed,
        "decoding": decoding.identity(),
    }
