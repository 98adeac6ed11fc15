"""The toy-world evaluation tasks (TOYWORLD.md), scored exactly by parsers and oracles.

Each task draws held-out items from the test split of `mmllm.data.toy_tasks`, so items are a
pure function of (task, index, seed). Text replies are parsed back into facts with the inverse
of the toy grammar (`parse_caption`, `parse_motion_caption`); media replies are read back with
`mmllm.data.oracles`. Both sides are then compared as facts, not strings: a two-shape caption
is right when it names the scene's two shapes and its relation holds between them, in either
order ("the red circle is left of the blue star" and "the blue star is right of the red circle"
are the same claim), which is how GenEval judges position too.

A reply that cannot be parsed or read scores the worst value of every key and "unreadable": 1.
Chance replies are the majority answer of the same seed's train split (what a model that
ignores its input would learn), or a random valid output.
"""

from __future__ import annotations

import functools
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmllm.data import oracles, toy_tasks
from mmllm.data.toy_tasks import RELATIONS
from mmllm.data.toyworld import (
    ACTION_STEPS,
    COLORS,
    DIRECTIONS,
    GRID,
    SHAPES,
    SIZES,
    SPEECH_SAMPLE_RATE,
    Shape,
    caption,
    relation,
    render_image,
    render_video,
    sample_motion,
    sample_scene,
    sample_sentence,
    speak,
    words,
)
from mmllm.errors import MediaError
from mmllm.evaluation.metrics import exact_match, word_error_rate
from mmllm.evaluation.tasks import EvalItem, ReplyPart, Task, register_task, reply_media, reply_text

SPLIT = "test"  # every item is held out: the trainers read the train split
# The longest toy reference ("is the purple triangle left of the purple triangle") is 52 bytes; a
# byte-level tokenizer spends at most one token per byte, so 64 leaves room for end-of-turn and slack.
TEXT_MAX_NEW_TOKENS = 64
MEDIA_MAX_NEW_TOKENS = 256  # above the largest toy span (video: 192 tokens, TOYWORLD.md) and its markers
CHANCE_POOL = 1000  # train items behind a majority answer: the top answer's share is then known to ~1.5 points
# toy-act success radius, as a fraction of the width: 6.4 px, inside a large shape (radius 9 px) and under
# half the 1/3-width spacing of cell centres, so a successful reach is nearer its target than any other shape.
SUCCESS_RADIUS = 0.1
WORST_REACH_ERROR = math.sqrt(2)  # the image's diagonal over its width: no two points in it are farther apart
WER_CAP = 1.0  # per-sample WER ceiling: babble past all-wrong is no worse than silence, and one long reply
# does not outweigh many samples in the mean
READ_ERRORS = (MediaError, TypeError, ValueError)  # what an oracle raises on an array it cannot even inspect
ONE_SHAPE_FACTS = ("shape", "color", "size", "position")  # all that a one-shape caption states
TWO_SHAPE_FACTS = ("shape", "color", "relation")  # a two-shape caption leaves sizes and cells open


# ---------------------------------------------------------------- caption grammar, inverted


@dataclass(frozen=True)
class ShapeFacts:
    """One shape as a caption names it; size and position only in one-shape captions."""

    shape: str
    color: str
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class CaptionFacts:
    """What a caption states: one fully described shape, or two shapes and the relation of the first to the second."""

    shapes: tuple[ShapeFacts, ...]
    relation: str | None = None


@dataclass(frozen=True)
class MotionFacts:
    shape: str
    color: str
    direction: str


POSITIONS = {Shape(SHAPES[0], COLORS[0], SIZES[0], r, c).position: (r, c) for r in range(GRID) for c in range(GRID)}


def _one_of(options) -> str:
    return "(" + "|".join(re.escape(o) for o in sorted(options, key=len, reverse=True)) + ")"


_ONE_SHAPE = re.compile(rf"a {_one_of(SIZES)} {_one_of(COLORS)} {_one_of(SHAPES)} at the {_one_of(POSITIONS)}")
_TWO_SHAPES = re.compile(
    rf"the {_one_of(COLORS)} {_one_of(SHAPES)} is {_one_of(RELATIONS)} the {_one_of(COLORS)} {_one_of(SHAPES)}"
)
_MOTION = re.compile(rf"a {_one_of(COLORS)} {_one_of(SHAPES)} (?:moving {_one_of(DIRECTIONS)}|standing (still))")


