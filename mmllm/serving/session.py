"""A multi-turn chat with media in and out: the state behind `mmllm chat`.

The session keeps the conversation as messages whose media are codes (each attached or
generated medium is encoded once), so every turn re-reads the whole history, images the
model drew included. The user's words choose the reply's modality ("draw ...", "say ...",
see `intent.py`); the reply is generated with the session's settings, streamed through a
token callback, decoded, and its media saved as files (PNG / WAV / GIF / JSON).

Settings change with `set("temperature=0.7")`, `set("image.top_k=100")`,
`set("guidance.image=3")`, `set("max_new_tokens=256")` or `set("seed=1")`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmllm.errors import ConfigError, LayoutError
from mmllm.generation import GenerationConfig, Generator, Guidance, OutputPart, Prompt, decode_replies, encode_prompts
from mmllm.generation.generator import TokenCallback
from mmllm.generation.guidance import GUIDED_MODALITIES
from mmllm.generation.media_files import save_reply_media
from mmllm.generation.sampling import SamplingParams
from mmllm.serving.intent import reply_modality

SAMPLING_KEYS = tuple(f.name for f in dataclasses.fields(SamplingParams))


@dataclass
class ChatSettings:
    max_new_tokens: int = 512
    default: SamplingParams = field(default_factory=SamplingParams)  # greedy
    sampling: dict[str, SamplingParams] = field(default_factory=dict)  # per modality
    guidance: dict[str, float] = field(default_factory=dict)
    seed: int | None = 0


@dataclass
class ChatReply:
    parts: list[OutputPart]
    files: list[Path]  # the saved media, in the order of the reply's media parts
    modality: str  # what the reply was asked to be
    finish_reason: str


class ChatSession:
    def __init__(self, model, media_dir: Path, settings: ChatSettings | None = None) -> None:
        self.model = model
        self.generator = Generator(model)
        self.media_dir = Path(media_dir)
        self.settings = settings or ChatSettings()
        self.history: list[dict[str, Any]] = []
        self.transcript: list[dict[str, Any]] = []  # the same turns, media as file paths (for /save)
        self.pending: list[tuple[dict[str, Any], str]] = []  # attached media parts and where they came from

    # ------------------------------------------------------------ turns

    def attach(self, modality: str, array: np.ndarray, source: str) -> None:
        """Encode a medium now; it joins the next user message."""
        tokenizer = self.model.modality_tokenizers.get(modality)
        if tokenizer is None:
            have = ", ".join(sorted(self.model.modality_tokenizers)) or "none"
            raise LayoutError(f"this model has no {modality} tokenizer (it has: {have})")
        codes = tokenizer.encode([array]).items()[0]
        self.pending.append(({"type": modality, "codes": codes}, source))

    def ask(self, text: str, on_token: TokenCallback | None = None) -> ChatReply:
        """Add a user turn (the attached media, then `text`) and generate the reply."""
        content = [part for part, _ in self.pending] + [{"type": "text", "text": text}]
        messages = [*self.history, {"role": "user", "content": content}]
        modality = reply_modality(text, self.generator.generatable)
        (prompt,) = encode_prompts(self.model, [Prompt(messages, "chat", modality)])
        scales = {m: s for m, s in self.settings.guidance.items() if m == modality}
        budget = self.settings.max_new_tokens
        if modality != "text":  # a medium is never cut short: its whole span, then the end token
            budget = max(budget, self.model.layout.modality(modality).max_length + 1)
        config = GenerationConfig(
            max_new_tokens=budget,
            default=self.settings.default,
            sampling=self.settings.sampling,
            guidance=Guidance(scales),
            stop_after_span=modality != "text",
            seed=self.settings.seed,
        )
        uncond = [prompt.unconditional(self.model.layout)] if scales else None
        if on_token is not None:
            for token in prompt.reply_prefix:  # the forced begin token is part of the reply
                on_token(0, token)
        (output,) = self.generator.generate([prompt.ids], config, uncond, on_token)
        (parts,) = decode_replies(self.model, [prompt.reply(output.ids)])
        turn = len(self.transcript) // 2
        files = save_reply_media(parts, self.media_dir, f"turn-{turn:03d}")
        self._remember(content, parts, files)
        return ChatReply(parts, files, modality, output.finish_reason)

    def _remember(self, content: list[dict[str, Any]], parts: list[OutputPart], files: list[Path]) -> None:
        reply: list[dict[str, Any]] = []
        for part in parts:
            if part.kind == "text":
                reply.append({"type": "text", "text": part.text})
            elif part.codes is not None and len(part.codes) and not part.flag.startswith("incomplete"):
                reply.append({"type": part.kind, "codes": part.codes})
        self.history += [{"role": "user", "content": content}, {"role": "assistant", "content": reply}]
        sources = iter(source for _, source in self.pending)
        user = [p if p["type"] == "text" else {"type": p["type"], "source": next(sources)} for p in content]
        saved = iter(files)
        said = [
            {"type": "text", "text": p.text} if p.kind == "text" else {"type": p.kind, "file": str(next(saved))}
            for p in parts
            if p.kind == "text" or p.media is not None
        ]
        self.transcript += [{"role": "user", "content": user}, {"role": "assistant", "content": said}]
        self.pending = []

    # ------------------------------------------------------------ commands

    def reset(self) -> None:
        self.history, self.transcript, self.pending = [], [], []

    def save(self, path: Path) -> None:
        """The transcript as JSON: text, attached media by source, generated media by file."""
        Path(path).write_text(json.dumps({"messages": self.transcript}, indent=2) + "\n", encoding="utf-8")

    def set(self, assignment: str) -> str:
        """Apply `key=value`; returns a one-line description of the new setting."""
        key, sep, value = assignment.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ConfigError(f"/set {assignment!r}: expected key=value, e.g. temperature=0.7")
        scope, dot, name = key.rpartition(".")
        try:
            if key == "max_new_tokens":
                self.settings.max_new_tokens = _positive(int(value), key)
            elif key == "seed":
                self.settings.seed = None if value.lower() == "none" else int(value)
            elif scope == "guidance" and name in GUIDED_MODALITIES:
                self.settings.guidance[name] = float(value)
                Guidance(self.settings.guidance)  # validates the scale
            elif name in SAMPLING_KEYS and (not dot or scope in ("text", *self.model.layout.modalities)):
                base = self.settings.sampling.get(scope, self.settings.default) if dot else self.settings.default
                number = int(value) if name == "top_k" else float(value)
                updated = dataclasses.replace(base, **{name: number})
                if dot:
                    self.settings.sampling[scope] = updated
                else:
                    self.settings.default = updated
            else:
                raise ConfigError(
                    f"/set: unknown setting {key!r} (max_new_tokens, seed, guidance.MODALITY, "
                    f"[MODALITY.]{'|'.join(SAMPLING_KEYS)})"
                )
        except ValueError:
            raise ConfigError(f"/set {key}: {value!r} is not a valid value") from None
        return f"{key} = {value}"


def _positive(value: int, key: str) -> int:
    if value < 1:
        raise ConfigError(f"/set {key}: must be >= 1, got {value}")
    return value
