"""Conversations to token ids with the layout's chat template, and the assistant-only loss mask.

The template (ARCHITECTURE decision 7) uses the layout's own role tokens:

    <|bos|> <|system|> ... <|end_of_turn|> <|user|> ... <|end_of_turn|> <|assistant|> ... <|end_of_turn|>

Loss falls on assistant content and its `<|end_of_turn|>` (so the model learns to stop), never
on role tokens or other turns. Text is encoded with special-token parsing off, so text a user
types cannot forge a role or span token. An imported instruct model's own Jinja template is
used only when asked for (`template="hf"`, the CLI's `--chat-template hf`); it carries text only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from mmllm.errors import LayoutError
from mmllm.vocab import END_OF_TURN, VocabLayout

Message = Mapping[str, Any]


@dataclass
class EncodedConversation:
    input_ids: list[int]
    loss_mask: list[bool]  # True where the token is a target (assistant turns only)


def encode_conversation(
    messages: Sequence[Message],
    layout: VocabLayout,
    text_tokenizer,
    add_generation_prompt: bool = False,
    template: Literal["mmllm", "hf"] = "mmllm",
) -> EncodedConversation:
    """Token ids and loss mask of a conversation.

    Each message is `{"role": "system"|"user"|"assistant", "content": str | list[part]}`; a part
    is `{"type": "text", "text": ...}` or `{"type": MODALITY, "codes": array}` for media already
    encoded by its modality tokenizer.
    """
    if not messages:
        raise LayoutError("a conversation needs at least one message")
    if template == "hf":
        return _encode_with_hf_template(messages, text_tokenizer, add_generation_prompt)
    if template != "mmllm":
        raise LayoutError(f"chat template '{template}' is not one of: mmllm, hf")
    ids = [layout.token_id("<|bos|>")]
    mask = [False]
    end_of_turn = layout.token_id(END_OF_TURN)
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise LayoutError(f"message {i}: unknown role {role!r} (roles: system, user, assistant)")
        body = content_ids(message.get("content", ""), layout, text_tokenizer, where=f"message {i}")
        target = role == "assistant"
        ids += [layout.role_id(role), *body, end_of_turn]
        mask += [False] + [target] * (len(body) + 1)
    if add_generation_prompt:
        ids.append(layout.role_id("assistant"))
        mask.append(False)
    return EncodedConversation(ids, mask)


def content_ids(
    content: str | Sequence[Mapping[str, Any]], layout: VocabLayout, text_tokenizer, where: str
) -> list[int]:
    """Ids of one message's content: text runs and media spans in order."""
    if isinstance(content, str):
        return encode_text(content, text_tokenizer)
    ids: list[int] = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind == "text":
            ids += encode_text(part.get("text", ""), text_tokenizer)
        elif kind in layout.modalities:
            if "codes" not in part:
                raise LayoutError(f"{where}, part {j}: a {kind} part needs its codes (run its tokenizer first)")
            ids += layout.span_ids(kind, part["codes"])
        else:
            raise LayoutError(f"{where}, part {j}: unknown part type {kind!r}")
    return ids


def encode_text(text: str, text_tokenizer) -> list[int]:
    if text_tokenizer is None:
        raise LayoutError("this model has no text tokenizer; give one (--text-tokenizer DIR)")
    if not text:
        return []
    return list(text_tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def _encode_with_hf_template(
    messages: Sequence[Message], text_tokenizer, add_generation_prompt: bool
) -> EncodedConversation:
    """Render with the tokenizer's Jinja template; assistant tokens found by prefix differences."""
    if text_tokenizer is None or not getattr(text_tokenizer, "chat_template", None):
        raise LayoutError("--chat-template hf needs a text tokenizer that has a chat_template")
    plain = []
    for i, message in enumerate(messages):
        if not isinstance(message.get("content", ""), str):
            raise LayoutError(f"message {i}: the hf chat template carries text only")
        plain.append({"role": message["role"], "content": message.get("content", "")})

    def render(conversation: list[dict[str, str]], prompt: bool) -> list[int]:
        text = text_tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=prompt)
        return list(text_tokenizer(text, add_special_tokens=False)["input_ids"])

    ids = render(plain, add_generation_prompt)
    mask = [False] * len(ids)
    for i, message in enumerate(plain):
        if message["role"] != "assistant":
            continue
        before, through = render(plain[:i], True), render(plain[: i + 1], False)
        if through[: len(before)] != before or ids[: len(through)] != through:
            raise LayoutError("the hf chat template is not prefix-stable; cannot locate assistant turns")
        mask[len(before) : len(through)] = [True] * (len(through) - len(before))
    return EncodedConversation(ids, mask)
