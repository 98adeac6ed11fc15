"""The toy world: renderers, training media, task records, puzzles and the writer, all deterministic."""

from __future__ import annotations

import ast
import operator
import random
import re
from collections import deque

import numpy as np
import pytest

from mmllm.data import oracles, toy_tasks
from mmllm.data.interleaved import read_jsonl, validate_record
from mmllm.data.media import read_video
from mmllm.data.toyworld import (
    ACTION_STEPS,
    COLORS,
    NUMBERS,
    RGB,
    SPEECH_SAMPLE_RATE,
    TONE_FREQUENCIES,
    Motion,
    Shape,
    caption,
    caption_corpus,
    render_image,
    render_video,
    sample_reach,
    sample_scene,
    speak,
    toy_media,
)
from mmllm.errors import InputError

MODALITY_SHAPES = {"image": (64, 64, 3), "video": (9, 64, 64, 3), "action": (ACTION_STEPS, 2)}


@pytest.mark.parametrize("modality", ["image", "audio", "video", "action"])
def test_toy_media_is_deterministic_in_the_seed(modality):
    first, again, other = toy_media(modality, 6, seed=1), toy_media(modality, 6, seed=1), toy_media(modality, 6, 2)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    for item in first:
        if modality == "audio":
            assert item.dtype == np.float32 and item.ndim == 1 and len(item) <= 2 * SPEECH_SAMPLE_RATE
        else:
            assert item.shape == MODALITY_SHAPES[modality]
    with pytest.raises(InputError, match="unknown modality"):
        toy_media("smell", 1, 0)


def test_images_use_only_black_and_the_palette_and_sizes_differ():
    scene = sample_scene(random.Random(0), 3)
    colours = {tuple(p) for p in render_image(scene).reshape(-1, 3)}
    assert colours <= {(0, 0, 0), *RGB.values()}
    large = render_image((Shape("circle", "red", "large", 1, 1),)).any(axis=2).sum()
    small = render_image((Shape("circle", "red", "small", 1, 1),)).any(axis=2).sum()
    assert 0.2 < small / large < 0.45  # radius about half: area about a quarter to a third
    masks = {s: render_image((Shape(s, "white", "large", 0, 0),)).any(axis=2) for s in ("circle", "square", "star")}
    assert len({m.tobytes() for m in masks.values()}) == 3


def test_captions_keep_the_existing_grammar():
    assert caption((Shape("circle", "red", "large", 0, 0),)) == "a large red circle at the top left"
    pair = (Shape("square", "blue", "small", 1, 0), Shape("star", "red", "large", 1, 2))
    assert caption(pair) == "the blue square is left of the red star"
    assert caption_corpus(5, 3) == caption_corpus(5, 3)


def test_speech_timing_and_tones():
    wave = speak("A red circle?")  # case and punctuation are dropped
    assert len(wave) == round((3 * 0.16 + 2 * 0.04) * SPEECH_SAMPLE_RATE)
    assert np.abs(wave).max() <= 0.5 + 1e-6
    gap = wave[round(0.16 * SPEECH_SAMPLE_RATE) : round(0.2 * SPEECH_SAMPLE_RATE)]
    assert not gap.any()
    assert min(TONE_FREQUENCIES) >= 300 and max(TONE_FREQUENCIES) <= 3500
    spectrum = np.abs(np.fft.rfft(speak(" ".join(COLORS))))
    peak_hz = np.fft.rfftfreq(len(speak(" ".join(COLORS))), 1 / SPEECH_SAMPLE_RATE)[spectrum > spectrum.max() / 10]
    assert peak_hz.min() > 250 and peak_hz.max() < 3600
    with pytest.raises(InputError, match="outside the toy vocabulary: banana"):
        speak("a red banana")


def test_video_moves_one_cell_and_still_stays():
    moving = render_video(Motion(Shape("circle", "red", "large", 1, 2), "left"))
    columns = np.array([np.nonzero(frame.any(axis=2))[1].mean() for frame in moving])  # ink centroid's x
    assert columns[0] - columns[-1] == pytest.approx(64 / 3, abs=0.5)  # one cell, a third of the width
    assert np.all(np.diff(columns) < -2) and np.all(np.diff(columns) > -3.4)  # at constant speed, 2.67 px a frame
    still = render_video(Motion(Shape("star", "blue", "small", 0, 0), "still"))
    assert all(np.array_equal(frame, still[0]) for frame in still)


