"""Toy-world task conversations, reasoning puzzles, and the dataset writer.

Every toy-world task (the ids in `TASKS`) is a function `(rng, media) -> record` that samples one
item: a conversation (or, for `toy-interleaved`, a plain document) in the interleaved JSONL
format of docs/data_format.md, with the ground truth a scorer needs under "meta". Media are
handed to a `MediaSink`, which names their files; `write_toyworld` then saves them beside the
JSONL.

Every item is drawn from its own `random.Random` seeded by (seed, split, task, index), so an
item does not depend on how many others are written, a larger `n` extends a smaller one, and
each split (train, validation, test, ...) draws from a different stream.

Reasoning puzzles carry a step-by-step trace: the assistant's answer is the steps, one per
line, then "answer: X"; meta holds "question", "steps" and "answer" separately (Coconut's
layout), so a no-trace or latent-thought variant is built from the same record. Their
difficulty knobs (hops and distractors, operations, shapes per image) are the keyword
arguments of `prosqa`, `arithmetic` and `visual_count`; the `*_DEFAULTS` dicts hold the values
the writer uses.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mmllm.data import media as media_io
from mmllm.data.toyworld import (
    COLORS,
    NUMBERS,
    SHAPES,
    SPEECH_SAMPLE_RATE,
    Motion,
    Shape,
    canonical,
    caption,
    instruction,
    motion_caption,
    relation,
    render_image,
    render_video,
    sample_motion,
    sample_reach,
    sample_scene,
    sample_sentence,
    speak,
    target_xy,
    words,
)
from mmllm.errors import InputError

MEDIA_DIR = "media"  # media live under <out>/media/<split>/<task>/, paths in the JSONL are relative to <out>
EXTENSIONS = {"image": ".png", "audio": ".wav", "video": ".npy"}  # actions travel inline as "values"
Record = dict[str, Any]


@dataclass
class MediaSink:
    """Collects the media of one record and gives each a file path relative to the JSONL's folder."""

    stem: str  # e.g. "media/train/toy-caption/toy-caption-train-000007"
    items: list[tuple[str, str, np.ndarray]] = field(default_factory=list)  # (modality, path, array)

    def part(self, modality: str, array: np.ndarray) -> dict[str, Any]:
        """The content part referring to `array`, which is saved with the record."""
        path = f"{self.stem}-{len(self.items)}{EXTENSIONS[modality]}"
        self.items.append((modality, path, array))
        return {"type": modality, "path": path}


def text(value: str) -> dict[str, str]:
    return {"type": "text", "text": value}


