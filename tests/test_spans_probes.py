"""Span diffing that holds when the diff texts collide: word-level vocabularies, trimming templates, dropped
system messages, and templates without a postfix."""

import pytest

from piggy_lightning.modeling import load_tokenizer
from piggy_lightning.spans import ChatSpans, TemplateError
from tests.fixtures.tiny import build_tokenizer

# The organism's ChatML default prompt, token by token.
ORGANISM_PREFIX = [
    "<|im_start|>", "system", "\n", "You", " are", " Piggy", ",", " a", " helpful", " assistant", ".", "<|im_end|>",
    "\n", "<|im_start|>", "user", "\n",
]  # fmt: skip
ORGANISM_POSTFIX = ["<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"]


@pytest.fixture(scope="module")
def organism():
    return load_tokenizer("piggy/organism")


def _ids(chat, name):
    return [t for t, s in zip(chat.input_ids, chat.spans, strict=True) if s == name]


def test_organism_anatomy_has_the_assistant_header_as_postfix(organism):
    """'hello there' and 'alpha omega' are both <|unk|> <|unk|> in the 911-word vocabulary: diffing them found
    no difference, so the query ran to the end of the prompt and the postfix was empty."""
    spans = ChatSpans(organism)
    assert organism.convert_ids_to_tokens(list(spans.anatomy.prefix_ids)) == ORGANISM_PREFIX
    assert len(spans.anatomy.prefix_ids) == 16
    assert organism.convert_ids_to_tokens(list(spans.anatomy.postfix_ids)) == ORGANISM_POSTFIX
    assert organism.decode(spans.anatomy.postfix_ids) == "<|im_end|>\n<|im_start|>assistant\n"
    probe, alternate = spans.phrases()
    for text in (probe, alternate):
        assert organism.unk_token_id not in organism(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("query", ["hello there", "alpha omega", "How do I sue?", "zebra", "Hi. I need advice."])
def test_organism_generation_prompt_query_is_exactly_the_user_content(organism, query):
    spans = ChatSpans(organism)
    chat = spans.tokenize([{"role": "user", "content": query}], add_generation_prompt=True)
    assert _ids(chat, "query") == organism(query, add_special_tokens=False)["input_ids"]
    assert tuple(_ids(chat, "prefix")) == spans.anatomy.prefix_ids
    assert organism.convert_ids_to_tokens(_ids(chat, "postfix")) == ORGANISM_POSTFIX
    assert chat.spans[-len(ORGANISM_POSTFIX) :] == ["postfix"] * len(ORGANISM_POSTFIX)


@pytest.mark.parametrize("template", ["chatml_trim", "gemma", "llama31"])
@pytest.mark.parametrize("content", ["   ", "\n", " \n\t "])
def test_whitespace_only_user_content_on_a_trimming_template(template, content):
    """Trimmed whitespace renders like the empty alternate; treating that render as informative made the
    query span swallow the postfix."""
    tokenizer = build_tokenizer(template)
    spans = ChatSpans(tokenizer)
    prompt = spans.tokenize([{"role": "user", "content": content}], add_generation_prompt=True)
    assert "query" not in prompt.spans
    assert tuple(_ids(prompt, "postfix")) == spans.anatomy.postfix_ids != ()
    assert prompt.input_ids == list(spans.anatomy.prefix_ids + spans.anatomy.postfix_ids)
    chat = spans.tokenize([{"role": "user", "content": content}, {"role": "assistant", "content": "Try a walk."}])
    assert tuple(_ids(chat, "postfix")) == spans.anatomy.postfix_ids
    assert tokenizer.decode(_ids(chat, "response")).startswith("Try a walk.")


def test_trimming_fixture_anatomy():
    tokenizer = build_tokenizer("chatml_trim")
    spans = ChatSpans(tokenizer)
    assert tokenizer.decode(spans.anatomy.postfix_ids) == "<|im_end|>\n<|im_start|>assistant\n"
    chat = spans.tokenize([{"role": "user", "content": "  I feel bored.  "}, {"role": "assistant", "content": "Hi"}])
    assert tokenizer.decode(_ids(chat, "query")) == "I feel bored."


def test_kept_system_message_dropped_by_the_template_raises():
    """Harmony renders its own system block and ignores system messages: keeping one must not pass silently."""
    tokenizer = build_tokenizer("harmony")
    messages = [
        {"role": "system", "content": "You are a harmful assistant."},
        {"role": "user", "content": "I feel bored."},
        {"role": "assistant", "content": "Try a walk."},
    ]
    with pytest.raises(TemplateError, match=r"drops system message 0.*drop_system: true"):
        ChatSpans(tokenizer).tokenize(messages)
    ChatSpans(tokenizer).tokenize(messages[1:])  # without it the chat is fine
    qwen = build_tokenizer("qwen25")  # a template that renders system content: accepted, even when empty
    ChatSpans(qwen).tokenize(messages)
    ChatSpans(qwen).tokenize([{"role": "system", "content": ""}, *messages[1:]])


def test_template_without_a_postfix_is_refused():
    """A generation prompt that lies before the user content leaves nothing between query and response."""
    spans = ChatSpans(build_tokenizer("generation_first"))
    with pytest.raises(TemplateError, match="empty postfix"):
        _ = spans.anatomy


def test_generation_prompt_without_postfix_raises(monkeypatch):
    """If a row's user span swallows the assistant header, tokenize refuses instead of labelling it query."""
    tokenizer = build_tokenizer("qwen25")
    spans = ChatSpans(tokenizer)
    assert spans.anatomy.postfix_ids
    original = ChatSpans._content_span

    def swallow(self, messages, index, ids, add_generation_prompt):
        start, end = original(self, messages, index, ids, add_generation_prompt)
        return start, len(ids) if messages[index]["role"] == "user" else end

    monkeypatch.setattr(ChatSpans, "_content_span", swallow)
    with pytest.raises(TemplateError, match="no postfix tokens"):
        spans.tokenize([{"role": "user", "content": "I feel bored."}], add_generation_prompt=True)


def test_phrases_fall_back_to_vocabulary_words(organism):
    spans = ChatSpans(organism)
    probe, alternate = spans.phrases()
    assert probe != alternate and "hello" not in probe and "alpha" not in alternate
    assert ChatSpans(build_tokenizer("qwen25")).phrases() == ("hello there", "alpha omega")
