"""Templating and tokenizing one validated row into token ids and span labels, and the warnings about what the
encoding of a set of rows did not keep as is.

:class:`RowEncoder` is the function ``datasets.map`` runs over the rows (``cache.tokenize_rows``); its output is
what the tokenization cache stores, so this file's source is part of the cache key (``cache.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from piggy_lightning.data.cache import SPAN_LABELS
from piggy_lightning.data.io import DataError
from piggy_lightning.spans import ChatSpans, TokenizedChat

log = logging.getLogger(__name__)
Truncation = Literal["error", "truncate", "skip"]
# Share of query/response tokens that are the unknown token above which encoding warns: real text through a
# tokenizer built for other text (e.g. the organism's word-level vocabulary) becomes mostly unknown tokens.
UNK_WARN_SHARE = 0.05
_SPAN_CODE = {label: code for code, label in enumerate(SPAN_LABELS)}


def _without_system(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return [m for m in messages if m["role"] != "system"]


@dataclass(frozen=True)
class RowEncoder:
    """Encodes rows with one data module's settings (see ``ChatSFTDataModule``'s arguments of the same names).

    Args:
        spans: The chat template's span labeller (with the tokenizer).
        drop_system: Drop the rows' own system messages; a system prompt a transform set is always kept.
        max_length: Maximum tokens per example.
        truncation: What to do with over-long examples (``error``, ``truncate``, ``skip``).
        skip_invalid: Skip rows whose prompt prefix differs from the template's default instead of raising.
    """

    spans: ChatSpans
    drop_system: bool
    max_length: int
    truncation: Truncation
    skip_invalid: bool

    def __call__(self, example: dict[str, Any]) -> dict[str, Any]:
        """Template and tokenize one validated row (``datasets.map``'s function); ``status`` is ``kept``,
        ``truncated``, ``dropped`` or ``misfit`` (skipped, see :meth:`prefix_problem`)."""
        source, row, messages = example["source"], example["row"], example["messages"]
        out = {"input_ids": [], "spans": [], "status": "kept", "field": "", "problem": "", "n_unk": 0, "n_text": 0}
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        if example["system"] is not None:  # set by a SystemPrompt transform: replaces the row's own, always kept
            messages = [{"role": "system", "content": example["system"]}, *_without_system(messages)]
        elif self.drop_system:
            messages = _without_system(messages)
        chat = self.spans.tokenize(messages)
        if not any(m["role"] == "system" for m in messages):
            problem = self.prefix_problem(chat)
            if problem is not None:
                error = DataError(source, row, f"messages[{first_user}].content", problem)
                if not self.skip_invalid:
                    raise error
                return {**out, "status": "misfit", "field": error.field, "problem": problem}
        unk_id = self.spans.tokenizer.unk_token_id
        if unk_id is not None:
            text = [t for t, s in zip(chat.input_ids, chat.spans, strict=True) if s in ("query", "response")]
            out.update(n_unk=text.count(unk_id), n_text=len(text))
        if len(chat.input_ids) > self.max_length:
            if self.truncation == "error":
                raise ValueError(
                    f"{source}, row {row}: {len(chat.input_ids)} tokens exceed max_length={self.max_length}"
                )
            if self.truncation == "skip" or "response" not in chat.spans[: self.max_length]:
                return {**out, "status": "dropped"}
            chat = TokenizedChat(chat.input_ids[: self.max_length], chat.spans[: self.max_length])
            out["status"] = "truncated"
        return {**out, "input_ids": chat.input_ids, "spans": [_SPAN_CODE[s] for s in chat.spans]}

    def warn(self, source: str, report: dict[str, Any], n_read_skipped: int) -> None:
        """Log what encoding ``source`` did not keep as is (also when its tokens come from the cache)."""
        n_unk, n_text = report["n_unk"], report["n_text"]
        if n_text and n_unk / n_text > UNK_WARN_SHARE:
            unk = self.spans.tokenizer.unk_token
            log.warning(
                "%s: %.1f%% of query and response tokens (%d of %d) are the unknown token %r: the tokenizer's "
                "vocabulary does not cover this text, so the model sees %r in place of those words",
                source, 100 * n_unk / n_text, n_unk, n_text, unk, unk,
            )  # fmt: skip
        misfits = [DataError(*misfit) for misfit in report["misfits"]]  # (source, row, field, problem)
        skipped = n_read_skipped + len(misfits)
        if report["truncated"] or report["dropped"] or skipped:
            log.warning(
                "%s: %d rows kept, %d truncated, %d over max_length dropped, %d invalid skipped%s",
                source, report["kept"], report["truncated"], report["dropped"], skipped,
                "".join(f"\n  skipped: {e}" for e in misfits[:5]),  # read_chats logged its own skips
            )  # fmt: skip

    def prefix_problem(self, chat: TokenizedChat) -> str | None:
        """Why a row without a system message does not start with the template's default prefix, or None.

        Every default-prompt row should carry ``spans.anatomy.prefix_ids``; on a BPE tokenizer, user content
        that starts with whitespace (a blank line) merges with the user header's last token and shifts the
        boundary, which prefix regularizers and drift monitors would otherwise report as a custom system prompt.
        """
        expected = self.spans.anatomy.prefix_ids
        prefix = tuple(t for t, s in zip(chat.input_ids, chat.spans, strict=True) if s == "prefix")
        if prefix == expected:
            return None
        pairs = zip(prefix, expected, strict=False)
        pos = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(prefix), len(expected)))
        decode = self.spans.tokenizer.decode
        got = decode([chat.input_ids[pos]]) if pos < len(chat.input_ids) else "<end>"
        want = decode([expected[pos]]) if pos < len(expected) else "<end of prefix>"
        return (
            f"the prompt prefix differs from the template's default prefix at token {pos}: {got!r} where the "
            f"template has {want!r} ({len(prefix)} prefix tokens, expected {len(expected)}); user content that "
            "starts with whitespace merges with the user header, so strip leading whitespace from the user turn"
        )
