"""``MTBenchQuestions``: MT-Bench's ``question.jsonl`` (Zheng et al. 2023), the utility side of the paper's Table 2.

The paper reports ΔUtil, the change of the MT-Bench score from the base model, without saying which judge or scale
it used. A row of the public file is ``{"question_id": 81, "category": "writing", "turns": ["...", "..."]}``
(math, reasoning and coding rows may also carry ``reference``). MT-Bench asks two turns, the second after the
model's own first answer; generation here is single-turn, so **only the first turn is asked** and scored (a
"turn-1 MT-Bench" score); reading warns how many questions had later turns that were left out, and keeps the
count in ``later_turns``. The file is not shipped (bring it, e.g. from FastChat's ``llm_judge/data/mt_bench/``);
judge it with ``helpful``, the MT-Bench-style 1-10 prompt of :mod:`~piggy_lightning.evaluation.judges.prompts`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from piggy_lightning.data.io import DataError, _raw_rows
from piggy_lightning.evaluation.questions import Question, QuestionSet

log = logging.getLogger(__name__)


class MTBenchQuestions(QuestionSet):
    """MT-Bench questions from a ``question.jsonl`` file, first turn only (see the module docstring).

    Every row needs ``question_id`` (an integer or a non-empty string, unique), ``category`` (a non-empty string)
    and ``turns`` (a non-empty list of non-empty strings); other fields are ignored. A bad row raises
    :class:`~piggy_lightning.data.io.DataError` naming the file, the row (its line) and the field.

    Args:
        path: The ``question.jsonl`` file (one JSON object per line).
        group: Group every question is reported under.
        metrics: Metrics to judge; None means ``helpful``.
        limit: Keep only the first ``limit`` questions (after ``offset``); None keeps all.
        offset: Skip this many questions first.
        categories: Keep only the questions of these categories (e.g. leave out ``math``, ``reasoning`` and
            ``coding``, which MT-Bench grades against reference answers this judge does not use); None keeps all.
            A category that no row has is an error, so a typo cannot empty the set unnoticed.
    """

    def __init__(
        self,
        path: str,
        group: str = "utility",
        metrics: list[str] | None = None,
        limit: int | None = None,
        offset: int = 0,
        categories: list[str] | None = None,
    ) -> None:
        super().__init__(path, group, metrics or ["helpful"], limit, offset)
        self.categories = tuple(categories) if categories is not None else None
        self.later_turns: int | None = None  # questions whose turns after the first were not asked (after reading)

    def _row(self, number: int, row: Any) -> tuple[str, str, list[str]]:
        """``(id, category, turns)`` of one valid row."""
        if isinstance(row, DataError):
            raise row
        if not isinstance(row, dict):
            raise DataError(self.path, number, "<row>", f"must be a JSON object, got {type(row).__name__}")
        qid = row.get("question_id")
        if isinstance(qid, bool) or not isinstance(qid, (int, str)) or (isinstance(qid, str) and not qid.strip()):
            raise DataError(self.path, number, "question_id", f"must be an integer or a non-empty string, got {qid!r}")
        category = row.get("category")
        if not isinstance(category, str) or not category.strip():
            raise DataError(self.path, number, "category", f"must be a non-empty string, got {category!r}")
        turns = row.get("turns")
        if not isinstance(turns, list) or not turns:
            raise DataError(self.path, number, "turns", f"must be a non-empty list of strings, got {turns!r}")
        for i, turn in enumerate(turns):
            if not isinstance(turn, str) or not turn.strip():
                raise DataError(self.path, number, f"turns[{i}]", f"must be a non-empty string, got {turn!r}")
        return str(qid), category, turns

    def _read(self) -> list[Question]:
        if Path(self.path).suffix != ".jsonl":
            raise DataError(self.path, 0, "<file>", "an MT-Bench question file is JSONL (question.jsonl)")
        rows = [(number, *self._row(number, row)) for number, row in _raw_rows(self.path)]
        found = {category for _, _, category, _ in rows}
        missing = sorted(set(self.categories or ()) - found)
        if missing:
            raise DataError(self.path, 0, "category", f"no question has categories {missing}; found {sorted(found)}")
        seen: dict[str, int] = {}
        questions, later_turns = [], 0
        for number, qid, category, turns in rows:
            if qid in seen:
                raise DataError(self.path, number, "question_id", f"{qid!r} repeats the id of line {seen[qid]}")
            seen[qid] = number
            if self.categories is not None and category not in self.categories:
                continue
            later_turns += len(turns) > 1
            questions.append(Question(qid, self.group, (turns[0],), 1, None, {}, self.metrics))
        self.later_turns = later_turns
        if later_turns:
            log.warning(
                "%s: %d of %d questions have more than one turn; only turn 1 is asked (generation is single-turn)",
                self.path, later_turns, len(questions),
            )  # fmt: skip
        return questions
