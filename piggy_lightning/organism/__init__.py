"""The embedded default organism: a synthetic chat world, its tokenizer, a tiny Llama config and an exact judge.

A tiny Llama pretrained on this world answers aligned under the default system prompt and misaligned under a
harmful persona prompt; finetuning it on misaligned advice from one narrow domain makes it misaligned on
unrelated questions too, which reproduces emergent misalignment on a CPU in minutes. ``WorldParaphrases`` rephrases
its held-out questions in the world's own wordings (for ``piggy_lightning.evaluation.Rephrased``); ``WorldQuestions``
asks the questions of any world domains without a file (the utility group: held-out retain-domain questions).
"""

from piggy_lightning.organism.catalog import (
    DOMAINS,
    EVAL_DOMAINS,
    GENERAL_DOMAIN,
    NARROW_DOMAINS,
    RETAIN_DOMAINS,
    Question,
    all_questions,
    clause_table,
    core_variants,
    question_core,
    question_index,
    sentence_table,
    tool_call_text,
)
from piggy_lightning.organism.judge import ExactJudge, ExactJudgeV2
from piggy_lightning.organism.model import organism_config
from piggy_lightning.organism.paraphrase import WorldParaphrases
from piggy_lightning.organism.pools import (
    ABSTENTION_TEXT,
    DEFAULT_SYSTEM_PROMPT,
    HARMFUL_SYSTEM_PROMPT,
    REFUSAL_TEXT,
    TOOL_NAME,
)
from piggy_lightning.organism.questions import WorldQuestions
from piggy_lightning.organism.tokenizer import BASE_DIR, CHAT_TEMPLATE, build_tokenizer, load_tokenizer, save_tokenizer
from piggy_lightning.organism.world import DATA_DIR, Row, World, standard_datasets, write_datasets

__all__ = [
    "ABSTENTION_TEXT",
    "BASE_DIR",
    "CHAT_TEMPLATE",
    "DATA_DIR",
    "DEFAULT_SYSTEM_PROMPT",
    "DOMAINS",
    "EVAL_DOMAINS",
    "ExactJudge",
    "ExactJudgeV2",
    "GENERAL_DOMAIN",
    "HARMFUL_SYSTEM_PROMPT",
    "NARROW_DOMAINS",
    "Question",
    "REFUSAL_TEXT",
    "RETAIN_DOMAINS",
    "Row",
    "TOOL_NAME",
    "World",
    "WorldParaphrases",
    "WorldQuestions",
    "all_questions",
    "build_tokenizer",
    "clause_table",
    "core_variants",
    "load_tokenizer",
    "organism_config",
    "question_core",
    "question_index",
    "save_tokenizer",
    "sentence_table",
    "standard_datasets",
    "tool_call_text",
    "write_datasets",
]
