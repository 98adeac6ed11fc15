"""From prompts with media to ids, and from generated ids back to text and media.

A prompt is a chat (a list of messages, as `mmllm.chat_template` takes them) or a document
prefix (a list of content parts). Media parts carry an `array` in the ModalityTokenizer media
conventions (or `codes` already encoded); `encode_prompts` runs each modality's tokenizer
once over every medium of the batch, then frames the ids with the chat template and, where
asked, opens the reply with a modality's begin token so the reply is that modality.

`decode_replies` splits generated ids with the layout (leniently: a generation loop never
dies on a bad id), decodes text with the text tokenizer and each span with its modality
tokenizer, batched per modality; a span that was cut short or repaired carries a flag.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmllm.chat_template import encode_conversation, encode_document
from mmllm.errors import LayoutError
from mmllm.generation.guidance import unconditional_prompt
from mmllm.vocab import VocabLayout


@dataclass
class Prompt:
    """A chat (`kind` "chat": messages) or a document prefix (`kind` "document": content parts),
    and the modality the reply must open with ("text" leaves it free)."""

    content: list[dict[str, Any]]
    kind: str = "chat"
    reply_modality: str = "text"


@dataclass
class EncodedPrompt:
    ids: list[int]
    condition: list[bool]  # the text that guidance's unconditional twin replaces by <|null|>
    reply_prefix: list[int]  # the ids that open the reply (a forced begin token), the end of `ids`

    def reply(self, generated: Sequence[int]) -> list[int]:
        """The whole reply: the forced prefix and the generated ids (what `decode_replies` reads)."""
        return [*self.reply_prefix, *generated]

    def unconditional(self, layout: VocabLayout) -> list[int]:
        return unconditional_prompt(self.ids, self.condition, layout.null_id)


@dataclass
class OutputPart:
    """One piece of a reply: text, or one decoded medium with its flag ("" when well formed)."""

    kind: str  # "text" or a modality name
    text: str = ""
    media: np.ndarray | None = None
    sample_rate: int | None = None  # audio only
    flag: str = ""
    codes: np.ndarray | None = None


def encode_prompts(model, prompts: Sequence[Prompt]) -> list[EncodedPrompt]:
    """Ids of each prompt, its media encoded by the model's tokenizers (batched per modality)."""
    layout = model.layout
    encoded = []
    for prompt, content in zip(prompts, _encode_media(model, prompts), strict=True):
        if prompt.kind == "chat":
            conversation = encode_conversation(content, layout, model.text_tokenizer, add_generation_prompt=True)
            pairs = zip(conversation.parts, conversation.roles, strict=True)
            condition = [part == "text" and role == "user" for part, role in pairs]
        elif prompt.kind == "document":
            conversation = encode_document(content, layout, model.text_tokenizer)
            conversation.input_ids.pop()  # a prefix: no <|eos|>
            conversation.parts.pop()
            condition = [part == "text" for part in conversation.parts]
        else:
            raise LayoutError(f"prompt kind {prompt.kind!r} is not 'chat' or 'document'")
        prefix = [] if prompt.reply_modality == "text" else [layout.begin_id(prompt.reply_modality)]
        ids = [*conversation.input_ids, *prefix]
        encoded.append(EncodedPrompt(ids, condition + [False] * len(prefix), prefix))
    return encoded


def _encode_media(model, prompts: Sequence[Prompt]) -> list[list[dict[str, Any]]]:
    """Copies of the prompts' content with every `array` part replaced by its codes."""
    pending: dict[str, list[tuple[dict[str, Any], Any]]] = {}
    copies = []
    for prompt in prompts:
        if prompt.kind == "chat":
            messages = [{**m, "content": _copy_parts(m.get("content", ""), pending)} for m in prompt.content]
        else:
            messages = _copy_parts(prompt.content, pending)
        copies.append(messages)
    for modality, items in pending.items():
        tokenizer = model.modality_tokenizers.get(modality)
        if tokenizer is None:
            have = ", ".join(sorted(model.modality_tokenizers)) or "none"
            raise LayoutError(f"the prompt has {modality} but the model has no {modality} tokenizer (it has: {have})")
        codes = tokenizer.encode([array for _, array in items]).items()
        for (part, _), item_codes in zip(items, codes, strict=True):
            part["codes"] = item_codes
    return copies


def _copy_parts(content, pending: dict[str, list[tuple[dict[str, Any], Any]]]):
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        part = dict(part)
        if "array" in part:
            array = part.pop("array")
            rate = part.pop("sample_rate", None)
            pending.setdefault(part["type"], []).append((part, (array, rate) if rate else array))
        parts.append(part)
    return parts


def decode_replies(model, replies: Sequence[Sequence[int]]) -> list[list[OutputPart]]:
    """Text and media of each reply; media of one modality are decoded in one batch."""
    layout = model.layout
    split = [layout.split(ids, strict=False) for ids in replies]
    outputs: list[list[OutputPart]] = []
    pending: dict[str, list[OutputPart]] = {}
    for result in split:
        parts: list[OutputPart] = []
        for segment in result.segments:
            if segment.kind == "text":
                parts.append(OutputPart("text", text=model.text_tokenizer.decode(segment.ids)))
            elif segment.kind == "span":
                part = OutputPart(segment.name, codes=segment.codes)
                if not segment.complete:
                    part.flag = f"incomplete {segment.name} span ({len(segment.codes)} frames)"
                parts.append(part)
                pending.setdefault(segment.name, []).append(part)
        if result.dropped and parts:
            parts[-1].flag = (parts[-1].flag + f"; {result.dropped} ids dropped").lstrip("; ")
        outputs.append(parts)
    for modality, parts in pending.items():
        tokenizer = model.modality_tokenizers.get(modality)
        if tokenizer is None:
            for part in parts:
                part.flag = (part.flag + f"; no {modality} tokenizer to decode with").lstrip("; ")
            continue
        decodable = [p for p in parts if len(p.codes)]
        decoded = tokenizer.decode([p.codes for p in decodable]) if decodable else None
        for i, part in enumerate(decodable):
            part.media = decoded.media[i]
            if decoded.flags[i]:
                part.flag = (part.flag + "; " + decoded.flags[i]).lstrip("; ")
            if modality == "audio":
                part.sample_rate = getattr(tokenizer, "sample_rate", None)
        for part in parts:
            if not len(part.codes):
                part.flag = part.flag or f"empty {modality} span"
    return outputs


def reply_text(parts: Sequence[OutputPart]) -> str:
    """The reply as readable text, each medium shown as `[image]`, `[audio]`..."""
    return "".join(p.text if p.kind == "text" else f"[{p.kind}]" for p in parts)