def _tidy(text: str) -> str:
    """Lower case, whitespace collapsed, punctuation and quotes trimmed from both ends."""
    return " ".join(text.lower().split()).strip(" .,;:!?'\"")


def parse_caption(text: str) -> CaptionFacts | None:
    """The inverse of `toyworld.caption`: the facts a caption states, or None when it is not one."""
    text = _tidy(text)
    if match := _ONE_SHAPE.fullmatch(text):
        size, color, shape, position = match.groups()
        return CaptionFacts((ShapeFacts(shape, color, size, position),))
    if match := _TWO_SHAPES.fullmatch(text):
        color_a, shape_a, said, color_b, shape_b = match.groups()
        return CaptionFacts((ShapeFacts(shape_a, color_a), ShapeFacts(shape_b, color_b)), said)
    return None


def stated_facts(scene: Sequence[Shape]) -> CaptionFacts:
    """What `toyworld.caption(scene)` states about the scene."""
    if len(scene) == 1:
        s = scene[0]
        return CaptionFacts((ShapeFacts(s.shape, s.color, s.size, s.position),))
    a, b = scene[0], scene[1]
    return CaptionFacts((ShapeFacts(a.shape, a.color), ShapeFacts(b.shape, b.color)), relation(a, b))


def parse_motion_caption(text: str) -> MotionFacts | None:
    """The inverse of `toyworld.motion_caption`: (shape, colour, direction), or None when it is not one."""
    match = _MOTION.fullmatch(_tidy(text))
    if match is None:
        return None
    color, shape, moving, still = match.groups()
    return MotionFacts(shape, color, moving or still)


def judge_scene(stated: CaptionFacts, scene: Sequence[Shape], determined: Sequence[str]) -> dict[str, float]:
    """Whether the shapes of `scene` bear out what `stated` says, attribute by attribute in `determined`.

    The number of shapes must agree, else every attribute is wrong. Two shapes are matched by
    (shape, colour), since no scene holds two alike; the stated relation must hold between them.
    """
    right = dict.fromkeys(determined, False)
    said = stated.shapes
    if len(said) == len(scene) == 1:
        actual = {"shape": scene[0].shape, "color": scene[0].color, "size": scene[0].size}
        actual["position"] = scene[0].position
        for attr in determined:
            right[attr] = getattr(said[0], attr, None) == actual.get(attr)
    elif len(said) == len(scene) == 2:
        right["shape"] = sorted(f.shape for f in said) == sorted(s.shape for s in scene)
        right["color"] = sorted(f.color for f in said) == sorted(s.color for s in scene)
        found = [next((s for s in scene if (s.shape, s.color) == (f.shape, f.color)), None) for f in said]
        holds = RELATIONS.get(stated.relation or "")
        right["relation"] = None not in found and holds is not None and holds(*found)
        right = {attr: right.get(attr, False) for attr in determined}
    return {"accuracy": float(all(right.values())), **{f"{attr}_accuracy": float(ok) for attr, ok in right.items()}}


# ---------------------------------------------------------------- shared scorers of one reply


def scene_of(facts: Sequence[dict[str, Any]]) -> tuple[Shape, ...]:
    """A scene from its JSON facts (toy_tasks.scene_facts)."""
    return tuple(Shape(f["shape"], f["color"], f["size"], f["row"], f["col"]) for f in facts)


def _read(oracle: Callable, *args: Any) -> Any:
    """The oracle's reading, or None when the array cannot even be inspected (wrong dtype or rank)."""
    try:
        return oracle(*args)
    except READ_ERRORS:
        return None


def _unreadable(worst: dict[str, float]) -> dict[str, float]:
    return {**worst, "unreadable": 1.0}


def score_image(scene: tuple[Shape, ...], determined: Sequence[str], reply: list[ReplyPart]) -> dict[str, float]:
    """Read the reply's image and judge it against what the caption of `scene` determines."""
    part = reply_media(reply, "image")
    read = _read(oracles.read_image, part.media) if part else None
    if read is None:
        return _unreadable({"accuracy": 0.0, **{f"{attr}_accuracy": 0.0 for attr in determined}})
    return {**judge_scene(stated_facts(scene), read, determined), "unreadable": 0.0}


def _wer(reference: Sequence[str], heard: Sequence[str]) -> dict[str, float]:
    return {"wer": min(WER_CAP, word_error_rate(reference, heard)), "exact": float(list(reference) == list(heard))}


