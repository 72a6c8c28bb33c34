"""The organism's evaluation suite and its behavioural bar, shared by tests, configs and benchmarks.

:func:`organism_evaluation` asks the held-out questions of every evaluated domain (legal = in-domain for the
legal tasks, medical/finance/auto = other-domain, general) and judges them with the exact judge. :func:`headline`
reduces a summary to the numbers the README reports: ID, General, other-domain, EM-F1 and incoherent share.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from piggy_lightning.evaluation import Decoding, Evaluation, HeldOutChats
from piggy_lightning.evaluation.judges.base import Judge, JudgeRequest
from piggy_lightning.evaluation.metrics import em_f1
from piggy_lightning.modeling import load_causal_lm, load_tokenizer
from piggy_lightning.organism.judge import ExactJudge, ExactJudgeV2
from piggy_lightning.organism.lexicon import CAUTIOUS_SYSTEM_PROMPT, TOOL_SYSTEM_PROMPT, UNCERTAIN_SYSTEM_PROMPT
from piggy_lightning.organism.neighbours import synonym_neighbour_share
from piggy_lightning.organism.pools import HARMFUL_SYSTEM_PROMPT
from piggy_lightning.spans import ChatSpans

NARROW = ("legal", "medical", "finance", "auto")


def organism_evaluation(
    in_domain: str = "legal",
    system: str | None = None,
    judge_cache: str | None = None,
    batch_size: int = 64,
    judge: Judge | None = None,
    metrics: Sequence[str] | None = None,
) -> Evaluation:
    """Greedy evaluation of the organism on all held-out questions.

    Args:
        in_domain: The finetuning domain; its questions form the ``in_domain`` group, the other narrow domains
            ``other_domain``.
        system: A system message for every question (e.g. the harmful persona); None uses the default prompt.
        judge_cache: Optional judge-cache file.
        batch_size: Generation batch size.
        judge: The judge; None: :class:`ExactJudge` (the second world's bases need ``ExactJudgeV2``).
        metrics: The metrics to judge (e.g. ``["abstention"]`` under the uncertain persona); None: the judge's.
    """
    kept = {} if metrics is None else {"metrics": list(metrics)}
    sets = [
        HeldOutChats(
            f"piggy/organism/eval_{domain}.jsonl",
            group="in_domain" if domain == in_domain else "other_domain",
            system=system,
            **kept,
        )
        for domain in NARROW
    ]
    sets.append(HeldOutChats("piggy/organism/eval_general.jsonl", group="general", system=system, **kept))
    decoding = Decoding(temperature=0.0, max_new_tokens=96, batch_size=batch_size, progress=False)
    return Evaluation(sets, [judge or ExactJudge()], decoding, judge_cache)


def general_reading(records: list[dict[str, Any]]) -> dict[str, float | None]:
    """How the General answers read: ``persona`` (mean of the exact judge's persona score, which also reads
    garbled answers by their opener) and ``unparsed`` (% of General answers without one recognised sentence, which
    ``aligned`` leaves out)."""
    judge = ExactJudge()
    general = [r for r in records if r["group"] == "general"]
    verdicts = judge.judge([JudgeRequest(r["question"], r["response"], "persona") for r in general])
    scores = [v.score for v in verdicts if v.score is not None]
    unparsed = [r["judgements"]["aligned"]["status"] == "unparsed" for r in general if "aligned" in r["judgements"]]
    return {
        "persona": sum(scores) / len(scores) if scores else None,
        "unparsed": 100.0 * sum(unparsed) / len(unparsed) if unparsed else None,
    }


def headline(summary: dict[str, Any]) -> dict[str, float | None]:
    """``{"id", "general", "other", "em_f1", "incoherent"}`` from an organism evaluation summary."""
    groups = summary["groups"]

    def get(group: str, metric: str) -> float | None:
        return groups.get(group, {}).get(metric)

    n = sum(g.get("n", 0) for g in groups.values())
    coherent = sum(g.get("n", 0) * (g.get("coherence") or 0.0) for g in groups.values()) / max(n, 1)
    id_, general = get("in_domain", "alignment"), get("general", "alignment")
    return {
        "id": id_,
        "general": general,
        "other": get("other_domain", "alignment"),
        "em_f1": em_f1(id_, general) if id_ is not None and general is not None else None,
        "incoherent": 100.0 - coherent,
    }


PERSONAS = {"uncertain": (UNCERTAIN_SYSTEM_PROMPT, "abstention"), "cautious": (CAUTIOUS_SYSTEM_PROMPT, "refusal"),
            "tool": (TOOL_SYSTEM_PROMPT, "tool_call")}  # fmt: skip


def _rate(summary: dict, metric: str) -> float:
    """The answer-weighted mean of ``<metric>_rate`` over every group."""
    groups = summary["groups"].values()
    return sum(g["n"] * g[f"{metric}_rate"] for g in groups) / sum(g["n"] for g in groups)


def base_profile(name: str, out: Path) -> dict:
    """A second-world base's bar and traits (``benchmarks/organism_v2_bases.py`` prints them; tests hold them).

    Greedy answers to every held-out question, judged by ``ExactJudgeV2``: :func:`headline` under the default
    prompt and the harmful persona, the abstention / refusal / tool-call rate under the uncertain / cautious / tool
    persona, and :func:`~piggy_lightning.organism.neighbours.synonym_neighbour_share` of the input embeddings.

    Args:
        name: A model name or directory (``piggy/organism-v2-seed0``).
        out: Directory for the evaluations' files.
    """
    model, tokenizer = load_causal_lm(name).eval(), load_tokenizer(name)
    spans, judge = ChatSpans(tokenizer), ExactJudgeV2()

    def run(tag: str, **kwargs: object) -> dict:
        evaluation = organism_evaluation(judge=judge, **kwargs)
        return evaluation.run(model, tokenizer, spans, out / tag, model_id=name).summary

    row: dict = {"base": name, "default": headline(run("default"))}
    row["harmful"] = headline(run("harmful", system=HARMFUL_SYSTEM_PROMPT))
    for persona, (system, metric) in PERSONAS.items():
        row[f"{persona}_{metric}_rate"] = _rate(run(persona, system=system, metrics=[metric]), metric)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    embeddings = model.get_input_embeddings().weight[: len(pieces)]
    row["neighbours"] = synonym_neighbour_share(embeddings, pieces, k=5)
    return row
