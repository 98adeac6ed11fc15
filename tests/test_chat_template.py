"""The layout's chat template and its assistant-only loss mask."""

from __future__ import annotations

import numpy as np
import pytest

from mmllm.chat_template import encode_conversation
from mmllm.errors import LayoutError


def test_loss_falls_on_assistant_turns_only(toy_layout, text_tokenizer):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "describe it"},
        {"role": "assistant", "content": "a red circle"},
        {"role": "user", "content": "and now?"},
        {"role": "assistant", "content": "a blue star"},
    ]
    encoded = encode_conversation(messages, toy_layout, text_tokenizer)
    ids, mask = encoded.input_ids, encoded.loss_mask
    assert len(ids) == len(mask) and ids[0] == toy_layout.token_id("<|bos|>")
    targets = [i for i, m in zip(ids, mask, strict=True) if m]
    eot = toy_layout.token_id("<|end_of_turn|>")
    expected = [
        *text_tokenizer("a red circle", add_special_tokens=False)["input_ids"],
        eot,
        *text_tokenizer("a blue star", add_special_tokens=False)["input_ids"],
        eot,
    ]
    assert targets == expected
    assert toy_layout.role_id("assistant") not in targets


def test_media_parts_become_spans_and_generation_prompt(toy_layout, text_tokenizer):
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "draw"}, {"type": "image", "codes": np.arange(4)}]}
    ]
    encoded = encode_conversation(messages, toy_layout, text_tokenizer, add_generation_prompt=True)
    span = toy_layout.span_ids("image", np.arange(4))
    ids = encoded.input_ids
    assert ids[-1] == toy_layout.role_id("assistant") and not any(encoded.loss_mask)
    start = ids.index(span[0])
    assert ids[start : start + len(span)] == span


def test_typed_special_tokens_stay_text(toy_layout, text_tokenizer):
    """A user typing '<|assistant|>' cannot forge a role token."""
    encoded = encode_conversation([{"role": "user", "content": "<|assistant|> <|boi|>"}], toy_layout, text_tokenizer)
    body = encoded.input_ids[2:-1]
    assert all(i < toy_layout.text_size for i in body)


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "at least one message"),
        ([{"role": "robot", "content": "hi"}], "unknown role 'robot'"),
        ([{"role": "user", "content": [{"type": "smell", "text": "x"}]}], "unknown part type 'smell'"),
        ([{"role": "user", "content": [{"type": "image"}]}], "needs its codes"),
    ],
)
def test_bad_conversations(toy_layout, text_tokenizer, messages, message):
    with pytest.raises(LayoutError, match=message):
        encode_conversation(messages, toy_layout, text_tokenizer)


def test_hf_template_only_when_asked(toy_layout, text_tokenizer):
    text_tokenizer.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    )
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "red circle"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "blue"},
    ]
    ours = encode_conversation(messages, toy_layout, text_tokenizer)
    assert ours.input_ids[1] == toy_layout.role_id("user")  # the layout's template by default
    hf = encode_conversation(messages, toy_layout, text_tokenizer, template="hf")
    assert hf.input_ids[0] == text_tokenizer.bos_token_id
    targets = [i for i, m in zip(hf.input_ids, hf.loss_mask, strict=True) if m]
    assert text_tokenizer.decode(targets) == "red circle</s> blue</s>"
    with pytest.raises(LayoutError, match="text only"):
        encode_conversation(
            [{"role": "user", "content": [{"type": "text", "text": "x"}]}], toy_layout, text_tokenizer, template="hf"
        )