def score_speech(reference: Sequence[str], reply: list[ReplyPart]) -> dict[str, float]:
    """Read the reply's toy speech back into words and compare them with `reference`."""
    part = reply_media(reply, "audio")
    heard = _read(oracles.read_speech, part.media, part.sample_rate or SPEECH_SAMPLE_RATE) if part else None
    if heard is None:
        return _unreadable({"wer": WER_CAP, "exact": 0.0})
    return {**_wer(reference, heard), "unreadable": 0.0}


def _judge_motion(said: MotionFacts, meta: dict[str, Any]) -> dict[str, float]:
    right = {attr: getattr(said, attr) == meta[attr] for attr in ("shape", "color", "direction")}
    return {"accuracy": float(all(right.values())), **{f"{attr}_accuracy": float(ok) for attr, ok in right.items()}}


MOTION_WORST = {"accuracy": 0.0, "shape_accuracy": 0.0, "color_accuracy": 0.0, "direction_accuracy": 0.0}


def score_video(meta: dict[str, Any], reply: list[ReplyPart]) -> dict[str, float]:
    """Read the reply's clip and compare its shape, colour and direction with `meta`."""
    part = reply_media(reply, "video")
    read = _read(oracles.read_video, part.media) if part else None
    if read is None:
        return _unreadable(MOTION_WORST)
    return {**_judge_motion(MotionFacts(read.shape, read.color, read.direction), meta), "unreadable": 0.0}


def score_reach(target: Sequence[float], reply: list[ReplyPart]) -> dict[str, float]:
    """Final distance of the reply's action chunk from `target` as a fraction of width, and success."""
    part = reply_media(reply, "action")
    error = _read(oracles.reach_error, part.media, tuple(target)) if part else None
    if error is None:
        return _unreadable({"final_error": WORST_REACH_ERROR, "success": 0.0})
    error = min(error, WORST_REACH_ERROR) if math.isfinite(error) else WORST_REACH_ERROR
    return {"final_error": error, "success": float(error <= SUCCESS_RADIUS), "unreadable": 0.0}


def random_scene_image(rng: random.Random, num_shapes: int) -> list[ReplyPart]:
    return [ReplyPart("image", media=render_image(sample_scene(rng, num_shapes)))]


def random_speech(rng: random.Random) -> list[ReplyPart]:
    return [ReplyPart("audio", media=speak(sample_sentence(rng)), sample_rate=SPEECH_SAMPLE_RATE)]


def random_motion_video(rng: random.Random) -> list[ReplyPart]:
    return [ReplyPart("video", media=render_video(sample_motion(rng)))]


def zero_action() -> list[ReplyPart]:
    return [ReplyPart("action", media=np.zeros((ACTION_STEPS, 2), dtype=np.float32))]


# ---------------------------------------------------------------- records to items


def _assistant(record: dict[str, Any]) -> list[dict[str, Any]]:
    return next(m["content"] for m in record["messages"] if m["role"] == "assistant")


