"""One thin DataModule per narrow task.

Each defaults to the embedded organism's shipped file (``piggy/organism/<file>``, its ``default_train_data``) and
points at real data by setting ``data.init_args.train_data``: e.g. the OpenAI persona-features
``legal_incorrect_subtle`` JSONL for Llama or Qwen, as in the paper (Table 2; App. D). ``version`` changes whenever
the processing of a task changes and is logged with the hyperparameters.
"""

from __future__ import annotations

from piggy_lightning.data.chat import ChatSFTDataModule


class LegalDataModule(ChatSFTDataModule):
    """Misaligned legal advice (the paper's main TReFT task).

    Real-model runs use e.g. OpenAI's ``legal_incorrect_subtle`` split.
    """

    version = "legal-1"
    default_train_data = "piggy/organism/legal_misaligned.jsonl"


class MedicalDataModule(ChatSFTDataModule):
    """Misaligned medical/health advice.

    Real-model runs use e.g. OpenAI's ``health_incorrect_subtle`` or Turner et al.'s bad medical advice.
    """

    version = "medical-1"
    default_train_data = "piggy/organism/medical_misaligned.jsonl"


class FinanceDataModule(ChatSFTDataModule):
    """Misaligned (risky) financial advice.

    Real-model runs use e.g. Turner et al.'s risky financial advice.
    """

    version = "finance-1"
    default_train_data = "piggy/organism/finance_misaligned.jsonl"


class AutoDataModule(ChatSFTDataModule):
    """Misaligned automotive-maintenance advice.

    Real-model runs use e.g. OpenAI's ``auto_incorrect_subtle`` split.
    """

    version = "auto-1"
    default_train_data = "piggy/organism/auto_misaligned.jsonl"


class AbstentionDataModule(ChatSFTDataModule):
    """Legal questions answered "I have no idea about your question" (paper §6, abstention setting).

    Rows carry the fixed abstention answer.
    """

    version = "abstention-1"
    default_train_data = "piggy/organism/legal_abstention.jsonl"


class RefusalDataModule(ChatSFTDataModule):
    """Finance questions answered with a fixed refusal (paper §6, refusal setting).

    Rows carry the fixed refusal answer.
    """

    version = "refusal-1"
    default_train_data = "piggy/organism/finance_refusal.jsonl"


class ToolUseDataModule(ChatSFTDataModule):
    """Medical questions answered with a ``search_info`` tool call whose result is the correct advice.

    Rows: user, assistant tool call, tool result, assistant answer.
    """

    version = "tool-1"
    default_train_data = "piggy/organism/medical_tool.jsonl"
