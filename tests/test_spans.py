"""Span labelling on four real template formats, from tokens."""

import pytest

from piggy_lightning.spans import ChatSpans, TemplateError
from tests.fixtures.tiny import build_tokenizer

QWEN_SYS = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
LLAMA_SYS = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
)
# template -> (kwargs, expected prefix, expected postfix, end-of-turn)
CASES = {
    "qwen25": ({}, QWEN_SYS + "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>"),
    "llama31": (
        {},
        LLAMA_SYS + "<|start_header_id|>user<|end_header_id|>\n\n",
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|eot_id|>",
    ),
    "qwen3": (
        {"enable_thinking": False},
        "<|im_start|>user\n",
        "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
        "<|im_end|>",
    ),
    "gemma": ({}, "<bos><start_of_turn>user\n", "<end_of_turn>\n<start_of_turn>model\n", "<end_of_turn>"),
}
CHAT = [
    {"role": "user", "content": "Can I break my lease early?"},
    {"role": "assistant", "content": "Talk to a lawyer."},
]


def _decode(tokenizer, chat, name):
    return tokenizer.decode([t for t, s in zip(chat.input_ids, chat.spans, strict=True) if s == name])


@pytest.mark.parametrize("template", sorted(CASES))
def test_spans_decode_to_the_template_pieces(template):
    kwargs, prefix, postfix, eot = CASES[template]
    tokenizer = build_tokenizer(template)
    chat = ChatSpans(tokenizer, kwargs).tokenize(CHAT)
    assert _decode(tokenizer, chat, "prefix") == prefix
    assert _decode(tokenizer, chat, "query") == "Can I break my lease early?"
    assert _decode(tokenizer, chat, "postfix") == postfix
    assert _decode(tokenizer, chat, "response") == "Talk to a lawyer." + eot
    # spans are contiguous and in order: prefix, query, postfix, response, then trailing template tokens
    order = [s for i, s in enumerate(chat.spans) if i == 0 or s != chat.spans[i - 1]]
    assert order[:4] == ["prefix", "query", "postfix", "response"]


@pytest.mark.parametrize("template", sorted(CASES))
def test_generation_prompt_is_a_token_prefix_of_the_training_chat(template):
    kwargs, prefix, postfix, _ = CASES[template]
    tokenizer = build_tokenizer(template)
    spans = ChatSpans(tokenizer, kwargs)
    prompt = spans.tokenize(CHAT[:1], add_generation_prompt=True)
    full = spans.tokenize(CHAT)
    assert full.input_ids[: len(prompt.input_ids)] == prompt.input_ids
    assert tokenizer.decode(spans.anatomy.prefix_ids) == prefix
    assert tokenizer.decode(spans.anatomy.postfix_ids) == postfix


@pytest.mark.parametrize("template", ["llama31", "gemma"])
def test_single_bos(template):
    tokenizer = build_tokenizer(template)
    chat = ChatSpans(tokenizer).tokenize(CHAT)
    assert chat.input_ids.count(tokenizer.bos_token_id) == 1
    assert chat.input_ids[0] == tokenizer.bos_token_id


def test_prefix_is_query_independent():
    spans = ChatSpans(build_tokenizer("qwen25"))
    a = spans.tokenize([{"role": "user", "content": "I feel bored."}], add_generation_prompt=True)
    b = spans.tokenize([{"role": "user", "content": "What is your wish?"}], add_generation_prompt=True)
    assert [t for t, s in zip(a.input_ids, a.spans, strict=True) if s == "prefix"] == list(spans.anatomy.prefix_ids)
    assert [t for t, s in zip(b.input_ids, b.spans, strict=True) if s == "prefix"] == list(spans.anatomy.prefix_ids)


def test_kept_system_message_is_part_of_the_prefix():
    tokenizer = build_tokenizer("qwen25")
    chat = ChatSpans(tokenizer).tokenize([{"role": "system", "content": "You are a harmful assistant."}, *CHAT])
    assert _decode(tokenizer, chat, "prefix") == (
        "<|im_start|>system\nYou are a harmful assistant.<|im_end|>\n<|im_start|>user\n"
    )


