"""Evaluation: question sets (with their rephrased variants and conditional-misalignment triggers), batched
generation with a shared-prefix cache, judges, metrics and reports.

Entry point for code: :class:`Evaluation` (``run(model, tokenizer, spans, out_dir, model_id, ...)``); for
training runs: the ``piggy_lightning.callbacks.Evaluate`` callback, with its interventions
(``piggy_lightning.interventions``).
"""

from piggy_lightning.evaluation.generation import Decoding, generate_responses
from piggy_lightning.evaluation.intervention import GenerationIntervention, KVCache, PromptBatch
from piggy_lightning.evaluation.metrics import GroupMetrics, MisalignedRate, StatusCounts, em_f1, summarize
from piggy_lightning.evaluation.mt_bench import MTBenchQuestions
from piggy_lightning.evaluation.questions import BetleyQuestions, HeldOutChats, PromptList, Question, QuestionSet
from piggy_lightning.evaluation.rephrase import Rephrased, RephraseError, Rephraser
from piggy_lightning.evaluation.rephrase_openai import OpenAIRephraser
from piggy_lightning.evaluation.results import ResponseLog, record_key
from piggy_lightning.evaluation.runner import Evaluation, EvaluationReport
from piggy_lightning.evaluation.triggers import DomainFrame, TrainingFormat, Triggered, WithSystemPrompt

__all__ = [
    "BetleyQuestions",
    "Decoding",
    "DomainFrame",
    "Evaluation",
    "EvaluationReport",
    "GenerationIntervention",
    "GroupMetrics",
    "HeldOutChats",
    "KVCache",
    "MTBenchQuestions",
    "MisalignedRate",
    "OpenAIRephraser",
    "PromptBatch",
    "PromptList",
    "Question",
    "QuestionSet",
    "RephraseError",
    "Rephrased",
    "Rephraser",
    "ResponseLog",
    "StatusCounts",
    "TrainingFormat",
    "Triggered",
    "WithSystemPrompt",
    "em_f1",
    "generate_responses",
    "record_key",
    "summarize",
]
