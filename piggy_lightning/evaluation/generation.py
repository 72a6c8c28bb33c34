"""Generation of evaluation responses: plan the work, shard it, resume it, and record what a backend generates.

The plan expands every question into one work item per (paraphrase, sample), tokenized with span labels and
transformed by the intervention (token perturbation edits the ids here, so every backend serves it). A backend
(:mod:`piggy_lightning.evaluation.backends`; the default HF one batches by shared prefix and caches it) cuts the
plan into units in an order that depends only on the plan. Units whose records are all in the log are skipped, so
an interrupted run resumes without duplicates and (on the same hardware) with the same samples.

Sharded (a :class:`~piggy_lightning.evaluation.shard.Shard` of several ranks), rank ``r`` generates every
``world``-th pending unit into its own log (``responses.rank<r>.jsonl`` beside ``responses.jsonl``); every rank reads
every log of the directory, and the set of finished keys is the union over ranks, so a rerun with another number
of processes resumes too. The runner gathers the records and merges the logs (``runner.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn
from tqdm.auto import tqdm

from piggy_lightning.evaluation.backends.base import Completion, GenerationBackend, GenerationContext
from piggy_lightning.evaluation.backends.hf import HFBackend
from piggy_lightning.evaluation.decoding import Decoding, WorkItem, stable_seed
from piggy_lightning.evaluation.identity import prompt_digest
from piggy_lightning.evaluation.intervention import GenerationIntervention
from piggy_lightning.evaluation.questions import Question
from piggy_lightning.evaluation.results import ResponseLog, record_key
from piggy_lightning.evaluation.shard import Shard
from piggy_lightning.spans import ChatSpans, TokenizedChat

__all__ = [
    "Decoding", "Plan", "WorkItem", "generate_planned", "generate_responses", "plan_generation", "prompt_tokens",
    "shard_log",
]  # fmt: skip


def shard_log(out_dir: str | Path, shard: Shard) -> ResponseLog:
    """This rank's response log in ``out_dir``, holding every record any log there holds (read-only for those)."""
    out = Path(out_dir)
    own = out / ("responses.jsonl" if shard.world == 1 else f"responses.rank{shard.rank}.jsonl")
    log = ResponseLog(own)
    for other in sorted(out.glob("responses*.jsonl")):
        if other != own:
            for key, record in ResponseLog(other).records.items():
                log.records.setdefault(key, record)  # known as done; never rewritten into this rank's file
    return log


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


def _plan(
    questions: Sequence[Question],
    spans: ChatSpans,
    decoding: Decoding,
    intervention: GenerationIntervention,
    identity: tuple[str, str, str | None],
) -> list[WorkItem]:
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
                prompt = intervention.transform(tokenized[cache_key], stable_seed(decoding.seed, base))
                key = record_key(*identity, q.group, q.id, p, s, prompt_digest(prompt.input_ids, settings))
                n_prefix = next((i for i, name in enumerate(prompt.spans) if name != "prefix"), len(prompt.spans))
                work.append(WorkItem(key, q, p, s, prompt, n_prefix, intervention.touched(tokenized[cache_key])))
    return work


@dataclass(frozen=True)
class Plan:
    """Everything an evaluation will generate, identical on every rank.

    Attributes:
        work: One item per (question, paraphrase, sample), in question order.
        units: The backend's cut of ``work`` (batches), the unit of sharding and resumption.
        identity: ``(intervention name, model id, adapter id)``, part of every record key.
    """

    work: list[WorkItem]
    units: list[list[WorkItem]]
    identity: tuple[str, str, str | None]

    def done(self, log: ResponseLog) -> set[str]:
        """Keys of the plan that ``log`` already holds."""
        return {w.key for w in self.work if w.key in log}


def plan_generation(
    questions: Sequence[Question],
    spans: ChatSpans,
    decoding: Decoding,
    model_id: str,
    adapter_id: str | None = None,
    intervention: GenerationIntervention | None = None,
    backend: GenerationBackend | None = None,
) -> Plan:
    """Tokenize, transform and cut the work; refuse an intervention the backend cannot apply (before any work)."""
    intervention = intervention or GenerationIntervention()
    backend = backend or HFBackend()
    backend.check(intervention)
    identity = (intervention.name, model_id, adapter_id)
    work = _plan(questions, spans, decoding, intervention, identity)
    return Plan(work, backend.units(work, decoding), identity)


