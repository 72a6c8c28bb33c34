"""Token spans of a templated chat: prefix, query, postfix and response, found from tokens.

SCIENCE.md §1 splits every templated prompt into ``prefix + query + postfix (+ response)``:

* prefix: every token before the first user content (BOS, the template's default system block, user header);
* query: the tokens of user content;
* postfix: the template tokens between the end of a user turn and the start of the assistant content
  (end-of-user-turn, assistant header, and e.g. Qwen3's empty think block);
* response: the assistant content plus its end-of-turn token (what the model is trained to emit).

Spans are found by *token diffing*, not string offsets: the conversation is rendered and tokenized once as
is and twice more with one message's content swapped for a replacement (empty, and a short phrase). Tokens
shared by the renders at the start (and at the end) lie outside that message, so the tokens that change are
exactly the tokens that depend on the content, including any merged boundary tokens. Taking the widest span
over the two replacements means the content's own first/last token is only mistaken for a template token if
it collides with both replacements at once.

The text is tokenized with ``add_special_tokens=False`` because templates already write their BOS; this is
what prevents a double BOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

Message = dict[str, Any]

# Replacement contents for token diffing: empty, and a phrase whose ends differ from any template token.
_ALTERNATES = ("", "alpha omega")
SPAN_NAMES = ("prefix", "query", "postfix", "response")


class TemplateError(ValueError):
    """The chat template cannot be split into prefix / query / postfix / response."""


@dataclass(frozen=True)
class TokenizedChat:
    """One tokenized conversation with its span labels.

    Attributes:
        input_ids: Token ids of the rendered conversation.
        spans: For every token, one of ``prefix``, ``query``, ``postfix``, ``response`` or ``other``
            (system content that replaces the default system block, tool results, later template tokens).
    """

    input_ids: list[int]
    spans: list[str]

    def mask(self, name: str) -> list[bool]:
        """Boolean mask of the tokens labelled ``name``."""
        return [s == name for s in self.spans]


@dataclass(frozen=True)
class TemplateAnatomy:
    """The query-independent pieces of a template's default single-turn prompt.

    Attributes:
        prefix_ids: Tokens before the user content (identical for every default prompt).
        postfix_ids: Tokens from the end of the user content to the start of the response, i.e. the
            generation prompt (end-of-user-turn + assistant header + e.g. an empty think block).
    """

    prefix_ids: tuple[int, ...]
    postfix_ids: tuple[int, ...]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _common_suffix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = min(len(a), len(b)) - limit
    i = 0
    while i < n and a[-1 - i] == b[-1 - i]:
        i += 1
    return i


class ChatSpans:
    """Renders chats with a tokenizer's template and labels every token with its span.

    Args:
        tokenizer: A tokenizer with a ``chat_template``.
        template_kwargs: Extra keyword arguments for ``apply_chat_template`` (e.g. ``{"enable_thinking": False}``
            for Qwen3, ``{"date_string": "26 Jul 2024"}`` for Llama-3.1).
        generation_suffix: Text appended to every generation prompt, counted as postfix: e.g.
            ``<|channel|>final<|message|>`` makes GPT-OSS answer in its final channel, as the paper's code does.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        template_kwargs: dict[str, Any] | None = None,
        generation_suffix: str | None = None,
    ) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError(f"tokenizer {type(tokenizer).__name__} has no chat_template; spans need one")
        self.tokenizer = tokenizer
        self.template_kwargs = dict(template_kwargs or {})
        self.generation_suffix = generation_suffix or ""
        self._anatomy: TemplateAnatomy | None = None

    # -- rendering ---------------------------------------------------------------------------------------
    def render_ids(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> list[int]:
        """Render ``messages`` with the template and tokenize without adding special tokens."""
        text = self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt, **self.template_kwargs
        )
        if add_generation_prompt:
            text += self.generation_suffix
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _content_span(
        self, messages: Sequence[Message], index: int, ids: list[int], add_generation_prompt: bool
    ) -> tuple[int, int]:
        """Token range ``[start, end)`` of ``messages[index]``'s content within ``ids``."""
        starts, ends = [], []
        for alt in _ALTERNATES:
            if alt == messages[index]["content"]:
                continue  # an identical render carries no information
            swapped = [dict(m) for m in messages]
            swapped[index]["content"] = alt
            other = self.render_ids(swapped, add_generation_prompt)
            p = _common_prefix(ids, other)
            starts.append(p)
            ends.append(len(ids) - _common_suffix(ids, other, limit=p))
        start, end = min(starts), max(ends)
        if start > end:  # empty content: both renders agree everywhere around an empty slot
            end = start
        return start, end

    # -- public API --------------------------------------------------------------------------------------
    def tokenize(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> TokenizedChat:
        """Tokenize a conversation and label each token with its span.

        Args:
            messages: Chat messages; content must already be plain strings.
            add_generation_prompt: Append the assistant header (for prompts to generate from).

        Raises:
            TemplateError: If there is no user turn or the template drops a message's content.
        """
        roles = [m["role"] for m in messages]
        if "user" not in roles:
            raise TemplateError(f"cannot split a chat without a user turn (roles: {roles})")
        ids = self.render_ids(messages, add_generation_prompt)
        spans = ["other"] * len(ids)
        content: list[tuple[str, int, int]] = []
        for i, m in enumerate(messages):
            if m["role"] in ("user", "assistant"):
                start, end = self._content_span(messages, i, ids, add_generation_prompt)
                if start == end and m["content"]:
                    raise TemplateError(f"the chat template drops the content of message {i} ({m['role']})")
                content.append((m["role"], start, end))
        first_user = next(s for role, s, _ in content if role == "user")
        for t in range(first_user):
            spans[t] = "prefix"
        for k, (role, start, end) in enumerate(content):
            label = "query" if role == "user" else "response"
            for t in range(start, end):
                spans[t] = label
            if role == "assistant" and end < len(ids):
                spans[end] = "response"  # the end-of-turn token: the model must learn to stop
            if role == "user":
                nxt = content[k + 1][1] if k + 1 < len(content) else None
                if nxt is not None and content[k + 1][0] == "assistant":
                    stop = nxt
                elif nxt is None and add_generation_prompt:
                    stop = len(ids)
                else:
                    continue
                for t in range(end, stop):
                    if spans[t] == "other":
                        spans[t] = "postfix"
        return TokenizedChat(input_ids=ids, spans=spans)

    @property
    def anatomy(self) -> TemplateAnatomy:
        """Prefix and postfix tokens of the default single-turn prompt, computed once and cached."""
        if self._anatomy is None:
            chat = self.tokenize([{"role": "user", "content": "hello there"}], add_generation_prompt=True)
            prefix = tuple(t for t, s in zip(chat.input_ids, chat.spans, strict=True) if s == "prefix")
            postfix = tuple(t for t, s in zip(chat.input_ids, chat.spans, strict=True) if s == "postfix")
            self._anatomy = TemplateAnatomy(prefix_ids=prefix, postfix_ids=postfix)
        return self._anatomy