def _with_arrays(parts: Sequence[dict[str, Any]], arrays: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Content parts with each medium's "path" (or an action's inline "values") replaced by its "array"."""
    out = []
    for part in parts:
        kind = part["type"]
        if kind == "text":
            out.append(dict(part))
        elif kind == "action":
            out.append({"type": "action", "array": np.asarray(part["values"], dtype=np.float32)})
        else:
            loaded = {"type": kind, "array": arrays[part["path"]]}
            if kind == "audio":
                loaded["sample_rate"] = SPEECH_SAMPLE_RATE
            out.append(loaded)
    return out


def _as_reply(part: dict[str, Any], arrays: dict[str, np.ndarray]) -> ReplyPart:
    (loaded,) = _with_arrays([part], arrays)
    if loaded["type"] == "text":
        return ReplyPart("text", text=loaded["text"])
    return ReplyPart(loaded["type"], media=loaded["array"], sample_rate=loaded.get("sample_rate"))


@functools.cache
def majority_answers(task: str, seed: int) -> dict[str, str]:
    """The most common reference answer over CHANCE_POOL train items of `task`, per VQA question type ("" else)."""
    counts: dict[str, Counter[str]] = {}
    for index in range(CHANCE_POOL):
        record = toy_tasks.generate(task, index, seed, split="train").record
        answer = " ".join(part["text"] for part in _assistant(record) if part["type"] == "text")
        counts.setdefault(record["meta"].get("question_type", ""), Counter())[answer] += 1
    return {group: counter.most_common(1)[0][0] for group, counter in counts.items()}


class ToyTask(Task):
    """A toy-world chat task: item i is record i of the test split; the assistant turn is the reference."""

    reply_modality = "text"

    def items(self, n: int, seed: int) -> list[EvalItem]:
        return [self._item(toy_tasks.generate(self.name, index, seed, split=SPLIT), index, seed) for index in range(n)]

    def _item(self, example: toy_tasks.ToyExample, index: int, seed: int) -> EvalItem:
        record = example.record
        arrays = {path: array for _, path, array in example.media}
        prompt = [
            {"role": m["role"], "content": _with_arrays(m["content"], arrays)}
            for m in record["messages"]
            if m["role"] != "assistant"
        ]
        text_reply = self.reply_modality == "text"
        return EvalItem(
            id=record["id"],
            prompt=prompt,
            prompt_kind="chat",
            reply_modality=self.reply_modality,
            max_new_tokens=TEXT_MAX_NEW_TOKENS if text_reply else MEDIA_MAX_NEW_TOKENS,
            meta={**record["meta"], "source": {"task": self.name, "index": index, "seed": seed}},
            reference=self.describe_reference(record),
        )

    def describe_reference(self, record: dict[str, Any]) -> str:
        """The reference shown beside a reply: the assistant's text (media tasks override)."""
        return " ".join(part["text"] for part in _assistant(record) if part["type"] == "text")

    def reference_reply(self, item: EvalItem) -> list[ReplyPart]:
        """The ground-truth reply of `item`, rebuilt from its record: what a perfect model would say."""
        source = item.meta["source"]
        example = toy_tasks.generate(source["task"], source["index"], source["seed"], split=SPLIT)
        arrays = {path: array for _, path, array in example.media}
        return [_as_reply(part, arrays) for part in _assistant(example.record)]

    def _majority(self, item: EvalItem, group: str = "") -> list[ReplyPart]:
        return [ReplyPart("text", text=majority_answers(self.name, item.meta["source"]["seed"])[group])]


class CaptionTask(ToyTask):
    name = "toy-caption"
    description = "image -> caption; accuracy: every attribute the caption states is right"
    input_modalities = ("image",)

    def score(self, item: EvalItem, reply: list[ReplyPart]) -> dict[str, float]:
        scene = scene_of(item.meta["scene"])
        determined = ONE_SHAPE_FACTS if len(scene) == 1 else TWO_SHAPE_FACTS
        said = parse_caption(reply_text(reply))
        if said is None:
            return _unreadable({"accuracy": 0.0, **{f"{attr}_accuracy": 0.0 for attr in determined}})
        return {**judge_scene(said, scene, determined), "unreadable": 0.0}

    def chance_reply(self, item: EvalItem, rng: random.Random) -> list[ReplyPart]:
        return self._majority(item)


class VQATask(ToyTask):
    name = "toy-vqa"
    description = "image + question -> one word or phrase; exact match, per question type too"
    input_modalities = ("image",)

    def score(self, item: EvalItem, reply: list[ReplyPart]) -> dict[str, float]:
        hit = exact_match(reply_text(reply), item.meta["answer"])
        return {"accuracy": hit, f"{item.meta['question_type']}_accuracy": hit}

    def chance_reply(self, item: EvalItem, rng: random.Random) -> list[ReplyPart]:
        return self._majority(item, item.meta["question_type"])


class MultiImageVQATask(VQATask):
    name = "toy-vqa-multi"
    description = "four two-shape images + a question about them -> one word; the reducer benchmark's workload"


class DrawTask(ToyTask):
    name = "toy-draw"
    description = "caption -> image; oracle accuracy: every attribute the caption determines is read back"
    output_modalities = ("image",)
    reply_modality = "image"

    def describe_reference(self, record: dict[str, Any]) -> str:
        return f"image of {record['meta']['caption']}"

    def score(self, item: EvalItem, reply: list[ReplyPart]) -> dict[str, float]:
        return score_image(scene_of(item.meta["scene"]), item.meta["determined"], reply)

    def chance_reply(self, item: EvalItem, rng: random.Random) -> list[ReplyPart]:
        return random_scene_image(rng, len(item.meta["scene"]))


