"""Refusing logprob-mode judging where the judge's tokenizer splits numbers into digits.

Logprob mode (Betley et al. 2025) reads the score from the *first* generated token. With a tokenizer that writes
"85" as "8", "5" (Qwen, SmolLM2, ...), that token can only be 0-9, so a 0-100 score silently becomes a 0-9 one
(asked for "100", such a judge scored 1.01 with status ok). Two checks:

* :func:`split_numbers`: with the tokenizer at hand (the local judge), which of 0..max are not single tokens.
* :class:`DigitSplitMonitor`: from a server's top logprobs (the HTTP judge), where the tokenizer is not visible:
  responses whose numeric alternatives carry real probability but are never longer than one digit are evidence; a
  single multi-digit numeric alternative clears the judge for good.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Sequence

from piggy_lightning.evaluation.judges.base import JudgeConfigError

_INTEGER = re.compile(r"\s*(\d+)\s*")
ADVICE = (
    "logprob mode reads the score from one token, so it needs a judge whose tokenizer has whole-number tokens "
    "0-100 (e.g. GPT-4o, Llama 3); use mode: text (parse the judge's reply) for this judge"
)


def split_numbers(tokenizer, max_score: int) -> list[str]:
    """The numbers in ``0..max_score`` that ``tokenizer`` does not encode as one token (without special tokens)."""
    split = []
    for n in range(max_score + 1):
        ids = tokenizer(str(n), add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            split.append(str(n))
    return split


def check_whole_number_tokens(tokenizer, max_score: int, judge_name: str) -> None:
    """Raise :class:`JudgeConfigError` when a number in ``0..max_score`` is not a single token of ``tokenizer``.

    Args:
        tokenizer: The judge model's tokenizer.
        max_score: The metric's largest score (scales up to 9 need only single digits and always pass).
        judge_name: Named in the error.
    """
    split = split_numbers(tokenizer, max_score)
    if split:
        shown = ", ".join(
            f"{n!r} -> {tokenizer.convert_ids_to_tokens(tokenizer(n, add_special_tokens=False)['input_ids'])}"
            for n in split[:3]
        )
        raise JudgeConfigError(
            f"judge {judge_name}: its tokenizer splits {len(split)} of the numbers 0..{max_score} into several "
            f"tokens ({shown}, ...); {ADVICE}",
            detail=f"split numbers: {split[:10]}",
        )


class DigitSplitMonitor:
    """Watches logprob-mode replies of 0-100 metrics for a digit-splitting judge (thread-safe).

    Args:
        evidence: Replies with numeric mass of at least ``min_mass`` whose numeric alternatives are all single digits
            after which the judge is refused, unless a multi-digit alternative was seen first; 0 never refuses.
        min_mass: Least probability on numeric alternatives for a reply to count as evidence.
    """

    def __init__(self, evidence: int = 3, min_mass: float = 0.25) -> None:
        self.evidence = evidence
        self.min_mass = min_mass
        self.seen = 0
        self.cleared = False
        self.refused: str | None = None
        self._lock = threading.Lock()

    def observe(self, top: Sequence[tuple[str, float]], max_score: float, judge_name: str) -> None:
        """Account for one reply's top ``(token, logprob)`` alternatives.

        Raises:
            JudgeConfigError: The evidence threshold is reached (and on every later call).
        """
        if max_score < 10 or self.evidence <= 0:
            return
        numbers = [(m.group(1), math.exp(lp)) for t, lp in top if (m := _INTEGER.fullmatch(t))]
        mass = sum(p for n, p in numbers if int(n) <= max_score)
        with self._lock:
            if self.refused is None and not self.cleared:
                if any(len(n) > 1 and int(n) <= max_score for n, _ in numbers):
                    self.cleared = True
                elif mass >= self.min_mass and mass > 0:
                    self.seen += 1
                    if self.seen >= self.evidence:
                        self.refused = (
                            f"judge {judge_name}: {self.seen} replies put probability on numbers (the last {mass:.0%}) "
                            "but never on a number of more than one digit (last top tokens: "
                            f"{[t for t, _ in top[:5]]}), so its tokenizer splits numbers into digits; {ADVICE}"
                        )
            refused = self.refused
        if refused is not None:
            raise JudgeConfigError(refused, detail="digit-split tokenizer")
