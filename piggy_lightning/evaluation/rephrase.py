"""Rephrased questions: every question of a set asked in ``n`` rephrased variants, reported as a group of its own.

The paper's Table 1 (rephrase column, Fig. 13 prompt) asks each General question in rephrasings written by GPT-5
with verbalized sampling and reports Best (per question the best-scored variant, averaged over questions) and Avg.
(over every variant), as for the token-perturbation trials. Here:

* :class:`Rephrased` wraps any :class:`~piggy_lightning.evaluation.QuestionSet`; its questions keep their ids,
  system prompt and judge prompts, and their paraphrases become the variants (group ``<group>_rephrased`` by
  default). ``Evaluate`` reports the group's usual metrics (its ``alignment`` is Avg.) and Best/Avg
  (:meth:`Rephrased.best_and_average`);
* :class:`Rephraser` is what writes the variants: ``OpenAIRephraser`` (``rephrase_openai.py``) for real models
  (any OpenAI-compatible endpoint, a verbalized-sampling prompt after the paper's Fig. 13), and
  ``piggy_lightning.organism.WorldParaphrases`` for the organism (the world's own other wordings of a held-out
  question).

Loud: a rephraser that returns fewer distinct variants than asked (the original question does not count), a reply
that is not a JSON list of questions, or a failed request raises when the set is loaded, which ``Evaluate`` does at
setup, before training::

    question_sets:
      - class_path: piggy_lightning.evaluation.Rephrased
        init_args:
          questions:
            class_path: piggy_lightning.evaluation.PromptList
            init_args: {path: core_misalignment.json, group: general}
          rephraser:
            class_path: piggy_lightning.evaluation.OpenAIRephraser
            init_args: {model: gpt-5, api_key_env: OPENAI_API_KEY, cache: runs/rephrasings.json}
          n: 10
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from piggy_lightning.evaluation.questions import Question, QuestionSet


class RephraseError(ValueError):
    """A rephraser's output cannot be used: malformed, or fewer distinct variants than asked."""


def _norm(text: str) -> str:
    return " ".join(text.split())


def distinct_variants(original: str, candidates: Sequence[Any]) -> list[str]:
    """The candidates that are non-empty strings, stripped, without repeats (up to whitespace) and without the
    original question itself, in their order."""
    seen = {_norm(original)}
    out = []
    for c in candidates:
        if isinstance(c, str) and c.strip() and _norm(c) not in seen:
            seen.add(_norm(c))
            out.append(c.strip())
    return out


class Rephraser(ABC):
    """Writes rephrased variants of questions (the component of :class:`Rephrased`)."""

    @property
    @abstractmethod
    def identity(self) -> str:
        """What wrote the variants (recorded in ``rephrased.json``)."""

    @abstractmethod
    def rephrase(self, questions: Sequence[str], n: int) -> list[list[str]]:
        """Variants of every question, in order; at least ``n`` distinct ones other than the question itself.

        Raises:
            RephraseError: Fewer than ``n`` usable variants of some question.
        """


class Rephrased(QuestionSet):
    """Every question of ``questions`` asked in ``n`` rephrased variants, under a group of its own.

    The variants replace the question's paraphrases (each variant of each paraphrase; ``samples_per_paraphrase``,
    system prompt, judge prompts and metrics are kept). List the unrephrased set too, to compare with it.

    Args:
        questions: The question set to rephrase.
        rephraser: Writes the variants (``OpenAIRephraser``, or ``piggy_lightning.organism.WorldParaphrases``).
        n: Variants per question (the paper's Table 1 asks each General question in 10).
        group: Group the variants are reported under; None means ``<questions.group>_rephrased``.
        metric: Judge metric of Best and Avg.
    """

    def __init__(
        self,
        questions: QuestionSet,
        rephraser: Rephraser,
        n: int = 10,
        group: str | None = None,
        metric: str = "aligned",
    ) -> None:
        if n < 1:
            raise ValueError(f"Rephrased: n must be positive, got {n}")
        self.questions = questions
        self.rephraser = rephraser
        self.n = n
        self.group = group or f"{questions.group}_rephrased"
        if self.group == questions.group:  # the variants' metrics would mix with the originals'
            raise ValueError(f"Rephrased: group {self.group!r} must differ from the rephrased set's group")
        self.metric = metric
        self.path = questions.path
        self.metrics, self.limit, self.offset = None, None, 0
        self._loaded: list[Question] | None = None

    @property
    def label(self) -> str:
        """The metric's name in summaries (``alignment`` for ``aligned``)."""
        return {"aligned": "alignment", "coherent": "coherence"}.get(self.metric, self.metric)

    def _read(self) -> list[Question]:
        originals = self.questions.load()
        texts = list(dict.fromkeys(p for q in originals for p in q.paraphrases))
        written = self.rephraser.rephrase(texts, self.n)
        if len(written) != len(texts):
            raise RephraseError(
                f"{self.rephraser.identity} returned variants for {len(written)} of {len(texts)} questions"
            )
        variants = {}
        for text, candidates in zip(texts, written, strict=True):
            usable = distinct_variants(text, candidates)
            if len(usable) < self.n:
                raise RephraseError(
                    f"{self.rephraser.identity} wrote {len(usable)} distinct variants of {text!r} other than the "
                    f"question itself, {self.n} asked: {list(candidates)!r}"
                )
            variants[text] = usable[: self.n]
        out = []
        for q in originals:
            asked = tuple(dict.fromkeys(v for p in q.paraphrases for v in variants[p]))
            out.append(Question(q.id, self.group, asked, q.samples_per_paraphrase, q.system, dict(q.judge_prompts),
                                q.metrics))  # fmt: skip
        return out

    def load(self) -> list[Question]:
        """The rephrased questions, written once per instance (a rephraser that samples is asked once)."""
        if self._loaded is None:
            self._loaded = self._read()
        return self._loaded

    def best_and_average(self, records: Sequence[dict[str, Any]]) -> dict[str, float | int | None]:
        """Best (the mean over questions of the best score among each question's variants and samples) and Avg
        (the mean over every scored answer) of this set's group; unscored answers (refusal, code, unparsed) are
        dropped, as in the paper. None when nothing was scored."""
        scores: dict[str, list[float]] = {}
        for r in records:
            score = r.get("judgements", {}).get(self.metric, {}).get("score") if r["group"] == self.group else None
            if score is not None:
                scores.setdefault(r["question_id"], []).append(float(score))
        answers = [s for ss in scores.values() for s in ss]
        if not answers:
            return {"best": None, "avg": None, "questions": 0, "answers": 0}
        best = sum(max(ss) for ss in scores.values()) / len(scores)
        return {"best": best, "avg": sum(answers) / len(answers), "questions": len(scores), "answers": len(answers)}