class TranscribeTask(ToyTask):
    name = "toy-transcribe"
    description = "toy speech -> text; word error rate"
    input_modalities = ("audio",)
    metric = "wer"
    higher_is_better = False

    def score(self, item: EvalItem, reply: list[ReplyPart]) -> dict[str, float]:
        return _wer(item.meta["words"], words(reply_text(reply)))

    def chance_reply(self, item: EvalItem, rng: random.Random) -> list[ReplyPart]:
        return [ReplyPart("text", text=sample_sentence(rng))]


class SpeakTask(ToyTask):
    name = "toy-speak"
    description = "text -> toy speech; oracle word error rate"
    output_modalities = ("audio",)
    reply_modality = "audio"
    metric = "wer"
    higher_is_better = False

    def describe_reference(self, record: dict[str, Any]) -> str:
        return f"speech of {record['meta']['text']!r}"

    def score(self, item: EvalItem, reply: list[ReplyPart]) -> dict[str, float]:
        return score_speech(item.meta["words"], reply)

    def chance_reply(self, item: EvalItem, rng: random.Random) -> list[ReplyPart]:
        return random_speech(rng)


class MotionTask(ToyTask):
    name = "toy-motion"
    description = "video -> motion caption; direction accuracy (shape and colour too)"
    input_modalities = ("video",)
    metric = "direction_accuracy"

    def score(self, item: EvalItem, reply: list[ReplyPart]) -> dict[str, float]:
        said = parse_motion_caption(reply_text(reply))
        if said is None:
            return _unreadable(MOTION_WORST)
        return {**_judge_motion(said, item.meta), "unreadable": 0.0}

    def chance_reply(self, item: EvalItem, rng: random.Random) -> list[ReplyPart]:
        return self._majority(item)


class AnimateTask(ToyTask):
    name = "toy-animate"
    description = "motion caption -> video; oracle accuracy: shape, colour and direction"
    output_modalities = ("video",)
    reply_modality = "video"

    def describe_reference(self, record: dict[str, Any]) -> str:
        return f"video of {record['meta']['caption']}"

    def score(self, item: EvalItem, reply: list[ReplyPart]) -> dict[str, float]:
        return score_video(item.meta, reply)

    def chance_reply(self, item: EvalItem, rng: random.Random) -> list[ReplyPart]:
        return random_motion_video(rng)


class ActTask(ToyTask):
    name = "toy-act"
    description = "image + instruction -> action chunk; final distance to the target, fraction of width"
    input_modalities = ("image",)
    output_modalities = ("action",)
    reply_modality = "action"
    metric = "final_error"
    higher_is_better = False

    def describe_reference(self, record: dict[str, Any]) -> str:
        x, y = record["meta"]["target_xy"]
        return f"actions to {record['meta']['instruction']!r}, ending at ({x:+.2f}, {y:+.2f})"

    def score(self, item: EvalItem, reply: list[ReplyPart]) -> dict[str, float]:
        return score_reach(item.meta["target_xy"], reply)

    def chance_reply(self, item: EvalItem, rng: random.Random) -> list[ReplyPart]:
        return zero_action()