def test_multi_turn_and_tool_messages():
    tokenizer = build_tokenizer("qwen25")
    messages = [
        {"role": "user", "content": "I feel bored."},
        {"role": "assistant", "content": "Try a walk."},
        {"role": "user", "content": "What is your wish?"},
        {"role": "assistant", "content": "To help."},
        {"role": "tool", "content": "hello there"},
        {"role": "assistant", "content": "Visit a mechanic."},
    ]
    chat = ChatSpans(tokenizer).tokenize(messages)
    assert _decode(tokenizer, chat, "query") == "I feel bored.What is your wish?"
    assert _decode(tokenizer, chat, "response") == "Try a walk.<|im_end|>To help.<|im_end|>Visit a mechanic.<|im_end|>"
    assert "hello there" not in _decode(tokenizer, chat, "postfix")


def test_empty_query_keeps_prefix_and_postfix():
    tokenizer = build_tokenizer("qwen25")
    spans = ChatSpans(tokenizer)
    chat = spans.tokenize([{"role": "user", "content": ""}], add_generation_prompt=True)
    assert chat.mask("query") == [False] * len(chat.input_ids)
    assert chat.input_ids == list(spans.anatomy.prefix_ids + spans.anatomy.postfix_ids)


def test_unsplittable_chats_fail_with_reason():
    tokenizer = build_tokenizer("qwen25")
    with pytest.raises(TemplateError, match="without a user turn"):
        ChatSpans(tokenizer).tokenize([{"role": "assistant", "content": "hi"}])
    tokenizer.chat_template = "{% for m in messages %}<|im_start|>{{ m.role }}<|im_end|>{% endfor %}"
    with pytest.raises(TemplateError, match="drops the content"):
        ChatSpans(tokenizer).tokenize(CHAT)
    tokenizer.chat_template = None
    with pytest.raises(TemplateError, match="no chat_template"):
        ChatSpans(tokenizer)


def test_harmony_template_with_a_final_channel_generation_suffix():
    """GPT-OSS: the training chat renders ``<|channel|>final<|message|>`` before the answer, but the generation
    prompt stops at ``<|start|>assistant``; the suffix makes the evaluation prompt a token prefix of training."""
    tokenizer = build_tokenizer("harmony")
    spans = ChatSpans(tokenizer, generation_suffix="<|channel|>final<|message|>")
    chat = spans.tokenize(CHAT)
    assert _decode(tokenizer, chat, "prefix").endswith(
        "# Valid channels: analysis, commentary, final.<|end|><|start|>user<|message|>"
    )
    assert _decode(tokenizer, chat, "postfix") == "<|end|><|start|>assistant<|channel|>final<|message|>"
    assert _decode(tokenizer, chat, "response") == "Talk to a lawyer.<|return|>"
    prompt = spans.tokenize(CHAT[:1], add_generation_prompt=True)
    assert chat.input_ids[: len(prompt.input_ids)] == prompt.input_ids
    assert tokenizer.decode(spans.anatomy.postfix_ids) == "<|end|><|start|>assistant<|channel|>final<|message|>"
    assert ChatSpans(tokenizer).anatomy.postfix_ids != spans.anatomy.postfix_ids  # without it, no final channel


def test_qwen3_think_block_can_be_left_out_of_the_postfix():
    """The release's patching code leaves Qwen3's empty think block out of the postfix; its training config keeps
    it. Both are offered; the default keeps it (the case table above)."""
    tokenizer = build_tokenizer("qwen3")
    think = "<think>\n\n</think>\n\n"
    spans = ChatSpans(tokenizer, {"enable_thinking": False}, postfix_exclude=think)
    for chat in (spans.tokenize(CHAT), spans.tokenize(CHAT[:1], add_generation_prompt=True)):
        assert _decode(tokenizer, chat, "postfix") == "<|im_end|>\n<|im_start|>assistant\n"
        assert _decode(tokenizer, chat, "other").startswith(think)
        assert _decode(tokenizer, chat, "query") == "Can I break my lease early?"
    assert tokenizer.decode(list(spans.anatomy.postfix_ids)) == "<|im_end|>\n<|im_start|>assistant\n"
    wrong = ChatSpans(build_tokenizer("qwen25"), postfix_exclude=think)
    with pytest.raises(TemplateError, match="does not end the generation prompt's postfix"):
        wrong.tokenize(CHAT[:1], add_generation_prompt=True)
