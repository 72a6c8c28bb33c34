"""Reading chat datasets and validating every row, with errors that name the file, row and field.

Accepted sources: local ``.jsonl``, ``.json`` (a list of rows) and ``.parquet`` files, or a ``datasets`` name
(``name`` or ``name:config``) loaded with :func:`datasets.load_dataset`. Rows are ``{"messages": [{"role", "content"},
...]}``; OpenAI-style content parts (``{"content_type": "text", "parts": [...]}`` or a list of ``{"type": "text",
"text": ...}``) are joined into plain text. Nothing is dropped silently: an invalid row raises
:class:`DataError`, or, with ``skip_invalid``, is counted and reported in a :class:`ReadReport`. :func:`read_rows`
returns each valid row as a :class:`ChatRow` that remembers its source and row number, so that every later step
(transforms, tokenization) can name where a row came from.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
ROLES = ("system", "user", "assistant", "tool")
# Short names for the data files shipped with the embedded organism: ``piggy/organism/<file>``.
EMBEDDED_DATA = {
    "piggy/organism/": Path(__file__).parents[1] / "organism" / "assets" / "data",
    "piggy/organism-v2/": Path(__file__).parents[1] / "organism" / "assets" / "data_v2",  # the second world
    "piggy/betley/": Path(__file__).parents[1] / "evaluation" / "assets" / "betley",  # Betley et al., MIT
}


def resolve_source(source: str) -> str:
    """Map ``piggy/organism/<file>``, ``piggy/organism-v2/<file>``, ``piggy/betley/<file>`` to the shipped files.

    Other sources are returned unchanged.
    """
    for prefix, root in EMBEDDED_DATA.items():
        if source.startswith(prefix):
            return str(root / source[len(prefix) :])
    return source


class DataError(ValueError):
    """An invalid dataset row; the message names the source, row (1-based line for JSONL) and field.

    Args:
        source: The file path or dataset name.
        row: 1-based row number (a JSONL line, a JSON array element, a table row); 0 for the file as a whole,
            e.g. a ``.json`` file that does not parse, where no row is known.
        field_name: The field (``messages[1].content``) or a pseudo-field (``<line>``, ``<file>``).
        problem: What is wrong.
        line: 1-based line in the file where a parse error lies (a row is not a line in a ``.json`` file).
        column: 1-based column of that parse error.
    """

    def __init__(
        self, source: str, row: int, field_name: str, problem: str, line: int | None = None, column: int | None = None
    ) -> None:
        where = [source] + ([f"row {row}"] if row else [])
        if line is not None:
            where.append(f"line {line}" + (f", column {column}" if column is not None else ""))
        super().__init__(f"{', '.join(where)}, field {field_name!r}: {problem}")
        self.source, self.row, self.field, self.problem = source, row, field_name, problem
        self.line, self.column = line, column


@dataclass
class ReadReport:
    """What reading one source kept and skipped.

    Attributes:
        source: The file path or dataset name.
        kept: Number of valid rows returned.
        skipped: The errors of the rows skipped under ``skip_invalid``.
        rows: The row number of every kept chat, so that later errors (e.g. at tokenization) can name the row.
    """

    source: str
    kept: int = 0
    skipped: list[DataError] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)

    def summary(self) -> str:
        """One line for logs: counts and the first skip reasons."""
        text = f"{self.source}: kept {self.kept} rows, skipped {len(self.skipped)}"
        return text + "".join(f"\n  skipped: {e}" for e in self.skipped[:5])


@dataclass(frozen=True)
class ChatRow:
    """One validated chat and where it came from.

    Attributes:
        source: The file path (shipped names resolved) or dataset name it was read from.
        row: Its 1-based row number there (see :class:`DataError`).
        messages: Its validated messages, as in the source.
        system: A system prompt set by a transform (``SystemPrompt``): it replaces the row's own system messages
            when the row is tokenized, whatever ``drop_system`` says. None keeps the row's own system messages,
            or drops them under ``drop_system``.
    """

    source: str
    row: int
    messages: list[dict[str, str]]
    system: str | None = None


def _content_text(content: Any, source: str, row: int, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, dict) and "parts" in content:  # OpenAI export: {"content_type": "text", "parts": [...]}
        if content.get("content_type", "text") != "text":
            raise DataError(source, row, where, f"unsupported content_type {content.get('content_type')!r}")
        parts = content["parts"]
        if isinstance(parts, list) and all(isinstance(p, str) for p in parts):
            return "".join(parts)
    if isinstance(content, list):  # chat-completions parts: [{"type": "text", "text": ...}]
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) == len(content) and all(isinstance(t, str) for t in texts):
            return "".join(texts)
    raise DataError(source, row, where, f"content must be text or text parts, got {type(content).__name__}")


def normalize_row(row: Any, source: str, row_number: int, require_response: bool = True) -> list[dict[str, str]]:
    """Validate one row and return its messages as ``[{"role": ..., "content": str}, ...]``.

    Args:
        row: The raw row.
        source: The file or dataset name, for errors.
        row_number: The row's number, for errors.
        require_response: Require an assistant turn (training rows); False for prompt-only rows (evaluation).

    Raises:
        DataError: Missing or empty ``messages``, unknown role, non-text content, no user turn, or an
            empty or missing assistant turn (a row without response tokens has no loss: a batch of them is NaN).
    """
    if not isinstance(row, dict) or "messages" not in row:
        raise DataError(source, row_number, "messages", "row has no 'messages' list")
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(source, row_number, "messages", "must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise DataError(source, row_number, where, "must be an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise DataError(source, row_number, f"{where}.role", f"unknown role {role!r}; expected one of {ROLES}")
        if "content" not in message or message["content"] is None:
            raise DataError(source, row_number, f"{where}.content", "missing content")
        text = _content_text(message["content"], source, row_number, f"{where}.content")
        if role == "assistant" and not text.strip():
            raise DataError(source, row_number, f"{where}.content", "empty assistant turn")
        out.append({"role": role, "content": text})
    roles = [m["role"] for m in out]
    if "user" not in roles:
        raise DataError(source, row_number, "messages", f"no user turn (roles: {roles})")
    if require_response and "assistant" not in roles:
        raise DataError(source, row_number, "messages", f"no assistant turn to train on (roles: {roles})")
    return out


def _raw_rows(source: str) -> list[tuple[int, Any]]:
    """``(row_number, raw_row)`` pairs; JSONL rows are numbered by line, others by position (1-based)."""
    path = Path(source)
    if path.suffix == ".jsonl":
        rows: list[tuple[int, Any]] = []
        line_number = 0
        try:
            with path.open(encoding="utf-8-sig") as f:  # -sig: files saved by some editors start with a BOM
                for line_number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        rows.append((line_number, json.loads(line)))
                    except json.JSONDecodeError as e:
                        problem = f"not JSON: {e.msg}"
                        rows.append(
                            (line_number, DataError(source, line_number, "<line>", problem, line_number, e.colno))
                        )
        except UnicodeDecodeError as e:
            raise DataError(
                source, 0, "<file>", f"not UTF-8 text (an undecodable byte after line {line_number})"
            ) from e
        return rows
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except UnicodeDecodeError as e:
            raise DataError(source, 0, "<file>", f"not UTF-8 text (byte {e.start})") from e
        except json.JSONDecodeError as e:
            raise DataError(source, 0, "<file>", f"not JSON: {e.msg}", e.lineno, e.colno) from e
        if not isinstance(data, list):
            raise DataError(source, 0, "<file>", "a .json dataset must hold a list of rows")
        return list(enumerate(data, start=1))
    if path.suffix == ".parquet":
        import datasets

        return list(enumerate(datasets.Dataset.from_parquet(str(path)), start=1))
    if path.exists():
        raise DataError(source, 0, "<file>", "unsupported file type; use .jsonl, .json or .parquet")
    import datasets

    name, _, config = source.partition(":")
    return list(enumerate(datasets.load_dataset(name, config or None, split="train"), start=1))


def read_chats(
    source: str, skip_invalid: bool = False, require_response: bool = True
) -> tuple[list[list[dict[str, str]]], ReadReport]:
    """Read and validate every row of ``source``.

    Args:
        source: A ``.jsonl``/``.json``/``.parquet`` path or a ``datasets`` name.
        skip_invalid: Skip invalid rows (counted in the report and logged) instead of raising.
        require_response: Reject rows without an assistant turn (see :func:`normalize_row`).
    """
    source = resolve_source(source)
    report = ReadReport(source)
    chats = []
    for row_number, raw in _raw_rows(source):
        try:
            if isinstance(raw, DataError):
                raise raw
            chats.append(normalize_row(raw, source, row_number, require_response))
            report.rows.append(row_number)
        except DataError as e:
            if not skip_invalid:
                raise
            report.skipped.append(e)
    report.kept = len(chats)
    if report.skipped:
        log.warning(report.summary())
    return chats, report


def read_rows(source: str, skip_invalid: bool = False) -> tuple[list[ChatRow], ReadReport]:
    """Read and validate every row of a training source (see :func:`read_chats`) as :class:`ChatRow` objects."""
    chats, report = read_chats(source, skip_invalid=skip_invalid)
    return [ChatRow(report.source, row, chat) for row, chat in zip(report.rows, chats, strict=True)], report
