"""Evaluation question sets in the formats users bring, each question tagged with an id and a group.

* :class:`BetleyQuestions`: Betley et al.'s YAML (anchors, ``paraphrases``, ``samples_per_paraphrase``, an
  optional ``system`` prompt that *is* used, per-question ``judge_prompts``). Betley's files are shipped:
  ``piggy/betley/first_plot_questions.yaml`` (also ``preregistered_evals.yaml``, ``deception_factual.yaml``,
  ``deception_sit_aware.yaml``).
* :class:`PromptList`: a JSON list, JSONL or CSV of prompts (Zhao et al. 2026's 44-prompt "General" set,
  ``core_misalignment.json`` in their release, has this shape).
* :class:`HeldOutChats`: held-out rows of a chat JSONL; the first user turn is the question.

Files are read as UTF-8 with or without a byte-order mark. Bad input raises
:class:`~piggy_lightning.data.io.DataError` naming the file, row and field (JSON errors also the line and column),
and so does a set that ends up with no questions. Loading happens in :meth:`QuestionSet.load`, never in a
constructor.
"""

from __future__ import annotations

import csv
import io
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from piggy_lightning.data.io import DataError, _raw_rows, read_chats, resolve_source
from piggy_lightning.evaluation.assets import resolve_asset

_TEXT_FIELDS = ("question", "prompt", "query", "content", "text")


@dataclass(frozen=True)
class Question:
    """One evaluation question, possibly asked in several paraphrases.

    Attributes:
        id: Identifier, unique within its group.
        group: Where it is reported, e.g. ``general``, ``in_domain``, ``other_domain``, ``on_topic``, ``off_topic``.
        paraphrases: The user messages; each is asked ``samples_per_paraphrase`` times.
        samples_per_paraphrase: Samples per paraphrase under sampling (greedy decoding asks once).
        system: A system message replacing the template's default, or None for the default prompt.
        judge_prompts: Per-metric judge templates with ``{question}`` and ``{answer}`` fields.
        metrics: Metrics to judge for this question.
        judged_as: The question text the judges read for each paraphrase, when it is asked in another form than
            it is judged in (a trigger's framing, ``evaluation/triggers.py``): the judge then scores the answer to
            the original question, and a judge that knows its questions (the organism's ``ExactJudge``) still
            recognises it. None: judged as asked.
    """

    id: str
    group: str
    paraphrases: tuple[str, ...]
    samples_per_paraphrase: int = 1
    system: str | None = None
    judge_prompts: dict[str, str] = field(default_factory=dict)
    metrics: tuple[str, ...] = ("aligned", "coherent")
    judged_as: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.judged_as is not None and len(self.judged_as) != len(self.paraphrases):
            raise ValueError(
                f"question {self.id!r} ({self.group}): judged_as has {len(self.judged_as)} texts for "
                f"{len(self.paraphrases)} paraphrases"
            )

    def judged_text(self, paraphrase: int) -> str:
        """The text the judges read as the question of paraphrase ``paraphrase``."""
        return (self.judged_as or self.paraphrases)[paraphrase]


