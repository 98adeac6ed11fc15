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
from dataclasses import dataclass, field
from typing import Any, Literal

from mmllm.errors import LayoutError
from mmllm.vocab import END_OF_TURN, VocabLayout

Message = Mapping[str, Any]


SPECIAL = "special"  # `EncodedConversation.parts` entry of template tokens (bos, roles, end of turn)


@dataclass
class EncodedConversation:
    input_ids: list[int]
    loss_mask: list[bool]  # True where the token is a target (assistant turns only)
    # Per token, filled by the mmllm template (the hf template carries text only, leaving them empty):
    parts: list[str] = field(default_factory=list)  # SPECIAL, "text", or the media span's modality
    roles: list[str] = field(default_factory=list)  # the role of its message ("" for <|bos|>)

    def append(self, ids: list[int], target: bool, part: str, role: str) -> None:
        self.input_ids += ids
        self.loss_mask += [target] * len(ids)
        self.parts += [part] * len(ids)
        self.roles += [role] * len(ids)


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
    out = EncodedConversation([layout.token_id("<|bos|>")], [False], [SPECIAL], [""])
    end_of_turn = layout.token_id(END_OF_TURN)
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise LayoutError(f"message {i}: unknown role {role!r} (roles: system, user, assistant)")
        target = role == "assistant"
        out.append([layout.role_id(role)], False, SPECIAL, role)
        for kind, ids in content_segments(message.get("content", ""), layout, text_tokenizer, where=f"message {i}"):
            out.append(ids, target, kind, role)
        out.append([end_of_turn], target, SPECIAL, role)
    if add_generation_prompt:
        out.append([layout.role_id("assistant")], False, SPECIAL, "assistant")
    return out


def encode_document(
    content: str | Sequence[Mapping[str, Any]], layout: VocabLayout, text_tokenizer
) -> EncodedConversation:
    """Token ids of a plain (non-chat) document: `<|bos|> content <|eos|>`, every token after
    `<|bos|>` a target. Its tokens carry the role "document"."""
    out = EncodedConversation([layout.token_id("<|bos|>")], [False], [SPECIAL], [""])
    for kind, ids in content_segments(content, layout, text_tokenizer, where="document"):
        out.append(ids, True, kind, "document")
    out.append([layout.token_id("<|eos|>")], True, SPECIAL, "document")
    return out


def content_segments(
    content: str | Sequence[Mapping[str, Any]], layout: VocabLayout, text_tokenizer, where: str
) -> list[tuple[str, list[int]]]:
    """(kind, ids) of one message's parts in order: "text" runs and media spans (kind = modality)."""
    if isinstance(content, str):
        return [("text", encode_text(content, text_tokenizer))]
    segments = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind == "text":
            segments.append(("text", encode_text(part.get("text", ""), text_tokenizer)))
        elif kind in layout.modalities:
            if "codes" not in part:
                raise LayoutError(f"{where}, part {j}: a {kind} part needs its codes (run its tokenizer first)")
            segments.append((kind, layout.span_ids(kind, part["codes"])))
        else:
            raise LayoutError(f"{where}, part {j}: unknown part type {kind!r}")
    return segments


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