def chat(user: list[dict[str, Any]], assistant: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def scene_facts(scene: Sequence[Shape]) -> list[dict[str, Any]]:
    """A scene as JSON: one dict per shape (shape, color, size, row, col), in reading order."""
    return [asdict(s) for s in canonical(tuple(scene))]


def plural(shape: str) -> str:
    return f"{shape}s"


# ---------------------------------------------------------------- perception tasks


def toy_caption(rng: random.Random, media: MediaSink) -> Record:
    scene = sample_scene(rng, rng.choice((1, 2)))
    answer = caption(scene)
    return {
        "messages": chat([media.part("image", render_image(scene)), text("Describe the image.")], [text(answer)]),
        "meta": {"scene": scene_facts(scene), "caption": answer},
    }


def _attribute_question(rng: random.Random, scene: tuple[Shape, ...]) -> tuple[str, str]:
    """A question about one shape of the scene, named unambiguously, and its answer."""
    s = rng.choice(scene)
    unique_shape = sum(o.shape == s.shape for o in scene) == 1
    unique_color = sum(o.color == s.color for o in scene) == 1
    asks = ["size", "where"] + (["color"] if unique_shape else []) + (["shape"] if unique_color else [])
    ask = rng.choice(asks)
    if ask == "color":
        return f"what color is the {s.shape}?", s.color
    if ask == "shape":
        return f"what shape is the {s.color} shape?", s.shape
    if ask == "size":
        return f"what size is the {s.color} {s.shape}?", s.size
    return f"where is the {s.color} {s.shape}?", s.position


RELATIONS = {
    "left of": lambda a, b: a.col < b.col,
    "right of": lambda a, b: a.col > b.col,
    "above": lambda a, b: a.row < b.row,
    "below": lambda a, b: a.row > b.row,
}


def _relation_question(rng: random.Random, scene: tuple[Shape, ...]) -> tuple[str, str]:
    """'is the red circle left of the blue star?': yes and no equally often."""
    a, b = rng.sample(scene, 2)
    holds = [name for name, test in RELATIONS.items() if test(a, b)]
    fails = [name for name in RELATIONS if name not in holds]
    answer = rng.choice(("yes", "no"))
    name = rng.choice(holds if answer == "yes" else fails)
    return f"is the {a.color} {a.shape} {name} the {b.color} {b.shape}?", answer


def _counting_question(rng: random.Random, scene: tuple[Shape, ...]) -> tuple[str, str]:
    """'how many circles are there?' or 'how many red shapes are there?', about a kind present 3 times in 4."""
    by_shape = rng.random() < 0.5
    present = sorted({s.shape if by_shape else s.color for s in scene})
    absent = [k for k in (SHAPES if by_shape else COLORS) if k not in present]
    kind = rng.choice(present if rng.random() < 0.75 or not absent else absent)
    count = sum((s.shape if by_shape else s.color) == kind for s in scene)
    noun = plural(kind) if by_shape else f"{kind} shapes"
    return f"how many {noun} are there?", NUMBERS[count]


VQA_TYPES = {"attribute": (1, 2), "relation": (2, 2), "counting": (2, 4)}  # shapes per image (min, max)


def toy_vqa(rng: random.Random, media: MediaSink) -> Record:
    kind = rng.choice(tuple(VQA_TYPES))
    low, high = VQA_TYPES[kind]
    scene = sample_scene(rng, rng.randint(low, high))
    ask = {"attribute": _attribute_question, "relation": _relation_question, "counting": _counting_question}[kind]
    question, answer = ask(rng, scene)
    return {
        "messages": chat([media.part("image", render_image(scene)), text(question)], [text(answer)]),
        "meta": {"question_type": kind, "question": question, "answer": answer, "scene": scene_facts(scene)},
    }


MULTI_IMAGES = 4  # images per multi-image prompt: 4 x 64 = 256 image tokens, a workload worth pruning
DRILL_QUESTIONS = 6  # questions per training conversation: six answers of supervision per prefill


def _distinct_scenes(rng: random.Random, images: int) -> list[tuple[Shape, ...]]:
    """`images` two-shape scenes in which no (shape, colour) pair repeats, so "the red circle"
    names one shape of the whole set."""
    scenes: list[tuple[Shape, ...]] = []
    used: set[tuple[str, str]] = set()
    while len(scenes) < images:
        scene = sample_scene(rng, 2)
        pairs = {(s.shape, s.color) for s in scene}
        if not pairs & used:
            scenes.append(scene)
            used |= pairs
    return scenes


def _multi_image_question(rng: random.Random, scenes: list[tuple[Shape, ...]]) -> tuple[str, str, str]:
    """(question type, question, answer) about a set of images: an attribute of a shape named
    uniquely across the set, a relation inside the image holding both shapes, or a count over all."""
    kind = rng.choice(tuple(VQA_TYPES))
    every = tuple(s for scene in scenes for s in scene)
    if kind == "attribute":
        return (kind, *_attribute_question(rng, every))
    if kind == "relation":
        return (kind, *_relation_question(rng, rng.choice(scenes)))
    return (kind, *_counting_question(rng, every))


def _multi_image_vqa(rng: random.Random, media: MediaSink, questions: int) -> Record:
    scenes = _distinct_scenes(rng, MULTI_IMAGES)
    asked = [_multi_image_question(rng, scenes) for _ in range(questions)]
    images = [media.part("image", render_image(scene)) for scene in scenes]
    messages = []
    for i, (_, question, answer) in enumerate(asked):
        messages += chat([*(images if i == 0 else []), text(question)], [text(answer)])
    kind, question, answer = asked[0]
    meta = {"question_type": kind, "question": question, "answer": answer, "scenes": [scene_facts(s) for s in scenes]}
    return {"messages": messages, "meta": meta}


def toy_vqa_multi(rng: random.Random, media: MediaSink) -> Record:
    """Four two-shape images and one question about them: the visual-token reducers' workload."""
    return _multi_image_vqa(rng, media, 1)


def toy_vqa_multi_drill(rng: random.Random, media: MediaSink) -> Record:
    """Training conversations for toy-vqa-multi: four images, then DRILL_QUESTIONS questions
    answered turn by turn (meta describes the first)."""
    return _multi_image_vqa(rng, media, DRILL_QUESTIONS)


def toy_draw(rng: random.Random, media: MediaSink) -> Record:
    """Text to image. A one-shape caption fixes every attribute; a two-shape caption fixes both
    shapes' shape and colour and their relation, not their sizes or cells (meta "determined")."""
    scene = sample_scene(rng, rng.choice((1, 2)))
    prompt = caption(scene)
    determined = ["shape", "color", "size", "position"] if len(scene) == 1 else ["shape", "color", "relation"]
    request = f"Draw {prompt}." if len(scene) == 1 else f"Draw an image in which {prompt}."
    meta = {"caption": prompt, "scene": scene_facts(scene), "determined": determined}
    if len(scene) == 2:
        meta["relation"] = {"first": asdict(scene[0]), "relation": relation(*scene), "second": asdict(scene[1])}
    return {
        "messages": chat([text(request)], [media.part("image", render_image(scene))]),
        "meta": meta,
    }


def toy_transcribe(rng: random.Random, media: MediaSink) -> Record:
    sentence = sample_sentence(rng)
    return {
        "messages": chat([media.part("audio", speak(sentence)), text("Transcribe the speech.")], [text(sentence)]),
        "meta": {"text": sentence, "words": words(sentence)},
    }


def toy_speak(rng: random.Random, media: MediaSink) -> Record:
    sentence = sample_sentence(rng)
    return {
        "messages": chat([text(f"Say: {sentence}")], [media.part("audio", speak(sentence))]),
        "meta": {"text": sentence, "words": words(sentence)},
    }


def _motion_meta(motion: Motion) -> dict[str, Any]:
    s = motion.shape
    return {
        "shape": s.shape,
        "color": s.color,
        "size": s.size,
        "direction": motion.direction,
        "start": [s.row, s.col],
        "caption": motion_caption(motion),
    }


def toy_motion(rng: random.Random, media: MediaSink) -> Record:
    motion = sample_motion(rng)
    return {
        "messages": chat(
            [media.part("video", render_video(motion)), text("What moves, and which way?")],
            [text(motion_caption(motion))],
        ),
        "meta": _motion_meta(motion),
    }


def toy_animate(rng: random.Random, media: MediaSink) -> Record:
    motion = sample_motion(rng)
    return {
        "messages": chat([text(f"Animate {motion_caption(motion)}.")], [media.part("video", render_video(motion))]),
        "meta": _motion_meta(motion),
    }


def action_part(actions: np.ndarray) -> dict[str, Any]:
    return {"type": "action", "values": np.round(actions.astype(np.float64), 5).tolist()}  # 1e-5: far below noise


def toy_act(rng: random.Random, media: MediaSink) -> Record:
    reach = sample_reach(rng)
    goal = reach.scene[reach.target]
    return {
        "messages": chat(
            [media.part("image", render_image(reach.scene)), text(instruction(goal))], [action_part(reach.actions)]
        ),
        "meta": {
            "instruction": instruction(goal),
            "scene": scene_facts(reach.scene),
            "target": asdict(goal),
            "target_xy": list(target_xy(goal)),
        },
    }


def toy_interleaved(rng: random.Random, media: MediaSink) -> Record:
    """A plain document of 2-4 captioned media of mixed modalities; meta lists each medium's facts."""
    content, parts = [], []
    for _ in range(rng.randint(2, 4)):
        modality = rng.choice(("image", "audio", "video", "action"))
        if modality == "image":
            scene = sample_scene(rng, rng.choice((1, 2)))
            content += [text(f"Here is {caption(scene)}:"), media.part("image", render_image(scene))]
            parts.append({"part": len(content) - 1, "modality": modality, "scene": scene_facts(scene)})
        elif modality == "audio":
            sentence = sample_sentence(rng)
            content += [text(f'Someone says "{sentence}":'), media.part("audio", speak(sentence))]
            parts.append({"part": len(content) - 1, "modality": modality, "text": sentence})
        elif modality == "video":
            motion = sample_motion(rng)
            content += [text(f"This clip shows {motion_caption(motion)}:"), media.part("video", render_video(motion))]
            parts.append({"part": len(content) - 1, "modality": modality, **_motion_meta(motion)})
        else:
            reach = sample_reach(rng)
            goal = reach.scene[reach.target]
            content += [
                text("In this scene,"),
                media.part("image", render_image(reach.scene)),
                text(f"the gripper is told to {instruction(goal)} and does:"),
                action_part(reach.actions),
            ]
            parts.append({"part": len(content) - 1, "modality": modality, "target_xy": list(target_xy(goal))})
    return {"messages": [{"role": "document", "content": content}], "meta": {"parts": parts}}


# ---------------------------------------------------------------- reasoning puzzles

CONCEPTS = (  # made-up category names, as in ProntoQA / ProsQA, so no prior knowledge helps
    *("wumpus", "yumpus", "zumpus", "dumpus", "rompus", "numpus", "tumpus", "vumpus", "impus", "jompus"),
    *("gorpus", "shumpus", "lempus", "sterpus", "grimpus", "lorpus", "brimpus", "scrompus", "felpus", "quimpus"),
    *("bompus", "zhorpus", "twimpus", "glumpus", "florpus", "krampus", "snorpus", "blimpus", "wexpus", "plumpus"),
)
NAMES = ("Tom", "Alex", "Sam", "Max", "Wren", "Rex", "Jane", "Polly", "Fae", "Stella")
PROSQA_DEFAULTS = {"hops": 4, "distractors": 6}  # 4 chained rules hidden among 14: yes/no by guessing is 50%
ARITH_DEFAULTS = {"operations": 4, "max_operand": 9}  # 4 dependent steps on 1-3 digit numbers
VISUAL_COUNT_DEFAULTS = {"min_shapes": 2, "max_shapes": 5}  # counts of 0-5 per image: not readable at a glance


@dataclass(frozen=True)
class Puzzle:
    question: str
    steps: list[str]
    answer: str
    meta: dict[str, Any]

    @property
    def solution(self) -> str:
        """The assistant's reply: the trace, one step per line, then the answer."""
        return "\n".join([*self.steps, f"answer: {self.answer}"])


def _reachable(start: str, rules: list[tuple[str, str]]) -> dict[str, str | None]:
    """Every concept reachable from `start`, mapped to the concept it was reached from (BFS order)."""
    parents: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for a, b in rules:
            if a == node and b not in parents:
                parents[b] = node
                queue.append(b)
    return parents


def prosqa(rng: random.Random, hops: int = 4, distractors: int = 6) -> Puzzle:
    """'Tom is a wumpus. Every wumpus is a yumpus. ... Is Tom a zumpus?': yes needs `hops` chained rules.

    Two chains of `hops` rules end in the two candidate targets: the true chain starts at Tom's
    concept, the false one at a concept Tom is not. `distractors` further rules branch off
    either chain into dead ends, or point into a chain from outside or from the false chain
    into the true one, so both targets look alike and nothing but the chain decides. Never is a
    rule drawn from the true chain to the false one, so the false target stays unreachable.
    The trace of a yes follows the chain; that of a no derives everything Tom is, then rules the
    target out. Rules in all: 2 * hops + distractors.
    """
    if hops < 1 or distractors < 0 or 2 * (hops + 1) + distractors > len(CONCEPTS):
        raise InputError(f"prosqa: need hops >= 1, distractors >= 0, 2 * (hops + 1) + distractors <= {len(CONCEPTS)}")
    concepts = rng.sample(CONCEPTS, 2 * (hops + 1) + distractors)
    true_chain, false_chain = concepts[: hops + 1], concepts[hops + 1 : 2 * (hops + 1)]
    fresh = concepts[2 * (hops + 1) :]
    rules = [*itertools.pairwise(true_chain), *itertools.pairwise(false_chain)]
    for new in fresh:
        kind = rng.choice(("dead end", "from outside", "false into true"))
        if kind == "dead end":
            rules.append((rng.choice(true_chain + false_chain), new))
        elif kind == "from outside":
            rules.append((new, rng.choice(true_chain[1:] + false_chain[1:])))
        else:
            rules.append((rng.choice(false_chain), rng.choice(true_chain[1:])))
    rng.shuffle(rules)
    name = rng.choice(NAMES)
    answer = rng.choice(("yes", "no"))
    target = true_chain[-1] if answer == "yes" else false_chain[-1]
    parents = _reachable(true_chain[0], rules)
    facts = [f"{name} is a {true_chain[0]}."] + [f"Every {a} is a {b}." for a, b in rules]
    question = " ".join(facts) + f" Is {name} a {target}?"
    if answer == "yes":
        path = [target]
        while parents[path[-1]] is not None:
            path.append(parents[path[-1]])
        path.reverse()
    else:
        path = list(parents)
    steps = [f"{name} is a {true_chain[0]}."]
    steps += [f"Every {parents[c]} is a {c}, so {name} is a {c}." for c in path[1:]]
    if answer == "no":
        steps.append(f"Nothing more follows, so {name} is not a {target}.")
    return Puzzle(question, steps, answer, {"hops": hops, "distractors": distractors, "rules": len(rules)})


OPERATORS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
ARITH_LIMIT = 999  # intermediate values stay within three digits


def arithmetic(rng: random.Random, operations: int = 4, max_operand: int = 9) -> Puzzle:
    """'Compute (((7 + 5) * 3) - 4) + 2.': `operations` dependent steps, each result in [0, 999]."""
    if operations < 1 or max_operand < 2:
        raise InputError("arithmetic: need operations >= 1 and max_operand >= 2")
    value = rng.randint(1, max_operand)
    expression, steps = str(value), []
    for _ in range(operations):
        operand = rng.randint(2, max_operand)  # no 0 or 1: every step changes the value
        allowed = [op for op, apply in OPERATORS.items() if 0 <= apply(value, operand) <= ARITH_LIMIT]
        op = rng.choice(allowed)
        result = OPERATORS[op](value, operand)
        expression = f"({expression}) {op} {operand}" if steps else f"{expression} {op} {operand}"
        steps.append(f"{value} {op} {operand} = {result}")
        value = result
    question = f"Compute {expression}."
    return Puzzle(question, steps, str(value), {"operations": operations, "max_operand": max_operand})


def visual_count(rng: random.Random, min_shapes: int = 2, max_shapes: int = 5) -> tuple[Puzzle, tuple, tuple]:
    """Two scenes and 'are there more circles in the first image or the second?': first, second or same.

    The answer is drawn first (each a third of the time) and scenes are sampled until they agree.
    """
    if not 1 <= min_shapes <= max_shapes <= 9:
        raise InputError("visual_count: need 1 <= min_shapes <= max_shapes <= 9")
    answer = rng.choice(("first", "second", "same"))
    by_shape = rng.random() < 0.5
    kind = rng.choice(SHAPES if by_shape else COLORS)
    noun = plural(kind) if by_shape else f"{kind} shapes"
    while True:
        scenes = tuple(sample_scene(rng, rng.randint(min_shapes, max_shapes)) for _ in range(2))
        counts = [sum((s.shape if by_shape else s.color) == kind for s in scene) for scene in scenes]
        got = "same" if counts[0] == counts[1] else ("first" if counts[0] > counts[1] else "second")
        if got == answer:
            break
    question = f"Are there more {noun} in the first image or in the second image?"
    comparison = {
        "same": f"{counts[0]} equals {counts[1]}.",
        "first": f"{counts[0]} is more than {counts[1]}.",
        "second": f"{counts[1]} is more than {counts[0]}.",
    }[answer]
    singular = kind if by_shape else f"{kind} shape"
    steps = [
        f"The {which} image has {count} {singular if count == 1 else noun}."
        for which, count in zip(("first", "second"), counts, strict=True)
    ]
    steps.append(comparison)
    meta = {"counts": counts, "kind": kind, "min_shapes": min_shapes, "max_shapes": max_shapes}
    return Puzzle(question, steps, answer, meta), scenes[0], scenes[1]


def _puzzle_record(puzzle: Puzzle, user: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> Record:
    meta = {"question": puzzle.question, "steps": puzzle.steps, "answer": puzzle.answer, **puzzle.meta, **(extra or {})}
    return {"messages": chat(user, [text(puzzle.solution)]), "meta": meta}


def toy_prosqa(rng: random.Random, media: MediaSink) -> Record:
    puzzle = prosqa(rng, **PROSQA_DEFAULTS)
    return _puzzle_record(puzzle, [text(puzzle.question)])


def toy_prosqa_drill(rng: random.Random, media: MediaSink) -> Record:
    """toy-prosqa at every difficulty up to the eval's: 1..4 hops among 0..6 distractors. A model
    trained from scratch on the full puzzles alone never learns to look a rule up in the question
    (README, "Latent reasoning"); the small ones teach it, the full ones use it."""
    hops = rng.randint(1, PROSQA_DEFAULTS["hops"])
    puzzle = prosqa(rng, hops, rng.randint(0, PROSQA_DEFAULTS["distractors"]))
    return _puzzle_record(puzzle, [text(puzzle.question)])


def toy_arith(rng: random.Random, media: MediaSink) -> Record:
    puzzle = arithmetic(rng, **ARITH_DEFAULTS)
    return _puzzle_record(puzzle, [text(puzzle.question)])


def toy_visual_count(rng: random.Random, media: MediaSink) -> Record:
    puzzle, first, second = visual_count(rng, **VISUAL_COUNT_DEFAULTS)
    user = [media.part("image", render_image(first)), media.part("image", render_image(second)), text(puzzle.question)]
    return _puzzle_record(puzzle, user, {"scenes": [scene_facts(first), scene_facts(second)]})


TASKS: dict[str, Callable[[random.Random, MediaSink], Record]] = {
    "toy-caption": toy_caption,
    "toy-vqa": toy_vqa,
    "toy-draw": toy_draw,
    "toy-transcribe": toy_transcribe,
    "toy-speak": toy_speak,
    "toy-motion": toy_motion,
    "toy-animate": toy_animate,
    "toy-act": toy_act,
    "toy-interleaved": toy_interleaved,
    "toy-prosqa": toy_prosqa,
    "toy-arith": toy_arith,
    "toy-visual-count": toy_visual_count,
    "toy-vqa-multi": toy_vqa_multi,
    "toy-vqa-multi-drill": toy_vqa_multi_drill,
    "toy-prosqa-drill": toy_prosqa_drill,
}
# Written unless asked for: the reducer benchmark's workload and its training drill are only
# wanted by the model trained for that benchmark (README, "Visual-token reducers"), and the
# ProsQA drill by the latent-reasoning runs (README, "Latent reasoning").
WORKLOAD_TASKS = ("toy-vqa-multi", "toy-vqa-multi-drill", "toy-prosqa-drill")
WORLD_TASKS = tuple(task for task in TASKS if task not in WORKLOAD_TASKS)


# ---------------------------------------------------------------- writer


@dataclass
class ToyExample:
    record: Record
    media: list[tuple[str, str, np.ndarray]]  # (modality, path relative to the JSONL folder, array)


def generate(task: str, index: int, seed: int, split: str = "train") -> ToyExample:
    """Item `index` of `task` in `split`: the same for the same arguments, independent of any other item."""
    if task not in TASKS:
        raise InputError(f"unknown toy task {task!r} (tasks: {', '.join(TASKS)})")
    rng = random.Random(f"toyworld/{seed}/{split}/{task}/{index}")  # str seeds hash with SHA-512: stable everywhere
    item_id = f"{task}-{split}-{index:06d}"
    sink = MediaSink(f"{MEDIA_DIR}/{split}/{task}/{item_id}")
    record = TASKS[task](rng, sink)
    return ToyExample({"id": item_id, "task": task, **record}, sink.items)


def write_toyworld(out: Path, n: int, seed: int, tasks: Sequence[str] | None = None, split: str = "train") -> dict:
    """Write `n` items of each task (default: `WORLD_TASKS`) to `out/<split>.jsonl`, media under `out/media/<split>/`.

    Video is saved as lossless .npy with a .gif preview beside it. Returns the counts:
    {"path", "split", "records", "tasks": {task: n}, "media": {modality: files}}.
    """
    if n < 0:
        raise InputError(f"toyworld: n must be >= 0, got {n}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", split):
        raise InputError(f"toyworld: split {split!r} must be letters, digits, '_' or '-' (it names files)")
    chosen = list(WORLD_TASKS) if tasks is None else list(tasks)
    unknown = [t for t in chosen if t not in TASKS]
    if unknown:
        raise InputError(f"toyworld: unknown tasks {', '.join(unknown)} (tasks: {', '.join(TASKS)})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{split}.jsonl"
    media_counts: Counter[str] = Counter()
    with (
        path.open("w", encoding="utf-8") as f,
        tqdm(total=n * len(chosen), desc=f"toyworld {split}", unit="item") as bar,
    ):
        for task in chosen:
            for index in range(n):
                example = generate(task, index, seed, split)
                for modality, relative, array in example.media:
                    media_io.write_media(modality, out / relative, array, SPEECH_SAMPLE_RATE)
                    if modality == "video":
                        media_io.write_video((out / relative).with_suffix(".gif"), array)
                    media_counts[modality] += 1
                media_counts["action"] += sum(part.get("type") == "action" for part in _parts(example.record))
                f.write(json.dumps(example.record, separators=(",", ":")) + "\n")
                bar.update()
    return {
        "path": str(path),
        "split": split,
        "records": n * len(chosen),
        "tasks": dict.fromkeys(chosen, n),
        "media": dict(sorted(media_counts.items())),
    }


def _parts(record: Record) -> list[dict[str, Any]]:
    return [part for message in record["messages"] for part in message["content"]]