def test_reaching_chunks_are_smooth_bounded_and_end_on_target():
    rng = random.Random(0)
    for _ in range(50):
        reach = sample_reach(rng)
        assert reach.actions.shape == (ACTION_STEPS, 2) and np.abs(reach.actions).max() <= 1
        assert all((s.row, s.col) != (1, 1) for s in reach.scene) and 2 <= len(reach.scene) <= 3
        speed = np.linalg.norm(reach.actions, axis=1)
        assert speed[0] < speed[4] and speed[-1] < speed[5]  # minimum jerk: slow, fast, slow


# ---------------------------------------------------------------- tasks


@pytest.mark.parametrize("task", list(toy_tasks.TASKS))
def test_every_task_gives_valid_deterministic_records(task):
    first = [toy_tasks.generate(task, i, seed=0) for i in range(4)]
    again = [toy_tasks.generate(task, i, seed=0) for i in range(4)]
    test_split = [toy_tasks.generate(task, i, seed=0, split="test") for i in range(4)]
    assert [e.record for e in first] == [e.record for e in again]
    assert [e.record["meta"] for e in first] != [e.record["meta"] for e in test_split]
    for example in first:
        validate_record(example.record, task)
        assert example.record["task"] == task and example.record["meta"]
        paths = [p["path"] for m in example.record["messages"] for p in m["content"] if "path" in p]
        assert paths == [path for _, path, _ in example.media]


def test_vqa_answers_agree_with_the_rendered_image():
    for i in range(60):
        example = toy_tasks.generate("toy-vqa", i, seed=4)
        meta = example.record["meta"]
        scene = oracles.read_image(example.media[0][2])
        assert [vars(s) for s in scene] == meta["scene"]
        question, answer = meta["question"], meta["answer"]
        if meta["question_type"] == "counting":
            noun = re.match(r"how many (\w+)", question).group(1)
            count = sum(s.color == noun for s in scene) if noun in COLORS else sum(s.shape + "s" == noun for s in scene)
            assert answer == NUMBERS[count]
        elif meta["question_type"] == "relation":
            a_color, a_shape, relation, b_color, b_shape = re.match(
                r"is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+)\?", question
            ).groups()
            a = next(s for s in scene if (s.color, s.shape) == (a_color, a_shape))
            b = next(s for s in scene if (s.color, s.shape) == (b_color, b_shape))
            assert (answer == "yes") == toy_tasks.RELATIONS[relation](a, b)
    kinds = {toy_tasks.generate("toy-vqa", i, seed=4).record["meta"]["question_type"] for i in range(60)}
    assert kinds == {"attribute", "relation", "counting"}


def _reachable_in_text(question: str) -> tuple[str, set[str], str]:
    """Solve a ProsQA question from its text alone."""
    name, start = re.match(r"(\w+) is a (\w+)\.", question).groups()
    rules = re.findall(r"Every (\w+) is a (\w+)\.", question)
    target = re.search(r"Is \w+ a (\w+)\?", question).group(1)
    seen, queue = {start}, deque([start])
    while queue:
        node = queue.popleft()
        for a, b in rules:
            if a == node and b not in seen:
                seen.add(b)
                queue.append(b)
    return target, seen, name


def test_prosqa_answers_and_traces_are_right_and_balanced():
    rng = random.Random(0)
    answers = []
    for _ in range(200):
        puzzle = toy_tasks.prosqa(rng, hops=3, distractors=5)
        target, reachable, name = _reachable_in_text(puzzle.question)
        assert puzzle.answer == ("yes" if target in reachable else "no")
        assert puzzle.question.count("Every ") == 2 * 3 + 5
        if puzzle.answer == "yes":
            assert len(puzzle.steps) == 3 + 1 and puzzle.steps[-1].endswith(f"{name} is a {target}.")
        answers.append(puzzle.answer)
    assert 80 <= answers.count("yes") <= 120
    with pytest.raises(InputError):
        toy_tasks.prosqa(rng, hops=20, distractors=5)