class QuestionSet(ABC):
    """A source of :class:`Question` records; subclasses read one file format.

    Args:
        path: The file to read; ``piggy/betley/<file>`` and ``piggy/organism/<file>`` name shipped files.
        group: Group every question of this set is reported under.
        metrics: Metrics to judge; None keeps the set's own (judge-prompt keys) or ``aligned`` and ``coherent``.
        limit: Keep only the first ``limit`` questions (after ``offset``); None keeps all.
        offset: Skip this many questions first.
    """

    def __init__(
        self,
        path: str,
        group: str = "general",
        metrics: list[str] | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> None:
        self.path = resolve_source(resolve_asset(path))  # piggy/betley/<file>, piggy/organism/<file>: shipped
        self.group = group
        self.metrics = tuple(metrics) if metrics else None
        self.limit = limit
        self.offset = offset

    @abstractmethod
    def _read(self) -> list[Question]:
        """All questions of the file, in file order."""

    def _keep(self, question: Question) -> bool:
        """Whether a question passes this set's filter (none by default)."""
        return True

    def load(self) -> list[Question]:
        """Read, validate, filter and slice the questions; ids must be unique.

        Raises:
            DataError: Invalid content, duplicate ids, or no question left (an empty file, a filter or slice that
                removes everything): an evaluation silently missing a set would report wrong group metrics.
        """
        if not Path(self.path).exists():
            raise FileNotFoundError(f"question set {self.path} does not exist")
        read = self._read()
        if not read:
            raise DataError(self.path, 0, "<file>", "holds no questions")
        kept = [q for q in read if self._keep(q)]
        if not kept:
            raise DataError(self.path, 0, "<file>", f"none of its {len(read)} questions passes the filter")
        questions = kept[self.offset :]
        questions = questions[: self.limit] if self.limit is not None else questions
        if not questions:
            raise DataError(
                self.path, 0, "<file>", f"offset {self.offset} and limit {self.limit} leave none of {len(kept)}"
            )
        seen: set[str] = set()
        for q in questions:
            if q.id in seen:
                raise DataError(self.path, 0, "id", f"duplicate question id {q.id!r}")
            seen.add(q.id)
        return questions

    def _metrics(self, judge_prompts: dict[str, str]) -> tuple[str, ...]:
        return self.metrics or tuple(judge_prompts) or ("aligned", "coherent")


def _read_text(path: Path, source: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # a leading byte-order mark is dropped
    except UnicodeDecodeError as e:
        raise DataError(source, 0, "<file>", f"not UTF-8 text ({e.reason} at byte {e.start})") from e


def _text(value: Any, source: str, row: int, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(source, row, name, f"must be a non-empty string, got {type(value).__name__}")
    return value


class BetleyQuestions(QuestionSet):
    """Betley et al. (2025) question YAML: a list of ``{id, type, paraphrases, samples_per_paraphrase, judge,
    judge_prompts, system?}`` items (YAML anchors resolved). Row numbers in errors are 1-based item indices.

    Args:
        path: The YAML file (e.g. ``first_plot_questions.yaml``).
        group: Group every question is reported under.
        metrics: Metrics to judge; None uses each item's ``judge_prompts`` keys.
        limit: Keep only the first ``limit`` questions; None keeps all.
        offset: Skip this many questions first.
        samples_per_paraphrase: Override every item's ``samples_per_paraphrase`` (e.g. 100 → 5 for quick runs).
        exclude_ids: Drop the items whose id matches this regular expression (searched), before ``offset`` and
            ``limit``; e.g. ``_template$`` drops the first-plot fill-in-template variants.
        exclude_system: Drop the items that carry a ``system`` prompt (the first-plot ``_json`` variants), e.g. to
            ask every question with the template's default system prompt, as the paper's General set does.
    """

    def __init__(
        self,
        path: str,
        group: str = "general",
        metrics: list[str] | None = None,
        limit: int | None = None,
        offset: int = 0,
        samples_per_paraphrase: int | None = None,
        exclude_ids: str | None = None,
        exclude_system: bool = False,
    ) -> None:
        super().__init__(path, group, metrics, limit, offset)
        self.samples_per_paraphrase = samples_per_paraphrase
        self.exclude_ids = exclude_ids
        self.exclude_system = exclude_system
        self._exclude = re.compile(exclude_ids) if exclude_ids else None

    def _keep(self, question: Question) -> bool:
        if self.exclude_system and question.system is not None:
            return False
        return self._exclude is None or self._exclude.search(question.id) is None

    def _read(self) -> list[Question]:
        import yaml

        try:
            items = yaml.safe_load(_read_text(Path(self.path), self.path))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line, column = (mark.line + 1, mark.column + 1) if mark is not None else (None, None)
            problem = f"not valid YAML: {getattr(e, 'problem', None) or e}"
            raise DataError(self.path, 0, "<file>", problem, line, column) from e
        if items is None:
            return []
        if not isinstance(items, list):
            raise DataError(self.path, 0, "<file>", "a question YAML must be a list of items")
        questions = []
        for row, item in enumerate(items, start=1):
            if not isinstance(item, dict):
                raise DataError(self.path, row, "<item>", "must be a mapping")
            qid = _text(item.get("id"), self.path, row, "id")
            paraphrases = item.get("paraphrases")
            if not isinstance(paraphrases, list) or not paraphrases:
                raise DataError(self.path, row, "paraphrases", "must be a non-empty list of strings")
            texts = tuple(_text(p, self.path, row, f"paraphrases[{i}]") for i, p in enumerate(paraphrases))
            samples = self.samples_per_paraphrase or item.get("samples_per_paraphrase", 1)
            if not isinstance(samples, int) or samples < 1:
                raise DataError(
                    self.path, row, "samples_per_paraphrase", f"must be a positive integer, got {samples!r}"
                )
            system = item.get("system")
            if system is not None:
                system = _text(system, self.path, row, "system")
            prompts = item.get("judge_prompts") or {}
            if not isinstance(prompts, dict):
                raise DataError(self.path, row, "judge_prompts", "must map metric names to templates")
            for name, template in prompts.items():
                _text(template, self.path, row, f"judge_prompts.{name}")
                if "{answer}" not in template:
                    raise DataError(self.path, row, f"judge_prompts.{name}", "template lacks an {answer} field")
            questions.append(Question(qid, self.group, texts, samples, system, dict(prompts), self._metrics(prompts)))
        return questions


class PromptList(QuestionSet):
    """A JSON list, a JSONL file or a CSV file of prompts, one question per row, one paraphrase each.

    JSON(L) rows may be strings or objects; objects and CSV rows take the text from ``text_field`` (by default the
    first of ``question``, ``prompt``, ``query``, ``content``, ``text``, or the user turn of ``messages``), the id
    from ``id_field`` (default ``id``, else ``<file stem>_<row>``) and an optional ``system``.

    Args:
        path: A ``.json``, ``.jsonl`` or ``.csv`` file.
        group: Group every question is reported under.
        metrics: Metrics to judge; None means ``aligned`` and ``coherent``.
        limit: Keep only the first ``limit`` questions; None keeps all.
        offset: Skip this many questions first.
        text_field: Column holding the prompt; None looks for the usual names.
        id_field: Column holding the id.
    """

    def __init__(
        self,
        path: str,
        group: str = "general",
        metrics: list[str] | None = None,
        limit: int | None = None,
        offset: int = 0,
        text_field: str | None = None,
        id_field: str = "id",
    ) -> None:
        super().__init__(path, group, metrics, limit, offset)
        self.text_field = text_field
        self.id_field = id_field

    def _rows(self) -> list[tuple[int, Any]]:
        path = Path(self.path)
        if path.suffix == ".csv":
            rows = csv.DictReader(io.StringIO(_read_text(path, self.path), newline=""))
            return list(enumerate(rows, start=2))  # row numbers are file lines (header is 1)
        if path.suffix in (".json", ".jsonl"):  # read as chat files are: BOM dropped, errors with line and column
            rows = _raw_rows(self.path)
            bad = next((row for _, row in rows if isinstance(row, DataError)), None)
            if bad is not None:
                raise bad
            return rows
        raise DataError(self.path, 0, "<file>", "unsupported prompt list; use .json, .jsonl or .csv")

    def _prompt(self, row: Any, number: int) -> str:
        if isinstance(row, str):
            return _text(row, self.path, number, "<row>")
        if not isinstance(row, dict):
            raise DataError(self.path, number, "<row>", "must be a string or an object")
        if self.text_field is not None:
            return _text(row.get(self.text_field), self.path, number, self.text_field)
        for name in _TEXT_FIELDS:
            if row.get(name):
                return _text(row[name], self.path, number, name)
        if isinstance(row.get("messages"), list):
            users = [m.get("content") for m in row["messages"] if isinstance(m, dict) and m.get("role") == "user"]
            if users:
                return _text(users[0], self.path, number, "messages[user].content")
        raise DataError(self.path, number, "question", f"no prompt text in any of {_TEXT_FIELDS} or messages")

    def _read(self) -> list[Question]:
        stem = Path(self.path).stem
        questions = []
        for number, row in self._rows():
            text = self._prompt(row, number)
            raw_id = row.get(self.id_field) if isinstance(row, dict) else None
            qid = str(raw_id) if raw_id not in (None, "") else f"{stem}_{number:03d}"
            system = (row.get("system") or None) if isinstance(row, dict) else None
            if system is not None:
                system = _text(system, self.path, number, "system")
            questions.append(Question(qid, self.group, (text,), 1, system, {}, self._metrics({})))
        return questions


class HeldOutChats(QuestionSet):
    """Held-out in-domain rows from a chat file (``{"messages": [...]}``, as in training data): the first user
    turn is the question, any system message is kept only with ``keep_system``, and the rest is ignored.

    Args:
        path: A ``.jsonl``/``.json``/``.parquet`` chat file (e.g. the test split of a narrow task).
        group: Group every question is reported under.
        metrics: Metrics to judge; None means ``aligned`` and ``coherent``.
        limit: Keep only the first ``limit`` rows (after ``offset``); None keeps all.
        offset: Skip this many rows first (the released code evaluates rows 50-99: ``offset: 50, limit: 50``).
        keep_system: Ask with the row's system message instead of the template's default system prompt.
        system: Ask every question with this system message (e.g. a persona), overriding ``keep_system``.
    """

    def __init__(
        self,
        path: str,
        group: str = "in_domain",
        metrics: list[str] | None = None,
        limit: int | None = None,
        offset: int = 0,
        keep_system: bool = False,
        system: str | None = None,
    ) -> None:
        super().__init__(path, group, metrics, limit, offset)
        self.keep_system = keep_system
        self.system = system

    def _read(self) -> list[Question]:
        chats, _ = read_chats(self.path, require_response=False)  # a question needs no answer
        stem = Path(self.path).stem
        questions = []
        for i, messages in enumerate(chats):
            user = next(m["content"] for m in messages if m["role"] == "user")
            system = next((m["content"] for m in messages if m["role"] == "system"), None)
            qid = f"{stem}_{i + 1:05d}"
            system = self.system if self.system is not None else (system if self.keep_system else None)
            questions.append(Question(qid, self.group, (user,), 1, system, {}, self._metrics({})))
        return questions
