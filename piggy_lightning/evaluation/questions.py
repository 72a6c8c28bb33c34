"""Evaluation question sets in the formats users bring, each question tagged with an id and a group.

* :class:`BetleyQuestions`: Betley et al.'s YAML (anchors, ``paraphrases``, ``samples_per_paraphrase``, an
  optional ``system`` prompt that *is* used, per-question ``judge_prompts``).
* :class:`PromptList`: a JSON list or CSV of prompts (the paper's 44-prompt "General" set has this shape).
* :class:`HeldOutChats`: held-out rows of a chat JSONL; the first user turn is the question.

Bad input raises :class:`~piggy_lightning.data.io.DataError` naming the file, row and field. Loading happens in
:meth:`QuestionSet.load`, never in a constructor.
"""

from __future__ import annotations

import csv
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from piggy_lightning.data.io import DataError, read_chats, resolve_source

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
    """

    id: str
    group: str
    paraphrases: tuple[str, ...]
    samples_per_paraphrase: int = 1
    system: str | None = None
    judge_prompts: dict[str, str] = field(default_factory=dict)
    metrics: tuple[str, ...] = ("aligned", "coherent")


class QuestionSet(ABC):
    """A source of :class:`Question` records; subclasses read one file format.

    Args:
        path: The file to read.
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
        self.path = resolve_source(path)  # piggy/organism/<file> names a shipped file
        self.group = group
        self.metrics = tuple(metrics) if metrics else None
        self.limit = limit
        self.offset = offset

    @abstractmethod
    def _read(self) -> list[Question]:
        """All questions of the file, in file order."""

    def load(self) -> list[Question]:
        """Read, validate and slice the questions; ids must be unique."""
        if not Path(self.path).exists():
            raise FileNotFoundError(f"question set {self.path} does not exist")
        questions = self._read()[self.offset :]
        questions = questions[: self.limit] if self.limit is not None else questions
        seen: set[str] = set()
        for q in questions:
            if q.id in seen:
                raise DataError(self.path, 0, "id", f"duplicate question id {q.id!r}")
            seen.add(q.id)
        return questions

    def _metrics(self, judge_prompts: dict[str, str]) -> tuple[str, ...]:
        return self.metrics or tuple(judge_prompts) or ("aligned", "coherent")


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
    """

    def __init__(
        self,
        path: str,
        group: str = "general",
        metrics: list[str] | None = None,
        limit: int | None = None,
        offset: int = 0,
        samples_per_paraphrase: int | None = None,
    ) -> None:
        super().__init__(path, group, metrics, limit, offset)
        self.samples_per_paraphrase = samples_per_paraphrase

    def _read(self) -> list[Question]:
        import yaml

        try:
            items = yaml.safe_load(Path(self.path).read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", -1) + 1
            raise DataError(self.path, line, "<file>", f"not valid YAML ({e})") from e
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
    """A JSON list or a CSV file of prompts, one question per row, one paraphrase each.

    JSON rows may be strings or objects; objects and CSV rows take the text from ``text_field`` (by default the
    first of ``question``, ``prompt``, ``query``, ``content``, ``text``, or the user turn of ``messages``), the id
    from ``id_field`` (default ``id``, else ``<file stem>_<row>``) and an optional ``system``.

    Args:
        path: A ``.json`` or ``.csv`` file.
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
            with path.open(encoding="utf-8", newline="") as f:
                return list(enumerate(csv.DictReader(f), start=2))  # row numbers are file lines (header is 1)
        if path.suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise DataError(self.path, e.lineno, "<file>", f"not JSON ({e.msg})") from e
            if not isinstance(data, list):
                raise DataError(self.path, 1, "<file>", "a prompt list must be a JSON list")
            return list(enumerate(data, start=1))
        raise DataError(self.path, 0, "<file>", "unsupported prompt list; use .json or .csv")

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
        chats, _ = read_chats(self.path)
        stem = Path(self.path).stem
        questions = []
        for i, messages in enumerate(chats):
            user = next(m["content"] for m in messages if m["role"] == "user")
            system = next((m["content"] for m in messages if m["role"] == "system"), None)
            qid = f"{stem}_{i + 1:05d}"
            system = self.system if self.system is not None else (system if self.keep_system else None)
            questions.append(Question(qid, self.group, (user,), 1, system, {}, self._metrics({})))
        return questions