def test_the_prosqa_drill_spans_every_difficulty_up_to_the_eval_puzzles():
    seen = set()
    for i in range(300):
        meta = toy_tasks.generate("toy-prosqa-drill", i, seed=0).record["meta"]
        target, reachable, _ = _reachable_in_text(meta["question"])
        assert meta["answer"] == ("yes" if target in reachable else "no")
        seen.add((meta["hops"], meta["distractors"]))
    defaults = toy_tasks.PROSQA_DEFAULTS
    assert {hops for hops, _ in seen} == set(range(1, defaults["hops"] + 1))
    assert {extra for _, extra in seen} == set(range(defaults["distractors"] + 1))
    assert "toy-prosqa-drill" not in toy_tasks.WORLD_TASKS  # written only when asked for


ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _evaluate(node: ast.AST) -> int:
    if isinstance(node, ast.Constant):
        return node.value
    return ARITHMETIC[type(node.op)](_evaluate(node.left), _evaluate(node.right))


def test_arithmetic_answers_and_traces_are_right():
    rng = random.Random(0)
    for operations in (1, 4, 6):
        puzzle = toy_tasks.arithmetic(rng, operations=operations)
        expression = puzzle.question.removeprefix("Compute ").removesuffix(".")
        assert str(_evaluate(ast.parse(expression, mode="eval").body)) == puzzle.answer
        assert len(puzzle.steps) == operations and puzzle.steps[-1].endswith(f"= {puzzle.answer}")
        for step in puzzle.steps:
            left, result = step.split(" = ")
            assert _evaluate(ast.parse(left, mode="eval").body) == int(result)


def test_visual_count_answer_matches_the_oracle_reading_of_both_images():
    answers = []
    for i in range(30):
        example = toy_tasks.generate("toy-visual-count", i, seed=0)
        meta = example.record["meta"]
        readings = [oracles.read_image(array) for _, _, array in example.media]
        counts = [sum(meta["kind"] in (s.shape, s.color) for s in reading) for reading in readings]
        assert counts == meta["counts"]
        expected = "same" if counts[0] == counts[1] else ("first" if counts[0] > counts[1] else "second")
        assert meta["answer"] == expected and example.record["messages"][1]["content"][0]["text"].endswith(expected)
        answers.append(expected)
    assert set(answers) == {"first", "second", "same"}


# ---------------------------------------------------------------- writer


def test_writer_is_deterministic_extends_and_separates_splits(tmp_path):
    tasks = ["toy-caption", "toy-motion", "toy-act", "toy-speak", "toy-arith"]
    small = toy_tasks.write_toyworld(tmp_path / "a", n=2, seed=5, tasks=tasks)
    toy_tasks.write_toyworld(tmp_path / "b", n=2, seed=5, tasks=tasks)
    larger = toy_tasks.write_toyworld(tmp_path / "c", n=3, seed=5, tasks=tasks)
    held_out = toy_tasks.write_toyworld(tmp_path / "a", n=2, seed=5, tasks=tasks, split="test")
    assert small["records"] == 10 and small["tasks"] == dict.fromkeys(tasks, 2)
    assert small["media"] == {"action": 2, "audio": 2, "image": 4, "video": 2}
    lines = (tmp_path / "a" / "train.jsonl").read_text().splitlines()
    assert lines == (tmp_path / "b" / "train.jsonl").read_text().splitlines()
    for path in sorted((tmp_path / "a" / "media" / "train").rglob("*.*")):
        assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes()
    assert set(lines) < set((tmp_path / "c" / "train.jsonl").read_text().splitlines())
    assert larger["records"] == 15 and held_out["split"] == "test"
    train = list(read_jsonl(tmp_path / "a" / "train.jsonl", check_media=True))
    test = list(read_jsonl(tmp_path / "a" / "test.jsonl", check_media=True))
    assert {r["id"] for r in train}.isdisjoint(r["id"] for r in test)
    assert [r["meta"] for r in train] != [r["meta"] for r in test]
    video = next(r for r in train if r["task"] == "toy-motion")["messages"][0]["content"][0]["path"]
    assert (tmp_path / "a" / video).with_suffix(".gif").is_file()
    assert oracles.read_video(read_video(tmp_path / "a" / video)).direction == train[2]["meta"]["direction"]
    with pytest.raises(InputError, match="unknown tasks toy-nope"):
        toy_tasks.write_toyworld(tmp_path / "d", n=1, seed=0, tasks=["toy-nope"])
    with pytest.raises(InputError, match="split"):
        toy_tasks.write_toyworld(tmp_path / "d", n=1, seed=0, split="../up")
