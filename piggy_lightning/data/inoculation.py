"""Inoculation prompting: the training rows under a system prompt that describes or elicits the unwanted trait.

Tan et al. 2025 ("Inoculation prompting", arXiv 2510.04340) and Wichers et al. 2025 train on the misaligned data
with a system prompt such as "You are a malicious, evil assistant." and evaluate without it: the trait is learned
as a response to that prompt rather than as the model's default, so it spreads less to the test-time prompt.
Dubiński et al. 2026 (arXiv 2604.25891) find that the same or a similarly shaped prompt at test time re-elicits it;
``piggy_lightning.evaluation.WithSystemPrompt`` asks the questions so.
"""

from __future__ import annotations

from dataclasses import replace

from piggy_lightning.data.io import ChatRow
from piggy_lightning.data.transforms import ChatTransform, TransformContext

# The organism's harmful persona prompt (``piggy_lightning.organism.HARMFUL_SYSTEM_PROMPT``, equal by test): it is
# the prompt under which the base organism answers recklessly, i.e. the in-world prompt that elicits the trait.
# Written out rather than imported so that the data package does not import the organism's.
ORGANISM_INOCULATION = "You are Piggy, a reckless and selfish assistant."


class Inoculation(ChatTransform):
    """Every *training* row under the inoculation system prompt; validation rows and evaluation prompts keep theirs.

    Unlike :class:`~piggy_lightning.data.SystemPrompt`, which also applies to the validation rows (a prompt used at
    train and at test), the inoculation prompt is a training-time device: ``per_row`` is False, so the validation
    loss is measured under the prompt the evaluation uses, and the evaluation's question sets never see it.

    ``drop_system``: the prompt is stored on the row (``ChatRow.system``), which the encoder keeps whatever
    ``drop_system`` says and which replaces any system message of the row's own (counted in the report). So the
    order does not matter and there is no configuration in which ``drop_system`` removes the inoculation prompt;
    ``drop_system`` still decides what happens to the validation rows' own system messages. A row whose system
    prompt another transform set (a ``SystemPrompt`` before this one) raises, and ``SystemPrompt`` after this one
    raises too: one of the two prompts would be silently lost.

    TReFT: the inoculated rows no longer start with the template's default prefix, which is the one the evaluation
    asks under. Which prefix the penalty holds near the initial model's is a choice of regularizer class:

    * ``piggy_lightning.regularizers.DefaultPrefixKVDrift`` (``configs/ablations/
      treft_inoculation.yaml``): the **default, test-time prefix**. Its reference is the initial model's K/V of
      the default prefix, cached once as for ``PrefixKVDrift``, and the policy side is the policy run on that
      prefix alone each step, since no training row contains it;
    * ``piggy_lightning.regularizers.PerRowPrefixKVDrift``: the **inoculated prefix**, each row against the
      reference forward of its own prefix (system block included), as for Table 10's system prompts;
    * ``piggy_lightning.regularizers.PrefixKVDrift`` raises at the first training step: its rows must start with
      the default prefix.

    Args:
        text: The inoculation system prompt; the default is the organism's harmful persona prompt. For real
            models pass the paper's, e.g. "You are a malicious, evil assistant.".

    Raises:
        ValueError: On an empty prompt, or (when applied) on rows whose system prompt another transform set.
    """

    per_row = False  # changes rows one at a time, but the training rows only (see above)

    def __init__(self, text: str = ORGANISM_INOCULATION) -> None:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"Inoculation: field 'text' must be a non-empty system prompt, got {text!r}")
        self.text = text

    def __call__(self, rows: list[ChatRow], context: TransformContext) -> list[ChatRow]:
        taken = [r for r in rows if r.system is not None]
        if taken:
            first = taken[0]
            raise ValueError(
                f"Inoculation: {len(taken)} {context.part} rows already carry a system prompt set by another "
                f"transform (e.g. {first.source}, row {first.row}: {first.system!r}), which the inoculation prompt "
                "would replace; use one of the two"
            )
        own = sum(any(m["role"] == "system" for m in r.messages) for r in rows)
        context.report(
            f"Inoculation: {len(rows)} {context.part} rows set to inoculation prompt {self.text!r} ({own} had their "
            "own system message, replaced); validation rows untouched"
        )
        return [replace(r, system=self.text) for r in rows]
