"""Token spans of a templated chat: prefix, query, postfix and response, found from tokens.

Every templated prompt splits into ``prefix + query + postfix (+ response)``:

* prefix: every token before the first user content (BOS, the template's default system block, user header);
* query: the tokens of user content;
* postfix: the template tokens between the end of a user turn and the start of the assistant content
  (end-of-user-turn, assistant header, and e.g. Qwen3's empty think block);
* response: the assistant content plus its end-of-turn token (what the model is trained to emit).

Spans are found by *token diffing*, not string offsets: the conversation is rendered and tokenized once as
is and up to twice more with one message's content swapped for a replacement (empty, and a short phrase).
Tokens shared by the renders at the start (and at the end) lie outside that message, so the tokens that change
are exactly the tokens that depend on the content, including any merged boundary tokens. Taking the widest span
over the two replacements means the content's own first/last token is only mistaken for a template token if
it collides with both replacements at once.

A replacement only carries information if its render differs from the original's *token ids*: a string
comparison is not enough, since a whitespace-only message on a trimming template renders like the empty one,
and on a word-level vocabulary two different phrases can both become ``<unk> <unk>``. So replacements whose
render equals the original are skipped, and the phrases (the replacement and the anatomy's probe query) are
chosen among texts the tokenizer represents without its unknown token, picked from the vocabulary if needed.

The text is tokenized with ``add_special_tokens=False`` because templates already write their BOS; this is
what prevents a double BOS.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

Message = dict[str, Any]

# Default phrases: the anatomy's probe query, and the replacement content for token diffing (its ends differ
# from template tokens). Replaced by vocabulary words when the tokenizer cannot represent them.
_DEFAULT_PHRASES = ("hello there", "alpha omega")
_VOCAB_SCAN = 20_000  # token ids searched for fallback words: a vocabulary's common words come early
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
        postfix_exclude: Template text that ends a postfix but is labelled ``other``, not ``postfix``: e.g. Qwen3's
            empty think block ``<think>\n\n</think>\n\n``, which the release's patching code leaves out of the
            postfix by default (its training configs include it). None keeps every postfix token. A generation
            prompt whose postfix does not end with it raises.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        template_kwargs: dict[str, Any] | None = None,
        generation_suffix: str | None = None,
        postfix_exclude: str | None = None,
    ) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError(f"tokenizer {type(tokenizer).__name__} has no chat_template; spans need one")
        self.tokenizer = tokenizer
        self.template_kwargs = dict(template_kwargs or {})
        self.generation_suffix = generation_suffix or ""
        self.postfix_exclude = postfix_exclude or None
        self._anatomy: TemplateAnatomy | None = None
        self._phrases: tuple[str, str] | None = None

    # -- rendering ---------------------------------------------------------------------------------------
    def render_ids(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> list[int]:
        """Render ``messages`` with the template and tokenize without adding special tokens."""
        text = self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt, **self.template_kwargs
        )
        if add_generation_prompt:
            text += self.generation_suffix
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # -- diffing phrases ---------------------------------------------------------------------------------
    def _representable(self, text: str) -> bool:
        """Whether ``text`` tokenizes without the unknown token and decodes back to itself.

        Surrounding whitespace is ignored in the round trip: SentencePiece decoders drop the word-start space.
        """
        ids = self._ids(text)
        unk = self.tokenizer.unk_token_id
        return bool(ids) and (unk is None or unk not in ids) and self.tokenizer.decode(ids).strip() == text.strip()

    def _vocabulary_phrases(self) -> Iterator[str]:
        """Two-word phrases of distinct vocabulary words, none of them a token of the template's own text."""
        tok = self.tokenizer
        template = set(self.render_ids([{"role": "user", "content": ""}], add_generation_prompt=True))
        avoid = template | set(tok.all_special_ids)
        words: list[str] = []
        for token_id in range(min(len(tok), _VOCAB_SCAN)):
            word = tok.decode([token_id]).strip()
            if token_id in avoid or not (word.isascii() and word.isalpha()) or word in words:
                continue
            if self._representable(word) and not avoid & set(self._ids(word)):
                words.append(word)
            if len(words) == 32:
                break
        used: set[str] = set()
        for first in words:
            for second in words:
                if first == second or first in used or second in used:
                    continue
                phrase = f"{first} {second}"
                ids = self._ids(phrase)
                if self._representable(phrase) and ids[0] not in avoid and ids[-1] not in avoid:
                    used.update((first, second))
                    yield phrase

    def phrases(self) -> tuple[str, str]:
        """The anatomy's probe query and the diffing replacement: distinct texts the tokenizer represents.

        Raises:
            TemplateError: If neither the defaults nor the vocabulary give two such phrases.
        """
        if self._phrases is None:
            fallback = self._vocabulary_phrases()
            chosen: list[str] = []
            for default in _DEFAULT_PHRASES:
                phrase = default if self._representable(default) else None
                while phrase is None or any(self._ids(phrase) == self._ids(c) for c in chosen):
                    phrase = next(fallback, None)
                    if phrase is None:
                        raise TemplateError(
                            f"found no text that tokenizer {type(self.tokenizer).__name__} represents without its "
                            f"unknown token {self.tokenizer.unk_token!r}; spans cannot be found by token diffing"
                        )
                chosen.append(phrase)
            self._phrases = (chosen[0], chosen[1])
        return self._phrases

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _content_span(
        self, messages: Sequence[Message], index: int, ids: list[int], add_generation_prompt: bool
    ) -> tuple[int, int] | None:
        """Token range ``[start, end)`` of ``messages[index]``'s content within ``ids``.

        Returns None when no replacement changes the render, i.e. the template drops this content.
        """
        starts, ends = [], []
        for alt in ("", self.phrases()[1]):
            if alt == messages[index]["content"]:
                continue  # an identical render carries no information
            swapped = [dict(m) for m in messages]
            swapped[index]["content"] = alt
            other = self.render_ids(swapped, add_generation_prompt)
            if other == ids:
                continue  # e.g. whitespace on a trimming template, or both texts are all unknown tokens
            p = _common_prefix(ids, other)
            starts.append(p)
            ends.append(len(ids) - _common_suffix(ids, other, limit=p))
        if not starts:
            return None
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
            TemplateError: If there is no user turn, the template drops a message's content (system included),
                or a generation prompt gets no postfix although the template's default prompt has one.
        """
        chat, generation_postfix = self._label(messages, add_generation_prompt)
        if generation_postfix == 0 and self.anatomy.postfix_ids:
            raise TemplateError(
                "the generation prompt has no postfix tokens after the last user turn, but the template's "
                f"default prompt ends with {self.tokenizer.decode(self.anatomy.postfix_ids)!r}: the assistant "
                "header was labelled as part of the user content"
            )
        return chat

    def _label(self, messages: Sequence[Message], add_generation_prompt: bool) -> tuple[TokenizedChat, int | None]:
        """Label the tokens; also return the generation prompt's postfix length (None without one)."""
        roles = [m["role"] for m in messages]
        if "user" not in roles:
            raise TemplateError(f"cannot split a chat without a user turn (roles: {roles})")
        ids = self.render_ids(messages, add_generation_prompt)
        spans = ["other"] * len(ids)
        content: list[tuple[str, int, int]] = []
        for i, m in enumerate(messages):
            if m["role"] not in ("system", "user", "assistant"):
                continue
            span = self._content_span(messages, i, ids, add_generation_prompt)
            if span is None and m["role"] == "system":
                raise TemplateError(
                    f"the chat template drops system message {i}: its content does not appear in the render; "
                    "drop system messages (drop_system: true) or use a template that renders them"
                )
            if span is None or (span[0] == span[1] and m["content"].strip()):
                raise TemplateError(f"the chat template drops the content of message {i} ({m['role']})")
            if m["role"] != "system":
                content.append((m["role"], *span))
        first_user = next(s for role, s, _ in content if role == "user")
        for t in range(first_user):
            spans[t] = "prefix"
        generation_postfix = None
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
                if self.postfix_exclude is not None:
                    self._exclude_tail(ids, spans, end, stop, required=nxt is None)
                if nxt is None:
                    generation_postfix = spans[end:stop].count("postfix")
        return TokenizedChat(input_ids=ids, spans=spans), generation_postfix

    def _exclude_tail(self, ids: list[int], spans: list[str], start: int, stop: int, required: bool) -> None:
        """Relabel the postfix tokens at the end of ``[start, stop)`` that spell ``postfix_exclude`` as ``other``."""
        for k in range(1, stop - start + 1):
            text = self.tokenizer.decode(ids[stop - k : stop])
            if text == self.postfix_exclude:
                spans[stop - k : stop] = ["other"] * k
                return
            if len(text) > len(self.postfix_exclude):
                break
        if required:
            raise TemplateError(
                f"postfix_exclude {self.postfix_exclude!r} does not end the generation prompt's postfix "
                f"{self.tokenizer.decode(ids[start:stop])!r}"
            )

    @property
    def anatomy(self) -> TemplateAnatomy:
        """Prefix and postfix tokens of the default single-turn prompt, computed once and cached.

        Raises:
            TemplateError: If the template has a generation prompt but the probe prompt gets no postfix, or
                the probe query gets no tokens: every span-based method would silently read the wrong tokens.
        """
        if self._anatomy is None:
            probe = [{"role": "user", "content": self.phrases()[0]}]
            chat, _ = self._label(probe, add_generation_prompt=True)
            prefix = tuple(t for t, s in zip(chat.input_ids, chat.spans, strict=True) if s == "prefix")
            postfix = tuple(t for t, s in zip(chat.input_ids, chat.spans, strict=True) if s == "postfix")
            if "query" not in chat.spans:
                raise TemplateError(f"the probe query {probe[0]['content']!r} got no tokens in the template")
            if not postfix and chat.input_ids != self.render_ids(probe, add_generation_prompt=False):
                raise TemplateError(
                    "the template has a generation prompt but its default prompt got an empty postfix: the tokens "
                    f"after the user content ({self.tokenizer.decode(chat.input_ids)!r}) were labelled as query"
                )
            self._anatomy = TemplateAnatomy(prefix_ids=prefix, postfix_ids=postfix)
        return self._anatomy