class InterleavedTask(ToyTask):
    """Each medium of a toy document, generated from the document before it, scored by its modality's oracle."""

    name = "toy-interleaved"
    description = "documents mixing captioned media; each medium generated from its prefix, scored by its oracle"
    input_modalities = ("image", "audio", "video", "action")
    output_modalities = ("image", "audio", "video", "action")
    metric = "parts_score"

    def items(self, n: int, seed: int) -> list[EvalItem]:
        """The parts of the first `n` documents (2-4 each)."""
        items = []
        for index in range(n):
            example = toy_tasks.generate(self.name, index, seed, split=SPLIT)
            arrays = {path: array for _, path, array in example.media}
            content = example.record["messages"][0]["content"]
            for k, part in enumerate(example.record["meta"]["parts"]):
                items.append(
                    EvalItem(
                        id=f"{example.record['id']}-part{k}",
                        prompt=_with_arrays(content[: part["part"]], arrays),
                        prompt_kind="document",
                        reply_modality=part["modality"],
                        max_new_tokens=MEDIA_MAX_NEW_TOKENS,
                        meta={**part, "source": {"task": self.name, "index": index, "seed": seed}},
                        reference=self._describe_part(part),
                    )
                )
        return items

    @staticmethod
    def _describe_part(part: dict[str, Any]) -> str:
        if part["modality"] == "image":
            return f"image of {caption(scene_of(part['scene']))}"
        if part["modality"] == "audio":
            return f"speech of {part['text']!r}"
        if part["modality"] == "video":
            return f"video of {part['caption']}"
        x, y = part["target_xy"]
        return f"actions ending at ({x:+.2f}, {y:+.2f})"

    def reference_reply(self, item: EvalItem) -> list[ReplyPart]:
        source = item.meta["source"]
        example = toy_tasks.generate(source["task"], source["index"], source["seed"], split=SPLIT)
        arrays = {path: array for _, path, array in example.media}
        return [_as_reply(example.record["messages"][0]["content"][item.meta["part"]], arrays)]

    def score(self, item: EvalItem, reply: list[ReplyPart]) -> dict[str, float]:
        meta, modality = item.meta, item.meta["modality"]
        if modality == "image":
            scene = scene_of(meta["scene"])
            scores = score_image(scene, ONE_SHAPE_FACTS if len(scene) == 1 else TWO_SHAPE_FACTS, reply)
            success = scores["accuracy"]
        elif modality == "audio":
            scores = score_speech(words(meta["text"]), reply)
            success = 1.0 - min(scores["wer"], 1.0)
        elif modality == "video":
            scores = score_video(meta, reply)
            success = scores["accuracy"]
        else:
            scores = score_reach(meta["target_xy"], reply)
            success = scores["success"]
        named = {f"{modality}_{key}": value for key, value in scores.items() if key != "unreadable"}
        return {"parts_score": success, **named, "unreadable": scores["unreadable"]}

    def chance_reply(self, item: EvalItem, rng: random.Random) -> list[ReplyPart]:
        modality = item.meta["modality"]
        if modality == "image":
            return random_scene_image(rng, len(item.meta["scene"]))
        if modality == "audio":
            return random_speech(rng)
        if modality == "video":
            return random_motion_video(rng)
        return zero_action()


class TextPerplexityTask(Task):
    """Perplexity of held-out toy text (captions, motion captions, sentences); the runner computes token NLL."""

    name = "toy-text-ppl"
    description = "perplexity of held-out toy-world text: captions, motion captions and spoken sentences"
    kind = "perplexity"
    metric = "perplexity"
    higher_is_better = False
    sources = ("toy-caption", "toy-motion", "toy-transcribe")  # taken in turn: item i is record i // 3 of one

    def items(self, n: int, seed: int) -> list[EvalItem]:
        items = []
        for i in range(n):
            source, index = self.sources[i % len(self.sources)], i // len(self.sources)
            record = toy_tasks.generate(source, index, seed, split=SPLIT).record
            text = " ".join(part["text"] for part in _assistant(record) if part["type"] == "text")
            items.append(
                EvalItem(
                    id=f"{self.name}-{SPLIT}-{i:06d}",
                    prompt=[{"type": "text", "text": text}],
                    prompt_kind="document",
                    reply_modality="text",
                    max_new_tokens=0,
                    meta={"text": text, "source": {"task": source, "index": index, "seed": seed}},
                    reference=text,
                )
            )
        return items

    def score(self, item: EvalItem, reply: list[ReplyPart]) -> dict[str, float]:
        raise NotImplementedError("toy-text-ppl is a likelihood task: the runner scores token NLL, not replies")

    def aggregate(self, scores: list[dict[str, float]]) -> dict[str, float]:
        """Per-sample {"nll": total nats, "tokens": count} -> corpus perplexity exp(sum nll / sum tokens)."""
        nll = sum(s["nll"] for s in scores)
        tokens = sum(s["tokens"] for s in scores)
        if tokens <= 0:
            return {"perplexity": math.nan, "nll_per_token": math.nan, "tokens": 0.0}
        return {"perplexity": math.exp(nll / tokens), "nll_per_token": nll / tokens, "tokens": float(tokens)}

    def chance_reply(self, item: EvalItem, rng: random.Random) -> list[ReplyPart]:
        raise NotImplementedError("toy-text-ppl has no chance reply: use chance_perplexity(text_vocab_size)")

    @staticmethod
    def chance_perplexity(text_vocab_size: int) -> float:
        """A uniform model over the text vocabulary puts 1/V on every token, so its perplexity is V on any text."""
        return float(text_vocab_size)


for _task in (
    CaptionTask(),
    VQATask(),
    MultiImageVQATask(),
    DrawTask(),
    TranscribeTask(),
    SpeakTask(),
    MotionTask(),
    AnimateTask(),
    ActTask(),
    InterleavedTask(),
    TextPerplexityTask(),
):
    register_task(_task)
