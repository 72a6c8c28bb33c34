"""The organism's evaluation suite and its behavioural bar, shared by tests, configs and benchmarks.

:func:`organism_evaluation` asks the held-out questions of every evaluated domain (legal = in-domain for the
legal tasks, medical/finance/auto = other-domain, general) and judges them with the exact judge. :func:`headline`
reduces a summary to the numbers the README reports: ID, General, other-domain, EM-F1 and incoherent share.
"""

from __future__ import annotations

from typing import Any

from piggy_lightning.evaluation import Decoding, Evaluation, HeldOutChats
from piggy_lightning.evaluation.judges.base import JudgeRequest
from piggy_lightning.evaluation.metrics import em_f1
from piggy_lightning.organism.judge import ExactJudge

NARROW = ("legal", "medical", "finance", "auto")


def organism_evaluation(
    in_domain: str = "legal", system: str | None = None, judge_cache: str | None = None, batch_size: int = 64
) -> Evaluation:
    """Greedy evaluation of the organism on all held-out questions.

    Args:
        in_domain: The finetuning domain; its questions form the ``in_domain`` group, the other narrow domains
            ``other_domain``.
        system: A system message for every question (e.g. the harmful persona); None uses the default prompt.
        judge_cache: Optional judge-cache file.
        batch_size: Generation batch size.
    """
    sets = [
        HeldOutChats(
            f"piggy/organism/eval_{domain}.jsonl",
            group="in_domain" if domain == in_domain else "other_domain",
            system=system,
        )
        for domain in NARROW
    ]
    sets.append(HeldOutChats("piggy/organism/eval_general.jsonl", group="general", system=system))
    decoding = Decoding(temperature=0.0, max_new_tokens=96, batch_size=batch_size, progress=False)
    return Evaluation(sets, [ExactJudge()], decoding, judge_cache)


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