def generate_planned(
    model: nn.Module,
    tokenizer,
    plan: Plan,
    decoding: Decoding,
    log: ResponseLog,
    done: set[str],
    intervention: GenerationIntervention | None = None,
    backend: GenerationBackend | None = None,
    shard: Shard | None = None,
) -> tuple[list[dict], int]:
    """Generate this rank's share of the units not all in ``done`` (the union of every rank's finished keys) into
    ``log``; return the records this rank's log holds for the plan, in plan order, and how many it generated now."""
    intervention = intervention or GenerationIntervention()
    backend = backend or HFBackend()
    shard = shard or Shard()
    if shard.lockstep and not backend.serves_model_hooks:  # the policy's shards take no part: no repeats needed
        shard = replace(shard, lockstep=False)
    pending = [unit for unit in plan.units if not all(w.key in done for w in unit)]
    _, model_id, adapter_id = plan.identity
    context = GenerationContext(
        model, tokenizer, decoding, intervention, model_id, adapter_id, Path(log.path).parent, shard.lockstep,
        plan.units, pending,
    )  # fmt: skip
    total = len(plan.work)
    bar = tqdm(total=total, initial=total - sum(map(len, pending)), desc=f"generate[{intervention.name}]",
               disable=not decoding.progress or not shard.is_main, leave=False)  # fmt: skip
    generated = 0
    with backend.session(context) as complete:
        for unit in shard.take(pending):
            completions = complete(unit if unit is not None else pending[0])  # None: a lockstep repeat, dropped
            if unit is None:
                continue
            records = [
                _record(w, tokenizer, c, plan.identity, decoding, backend.name)
                for w, c in zip(unit, completions, strict=True)
            ]
            log.extend(records)  # the whole unit at once: one flush and fsync
            generated += len(records)
            bar.update(len(unit) * shard.world)
    bar.close()
    return [log.records[w.key] for w in plan.work if w.key in log], generated


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
    backend: GenerationBackend | None = None,
    shard: Shard | None = None,
) -> list[dict]:
    """Generate this rank's missing responses of ``questions`` into ``log``; return the records this rank holds for
    the plan (every record with one process), in plan order: :func:`plan_generation`, the union of the ranks'
    finished keys, then :func:`generate_planned`.

    Args:
        model: A causal LM (peft-wrapped or not); the HF backend runs it in eval mode under ``no_grad`` and restores
            it after, as it does the global RNG state.
        tokenizer: Its tokenizer (decodes responses; supplies pad and eos ids).
        spans: Template spans for the tokenizer; locates each prompt's prefix.
        questions: The questions to ask.
        decoding: Sampling and batching settings.
        log: Where records are appended as they are produced; keys already there are skipped (see :func:`shard_log`).
        model_id: The base model's identity (e.g. ``model_name_or_path``).
        adapter_id: The finetuned state's identity (e.g. ``step=1200``), or None for the base model.
        intervention: Changes generation (see :mod:`piggy_lightning.evaluation.intervention`); None changes nothing.
        backend: Where responses are generated; None is :class:`~piggy_lightning.evaluation.backends.HFBackend`.
        shard: This process's share; None is the whole evaluation in one process.
    """
    shard = shard or Shard()
    plan = plan_generation(questions, spans, decoding, model_id, adapter_id, intervention, backend)
    done = set().union(*shard.all_gather(plan.done(log)))
    return generate_planned(model, tokenizer, plan, decoding, log, done, intervention, backend, shard)[0]


def _record(
    w: WorkItem,
    tokenizer,
    completion: Completion,
    identity: tuple[str, str, str | None],
    decoding: Decoding,
    backend: str,
) -> dict:
    intervention, model_id, adapter_id = identity
    text = completion.text
    if text is None:
        text = tokenizer.decode(completion.token_ids, skip_special_tokens=True)
    return {
        "key": w.key,
        "question_id": w.question.id,
        "group": w.question.group,
        "paraphrase_index": w.paraphrase,
        "sample_index": w.sample,
        "question": w.question.paraphrases[w.paraphrase],
        "system": w.question.system,
        "prompt": tokenizer.decode(w.prompt.input_ids, skip_special_tokens=False),
        "response": text,
        "n_prompt_tokens": len(w.prompt.input_ids),
        "n_response_tokens": len(completion.token_ids),
        "truncated": completion.truncated,
        "model": model_id,
        "adapter": adapter_id,
        "intervention": intervention,
        "intervention_positions": w.touched,
        "seed": completion.seed,
        "decoding": decoding.identity(),
        "backend": backend,
    }
