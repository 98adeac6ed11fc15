"""The evaluation task contract and the task registry.

A `Task` makes held-out `EvalItem`s (a prompt, the modality the reply must open with, and the
ground truth its scorer needs), scores one reply against one item, aggregates the per-sample
scores, and produces a "chance" reply (the majority answer or a random valid output) for the
reference row every report shows. The runner generates the replies; tasks never see a model.

Prompts carry media as arrays, in the conventions of `mmllm.data.media`:
{"type": "image", "array": uint8 (H, W, 3)}, {"type": "audio", "array": float32, "sample_rate": int},
{"type": "video", "array": uint8 (T, H, W, 3)}, {"type": "action", "array": float32 (steps, 2)},
and text as {"type": "text", "text": str}. A benchmark read from files (`mmllm.evaluation.benchmarks`) gives
each medium as its file, {"type": "image", "path": str}, or as a file's bytes, {"type": "image", "data": bytes,
"format": "jpg"}; `read_prompt_media` reads them when their batch is encoded, so a long run holds the pixels
of one batch at a time. Such a task `needs_data`: `with_data(PATH)` reads its files (`--data NAME=PATH`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmllm.data.media import DEFAULT_AUDIO_RATE, decode_media, read_media
from mmllm.errors import InputError
from mmllm.evaluation.metrics import mean_per_key
from mmllm.generation.prompts import OutputPart

MEDIA_MODALITIES = ("image", "audio", "video", "action")


@dataclass
class EvalItem:
    """One held-out prompt and the ground truth its scorer needs."""

    id: str
    prompt: list[dict]  # chat messages ("system"/"user"), or a document prefix's content parts
    prompt_kind: str  # "chat" | "document"
    reply_modality: str  # "text" or a media modality: the generator opens the reply with that span
    max_new_tokens: int
    meta: dict
    reference: str = ""  # the reference answer, or a description of the reference medium, for display


ReplyPart = OutputPart  # one decoded part of a generated reply, as the generator returns it


class Task:
    """Base class of evaluation tasks; subclasses set the attributes and override `items` and `score`."""

    name: str = ""
    description: str = ""
    kind: str = "generate"  # "generate": the runner generates replies; "perplexity": it scores text likelihood
    input_modalities: tuple[str, ...] = ()  # media the model must read (tokenizers needed to encode)
    output_modalities: tuple[str, ...] = ()  # media the model must write (tokenizers needed to decode)
    metric: str = "accuracy"
    higher_is_better: bool = True
    reasoning: bool = False  # a puzzle: answered in the eval's reasoning mode, its tokens per answer counted
    needs_data: bool = False  # a benchmark read from local files: the runner calls `with_data` before inference
    size: int | None = None  # rows of a benchmark whose files were read: scored in full unless --limit says less
    skipped: Sequence[str] = ()  # one line per malformed benchmark row left out, reported beside the metrics

    def items(self, n: int, seed: int) -> list[EvalItem]:
        raise NotImplementedError

    def with_data(self, path: Path) -> Task:
        """This task with its rows read from `path`; a one-line InputError for a missing file or a wrong layout."""
        raise InputError(f"task {self.name} reads no files")

    def score(self, item: EvalItem, reply: list[ReplyPart]) -> dict[str, float]:
        raise NotImplementedError

    def aggregate(self, scores: list[dict[str, float]]) -> dict[str, float]:
        """Mean of every key over the samples that have it, with the primary metric's standard error.
        The runner passes the scores in item order, so a task may group consecutive items."""
        return mean_per_key(scores, stderr_of=(self.metric,))

    def chance_reply(self, item: EvalItem, rng: random.Random) -> list[ReplyPart]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add `task` to the registry under its name (a second task of the same name replaces the first)."""
    if not task.name:
        raise InputError(f"register_task: {task!r} has no name")
    TASKS[task.name] = task
    return task


def _load_builtin_tasks() -> None:
    import mmllm.evaluation.benchmarks  # registers the standard benchmarks on import
    import mmllm.evaluation.reasoning  # noqa: F401  (registers the toy-world tasks, puzzles included, on import)


def get_task(name: str) -> Task:
    """The registered task `name`; an unknown name raises InputError listing the known ones."""
    _load_builtin_tasks()
    if name not in TASKS:
        raise InputError(f"unknown eval task {name!r} (tasks: {', '.join(TASKS)})")
    return TASKS[name]


def list_tasks() -> list[Task]:
    """Every registered task, in registration order."""
    _load_builtin_tasks()
    return list(TASKS.values())


# ---------------------------------------------------------------- reading replies and prompts


def reply_text(reply: list[ReplyPart]) -> str:
    """The reply's text parts joined by spaces (media parts left out)."""
    return " ".join(part.text for part in reply if part.kind == "text" and part.text).strip()


def reply_media(reply: list[ReplyPart], modality: str) -> ReplyPart | None:
    """The reply's first part of `modality` that holds a medium, or None."""
    return next((part for part in reply if part.kind == modality and part.media is not None), None)


def read_prompt_media(item: EvalItem) -> list[dict]:
    """The item's prompt with each medium given as a file ("path") or a file's bytes ("data") read into its "array"."""
    if item.prompt_kind == "document":
        return [_read_part(part, item.id) for part in item.prompt]
    messages = []
    for message in item.prompt:
        content = message.get("content", [])
        if isinstance(content, list):
            content = [_read_part(part, item.id) for part in content]
        messages.append({**message, "content": content})
    return messages


def _read_part(part: dict[str, Any], item_id: str) -> dict[str, Any]:
    kind = part["type"]
    if "path" in part:
        array = read_media(kind, part["path"])
    elif "data" in part:
        array = decode_media(kind, part["data"], part["format"], where=f"{item_id} ({kind})")
    else:
        return part
    return {"type": kind, "array": array, **({"sample_rate": DEFAULT_AUDIO_RATE} if kind == "audio" else {})}


def _describe_part(part: dict[str, Any]) -> str:
    kind = part.get("type", "?")
    if kind == "text":
        return str(part.get("text", ""))
    if "path" in part:
        return f"<{kind} {Path(part['path']).name}>"
    if "data" in part:
        return f"<{kind} {len(part['data'])} bytes>"
    array = part.get("array")
    shape = "x".join(str(d) for d in np.shape(array)) if array is not None else "?"
    return f"<{kind} {shape}>"


def prompt_text(item: EvalItem) -> str:
    """A readable one-line rendering of the prompt: text verbatim, media as '<image 64x64x3>'."""
    if item.prompt_kind == "document":
        return " ".join(_describe_part(part) for part in item.prompt)
    lines = []
    for message in item.prompt:
        content = message.get("content", [])
        body = content if isinstance(content, str) else " ".join(_describe_part(part) for part in content)
        lines.append(f"{message.get('role', '?')}: {body}")
    return " | ".join(lines)


def reply_description(reply: list[ReplyPart]) -> str:
    """A readable rendering of a reply: text verbatim, media as '<audio 12000 @16000Hz>', repairs flagged."""
    pieces = []
    for part in reply:
        if part.kind == "text":
            pieces.append(part.text)
            continue
        shape = "x".join(str(d) for d in np.shape(part.media)) if part.media is not None else "none"
        rate = f" @{part.sample_rate}Hz" if part.sample_rate else ""
        flag = f" [{part.flag}]" if part.flag else ""
        pieces.append(f"<{part.kind} {shape}{rate}{flag}>")
    return " ".join(pieces)
