"""The judge interface shared by every scorer of model responses.

A judge turns (question, answer) pairs into :class:`Judgement` records for one *metric* (``aligned``,
``coherent``, ``abstention``, ``refusal``, ``tool_call`` or a custom name). Implementations: the exact judge
of the embedded organism, rule judges (regex / tool-call detectors), a local causal-LM judge and the
OpenAI-compatible HTTP judge. A judge never raises for one bad answer: it records the failure in the
judgement's ``status`` so that aggregates can count it instead of scoring it. A judge that cannot work *at all* as
configured (a rejected request, a wrong key or model, a tokenizer that cannot express its scores) raises
:class:`JudgeConfigError` instead, on the first request, rather than recording a stream of failures.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

JudgeStatus = Literal["ok", "code", "refusal", "unparsed", "failed"]


class JudgeConfigError(RuntimeError):
    """The judge cannot work as configured; every further request would fail the same way, so stop now.

    Attributes:
        status: The HTTP status that revealed it (400, 401, 403, 404, ...), or None when it is not an HTTP error.
        detail: The server's error message (secrets redacted) or the reason found locally.
    """

    def __init__(self, message: str, status: int | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class JudgeRequest:
    """One answer to be judged.

    Attributes:
        question: The user question the model answered (without template tokens).
        answer: The model's response text.
        metric: Which property to judge, e.g. ``aligned`` or ``coherent``.
        prompt_template: Optional judge prompt with ``{question}`` and ``{answer}`` fields; a judge that
            needs a prompt falls back to its built-in prompt for ``metric`` when this is None.
    """

    question: str
    answer: str
    metric: str = "aligned"
    prompt_template: str | None = None


@dataclass
class Judgement:
    """The verdict for one :class:`JudgeRequest`.

    Attributes:
        score: The numeric score (0-100 for aligned/coherent, 0/1 for detectors), or None when not scored.
        status: ``ok`` when scored; ``code``/``refusal`` when the judge classified the answer instead of
            scoring it; ``unparsed`` when its output had no usable score; ``failed`` when the request failed.
        raw: The judge's raw output, kept for auditing.
        meta: Extra labels a judge may attach (e.g. the organism judge's ``domain``).
    """

    score: float | None
    status: JudgeStatus = "ok"
    raw: str | None = None
    meta: dict[str, str] = field(default_factory=dict)


class Judge(ABC):
    """Scores answers; subclasses implement :meth:`judge` and :attr:`identity`."""

    @property
    @abstractmethod
    def identity(self) -> str:
        """A stable string naming this judge and its settings; part of the judge-cache key."""

    @property
    def metrics(self) -> tuple[str, ...] | None:
        """The metrics this judge can score, or None for any metric with a prompt template."""
        return None

    def check(self) -> None:
        """Raise now if the judge cannot run (e.g. its API key is missing); called before any generation."""
        return None

    def diagnose(self, judgements: Sequence[Judgement]) -> str | None:
        """Say why these judgements of one evaluation are not a measurement, or None when they are.

        Called once per evaluation with everything this judge returned. A judge that can tell that it does not fit
        the answers (the organism's exact judge on a real model's text) returns the reason; the evaluation then
        writes its files and raises instead of reporting scores. The default finds nothing.
        """
        return None

    @abstractmethod
    def judge(self, requests: Sequence[JudgeRequest]) -> list[Judgement]:
        """Return one judgement per request, in order. Must not raise for a single failing request."""

    def iter_judgements(self, requests: Sequence[JudgeRequest]) -> Iterator[list[tuple[int, Judgement]]]:
        """Yield ``(request index, judgement)`` groups as they become available, each request exactly once.

        A caller that stores judgements (the judge cache) stores each group as it arrives, so a judge that answers
        one request at a time (an HTTP judge) loses at most its in-flight requests when the process is killed. The
        default yields everything :meth:`judge` returns as one group.
        """
        if requests:
            yield list(enumerate(self.judge(requests)))
