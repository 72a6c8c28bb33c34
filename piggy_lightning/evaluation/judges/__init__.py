"""Judges: the interface, an OpenAI-compatible HTTP judge, a local-LM judge, rule detectors and the judge cache.

A judge that cannot work as configured raises :class:`JudgeConfigError` on its first request.
"""

from piggy_lightning.evaluation.judges.base import Judge, JudgeConfigError, Judgement, JudgeRequest, JudgeStatus
from piggy_lightning.evaluation.judges.cache import JudgeCache, judge_with_cache
from piggy_lightning.evaluation.judges.local import LocalJudge
from piggy_lightning.evaluation.judges.openai import OpenAIJudge
from piggy_lightning.evaluation.judges.prompts import PROMPTS, render, template_for
from piggy_lightning.evaluation.judges.redaction import redact
from piggy_lightning.evaluation.judges.rules import (
    AbstentionDetector,
    CascadeJudge,
    RefusalDetector,
    RegexJudge,
    ToolCallDetector,
)
from piggy_lightning.evaluation.judges.scoring import score_from_logprobs, score_from_text

__all__ = [
    "PROMPTS",
    "AbstentionDetector",
    "CascadeJudge",
    "Judge",
    "JudgeCache",
    "JudgeConfigError",
    "JudgeRequest",
    "JudgeStatus",
    "Judgement",
    "LocalJudge",
    "OpenAIJudge",
    "RefusalDetector",
    "RegexJudge",
    "ToolCallDetector",
    "judge_with_cache",
    "redact",
    "render",
    "score_from_logprobs",
    "score_from_text",
    "template_for",
]
