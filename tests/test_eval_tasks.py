"""Toy-world eval tasks: parsers invert the grammar, references score perfect, garbage scores worst, reports render."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from mmllm.data.toyworld import (
    ACTION_STEPS,
    DIRECTIONS,
    SPEECH_SAMPLE_RATE,
    Motion,
    Shape,
    caption,
    motion_caption,
    reach_actions,
    render_image,
    render_video,
    sample_motion,
    sample_scene,
    speak,
)
from mmllm.errors import InputError
from mmllm.evaluation import report
from mmllm.evaluation.metrics import edit_distance, exact_match, mean_and_stderr, word_error_rate
from mmllm.evaluation.tasks import TASKS, EvalItem, ReplyPart, get_task, list_tasks, prompt_text
from mmllm.evaluation.toy import (
    TEXT_MAX_NEW_TOKENS,
    WORST_REACH_ERROR,
    CaptionFacts,
    MotionFacts,
    ShapeFacts,
    parse_caption,
    parse_motion_caption,
    stated_facts,
)

GENERATE_TASKS = (
    "toy-caption",
    "toy-vqa",
    "toy-draw",
    "toy-transcribe",
    "toy-speak",
    "toy-motion",
    "toy-animate",
    "toy-act",
    "toy-interleaved",
)
TEXT_TASKS = ("toy-caption", "toy-vqa", "toy-transcribe", "toy-motion")
BEST = {"accuracy": 1.0, "direction_accuracy": 1.0, "wer": 0.0, "final_error": 0.0, "parts_score": 1.0}
WORST = {"accuracy": 0.0, "direction_accuracy": 0.0, "wer": 1.0, "final_error": WORST_REACH_ERROR, "parts_score": 0.0}


def text_reply(text: str) -> list[ReplyPart]:
    return [ReplyPart("text", text=text)]


def media_types(item: EvalItem) -> set[str]:
    parts = item.prompt if item.prompt_kind == "document" else [p for m in item.prompt for p in m["content"]]
    return {part["type"] for part in parts} - {"text"}


# ---------------------------------------------------------------- parsers


def test_caption_parser_inverts_caption_on_random_scenes():
    rng = random.Random(0)
    scenes = [sample_scene(rng, 1 + i % 2) for i in range(1000)]
    for scene in scenes:
        assert parse_caption(caption(scene)) == stated_facts(scene)
        messy = "  " + caption(scene).upper().replace(" ", "   ") + " . "
        assert parse_caption(messy) == stated_facts(scene)


def test_caption_parser_reads_hand_written_captions_and_rejects_others():
    assert parse_caption("A large red circle at the top left.") == CaptionFacts(
        (ShapeFacts("circle", "red", "large", "top left"),)
    )
    assert parse_caption("a small white star at the center") == CaptionFacts(
        (ShapeFacts("star", "white", "small", "center"),)
    )
    assert parse_caption("the blue square is right of the red star") == CaptionFacts(
        (ShapeFacts("square", "blue"), ShapeFacts("star", "red")), "right of"
    )
    for garbage in ("", "a large red circle", "a large red circle at the top", "the red circle is near the blue star"):
        assert parse_caption(garbage) is None
    assert parse_caption("a large red circle at the top left and more") is None


def test_motion_parser_inverts_motion_caption():
    rng = random.Random(1)
    motions = [sample_motion(rng) for _ in range(500)]
    assert {m.direction for m in motions} == set(DIRECTIONS)
    for motion in motions:
        expected = MotionFacts(motion.shape.shape, motion.shape.color, motion.direction)
        assert parse_motion_caption(motion_caption(motion)) == expected
        assert parse_motion_caption(motion_caption(motion).title() + "!") == expected
    assert parse_motion_caption("a red circle moving sideways") is None
    assert parse_motion_caption("a red circle standing") is None


# ---------------------------------------------------------------- metrics


def test_word_error_rate_on_hand_computed_cases():
    assert word_error_rate(["a", "b", "c"], ["a", "b", "c"]) == 0.0
    assert word_error_rate(["a", "b", "c"], ["a", "x", "c"]) == pytest.approx(1 / 3)  # one substitution
    assert word_error_rate(["a", "b", "c", "d"], ["a", "c", "d"]) == pytest.approx(1 / 4)  # one deletion
    assert word_error_rate(["a", "b"], ["a", "b", "c", "d"]) == 1.0  # two insertions over two words
    ref, hyp = ["the", "cat", "sat", "on", "the", "mat"], ["cat", "sat", "in", "the", "the", "mat"]
    assert edit_distance(ref, hyp) == 3  # delete "the", "on" -> "in", insert "the"
    assert word_error_rate(ref, hyp) == 0.5
    assert edit_distance(list("kitten"), list("sitting")) == 3
    assert word_error_rate([], []) == 0.0
    assert word_error_rate([], ["a", "b"]) == 2.0
    assert word_error_rate(["a"], []) == 1.0


def test_exact_match_and_stderr():
    assert exact_match("Top  Left.", "top left") == 1.0
    assert exact_match("top right", "top left") == 0.0
    mean, stderr = mean_and_stderr([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert stderr == pytest.approx(math.sqrt(5 / 3) / 2)  # sample variance 5/3, n = 4
    assert mean_and_stderr([7.0]) == (7.0, 0.0)


# ---------------------------------------------------------------- registry and items


def test_registry_knows_the_toy_tasks_and_refuses_unknown_names():
    assert set(GENERATE_TASKS) | {"toy-text-ppl"} <= {task.name for task in list_tasks()}
    assert get_task("toy-draw") is TASKS["toy-draw"]
    with pytest.raises(InputError, match="unknown eval task 'nope'.*toy-caption.*toy-act"):
        get_task("nope")
    assert (get_task("toy-draw").input_modalities, get_task("toy-draw").output_modalities) == ((), ("image",))
    assert (get_task("toy-act").input_modalities, get_task("toy-act").output_modalities) == (("image",), ("action",))
    every = {"image", "audio", "video", "action"}
    assert set(get_task("toy-interleaved").input_modalities) == set(get_task("toy-interleaved").output_modalities)
    assert set(get_task("toy-interleaved").output_modalities) == every


@pytest.mark.parametrize("name", GENERATE_TASKS)
def test_items_declare_their_modalities_and_carry_arrays(name):
    task = get_task(name)
    items = task.items(6, seed=0)
    assert len(items) >= 6
    assert len({item.id for item in items}) == len(items)
    for item in items:
        assert media_types(item) <= set(task.input_modalities)
        assert item.reply_modality == "text" or item.reply_modality in task.output_modalities
        parts = item.prompt if item.prompt_kind == "document" else [p for m in item.prompt for p in m["content"]]
        for part in parts:
            assert "path" not in part and "values" not in part
            if part["type"] == "audio":
                assert part["sample_rate"] == SPEECH_SAMPLE_RATE and part["array"].dtype == np.float32
            if part["type"] == "action":
                assert part["array"].shape == (ACTION_STEPS, 2) and part["array"].dtype == np.float32
            if part["type"] in ("image", "video"):
                assert part["array"].dtype == np.uint8 and part["array"].shape[-3:] == (64, 64, 3)
        if item.prompt_kind == "chat":
            assert all(message["role"] in ("system", "user") for message in item.prompt)


def test_items_are_deterministic_per_seed_and_differ_across_seeds():
    for name in ("toy-draw", "toy-speak", "toy-interleaved"):
        task = get_task(name)
        first, again, other = task.items(5, seed=0), task.items(5, seed=0), task.items(5, seed=1)
        assert [prompt_text(i) for i in first] == [prompt_text(i) for i in again]
        assert [i.meta for i in first] == [i.meta for i in again]
        assert [prompt_text(i) for i in first] != [prompt_text(i) for i in other]
    audio = [get_task("toy-transcribe").items(3, seed=0)[2].prompt[0]["content"][0]["array"] for _ in range(2)]
    assert np.array_equal(*audio)


def test_interleaved_items_are_document_prefixes_before_each_part():
    task = get_task("toy-interleaved")
    items = task.items(4, seed=2)
    assert len(items) >= 2 * 4  # 2-4 parts per document
    for item in items:
        assert item.prompt_kind == "document"
        assert len(item.prompt) == item.meta["part"]  # everything before the part, nothing after
        assert item.prompt[-1]["type"] == "text"  # each medium follows the text that announces it
        assert item.reply_modality == item.meta["modality"]


def test_text_replies_fit_max_new_tokens():
    for name in TEXT_TASKS:
        for item in get_task(name).items(200, seed=0):
            assert len(item.reference.encode()) < TEXT_MAX_NEW_TOKENS == item.max_new_tokens


# ---------------------------------------------------------------- scoring: oracle check, garbage, wrong answers


@pytest.mark.parametrize("name", GENERATE_TASKS)
def test_reference_reply_scores_perfectly(name):
    task = get_task(name)
    for item in task.items(8, seed=3):
        reply = text_reply(item.reference) if name in TEXT_TASKS else task.reference_reply(item)
        scores = task.score(item, reply)
        # toy-act: reference steps are stored rounded to 1e-5, so the reach ends within ~1e-6 of the target
        assert scores[task.metric] == pytest.approx(BEST[task.metric], abs=1e-4), (item.id, scores)
        assert scores.get("unreadable", 0.0) == 0.0
        for key, value in scores.items():
            if key.endswith(("accuracy", "success", "exact", "score")):
                assert value == 1.0, (item.id, key)


@pytest.mark.parametrize("name", GENERATE_TASKS)
def test_empty_and_missing_replies_score_worst(name):
    task = get_task(name)
    for item in task.items(4, seed=0):
        for reply in ([], text_reply(""), [ReplyPart(item.reply_modality)]):
            scores = task.score(item, reply)
            assert scores[task.metric] == WORST[task.metric]
            if item.reply_modality != "text" or name in ("toy-caption", "toy-motion"):
                assert scores["unreadable"] == 1.0


def test_noise_media_is_unreadable_and_scores_zero():
    noise = np.random.default_rng(0)
    draw, speak_task, animate, act = (get_task(n) for n in ("toy-draw", "toy-speak", "toy-animate", "toy-act"))
    image_item, speech_item, video_item, act_item = (t.items(1, seed=0)[0] for t in (draw, speak_task, animate, act))
    for image in (noise.integers(0, 256, (64, 64, 3), dtype=np.uint8), np.zeros((32, 32, 3), np.uint8)):
        scores = draw.score(image_item, [ReplyPart("image", media=image)])
        assert scores["accuracy"] == 0.0 and scores["unreadable"] == 1.0
    wave = noise.normal(0, 0.3, SPEECH_SAMPLE_RATE).astype(np.float32)
    for bad in (wave, np.array(["not", "audio"])):
        scores = speak_task.score(speech_item, [ReplyPart("audio", media=bad, sample_rate=SPEECH_SAMPLE_RATE)])
        assert scores["wer"] == 1.0 and scores["unreadable"] == 1.0
    clip = noise.integers(0, 256, (9, 64, 64, 3), dtype=np.uint8)
    scores = animate.score(video_item, [ReplyPart("video", media=clip)])
    assert scores["accuracy"] == 0.0 and scores["unreadable"] == 1.0
    for bad in (np.zeros((10, 3), np.float32), np.array([["a", "b"]])):
        scores = act.score(act_item, [ReplyPart("action", media=bad)])
        assert scores["final_error"] == WORST_REACH_ERROR and scores["unreadable"] == 1.0
    assert get_task("toy-caption").score(get_task("toy-caption").items(1, 0)[0], text_reply("banana"))["unreadable"]


def test_wrong_captions_lose_exactly_the_wrong_attribute():
    task = get_task("toy-caption")
    one = Shape("circle", "red", "large", 0, 0)
    item = replace(task.items(1, seed=0)[0], meta={"scene": [vars(one)]})
    scores = task.score(item, text_reply("a large blue circle at the top left"))
    assert scores["accuracy"] == 0.0 and scores["color_accuracy"] == 0.0
    assert scores["shape_accuracy"] == scores["size_accuracy"] == scores["position_accuracy"] == 1.0
    a, b = Shape("square", "blue", "small", 0, 0), Shape("star", "red", "large", 2, 2)
    item = replace(item, meta={"scene": [vars(a), vars(b)]})
    assert task.score(item, text_reply("the blue square is left of the red star"))["accuracy"] == 1.0
    assert task.score(item, text_reply("the red star is right of the blue square"))["accuracy"] == 1.0  # same claim
    assert task.score(item, text_reply("the blue square is above the red star"))["accuracy"] == 1.0  # also true
    wrong = task.score(item, text_reply("the blue square is right of the red star"))
    assert wrong["accuracy"] == wrong["relation_accuracy"] == 0.0 and wrong["shape_accuracy"] == 1.0
    assert task.score(item, text_reply("a small blue square at the top left"))["accuracy"] == 0.0  # one of two


def test_wrong_media_are_read_as_wrong():
    draw = get_task("toy-draw")
    item = next(i for i in draw.items(20, seed=0) if len(i.meta["scene"]) == 1)
    (s,) = [Shape(**f) for f in item.meta["scene"]]
    recoloured = replace(s, color="green" if s.color != "green" else "red")
    scores = draw.score(item, [ReplyPart("image", media=render_image((recoloured,)))])
    assert scores["accuracy"] == 0.0 and scores["color_accuracy"] == 0.0 and scores["shape_accuracy"] == 1.0
    extra = render_image((s, Shape("star" if s.shape != "star" else "circle", "white", "small", (s.row + 1) % 3, 0)))
    assert draw.score(item, [ReplyPart("image", media=extra)])["accuracy"] == 0.0  # an undescribed shape

    animate = get_task("toy-animate")
    item = next(i for i in animate.items(20, seed=0) if i.meta["direction"] == "still")
    shape = Shape(item.meta["shape"], item.meta["color"], item.meta["size"], 1, 0)
    scores = animate.score(item, [ReplyPart("video", media=render_video(Motion(shape, "right")))])
    assert scores["direction_accuracy"] == 0.0 and scores["shape_accuracy"] == scores["color_accuracy"] == 1.0

    act = get_task("toy-act")
    item = act.items(1, seed=0)[0]
    x, y = item.meta["target_xy"]
    scores = act.score(item, [ReplyPart("action", media=reach_actions((-x, -y)))])  # the mirror image of the target
    assert scores["success"] == 0.0 and scores["final_error"] == pytest.approx(math.hypot(x, y))

    speak_task = get_task("toy-speak")
    item = speak_task.items(1, seed=0)[0]
    said = speak(" ".join([*item.meta["words"][:-1], "yes"]))
    scores = speak_task.score(item, [ReplyPart("audio", media=said, sample_rate=SPEECH_SAMPLE_RATE)])
    if item.meta["words"][-1] != "yes":
        assert scores["wer"] == pytest.approx(1 / len(item.meta["words"])) and scores["exact"] == 0.0


# ---------------------------------------------------------------- chance


@pytest.mark.parametrize("name", GENERATE_TASKS)
def test_chance_replies_are_valid_outputs_scored_near_chance(name):
    task = get_task(name)
    items = task.items(40, seed=0)
    rng = random.Random(0)
    scores = [task.score(item, task.chance_reply(item, rng)) for item in items]
    summary = task.aggregate(scores)
    assert summary.get("unreadable", 0.0) == 0.0  # a random valid output, never garbage
    if name == "toy-act":  # zero motion leaves the gripper at the centre, off every cell's shape
        expected = [math.hypot(*item.meta["target_xy"]) / 2 for item in items]
        assert summary["final_error"] == pytest.approx(sum(expected) / len(expected))
        assert summary["final_error"] > 0.1 and summary["success"] == 0.0
    elif name == "toy-vqa":  # yes/no, counts and attributes: the majority answer is right a fair part of the time
        assert 0.2 <= summary["accuracy"] <= 0.8
    elif name in ("toy-transcribe", "toy-speak"):
        assert 0.5 <= summary["wer"] <= 1.0
    else:
        assert summary[task.metric] <= 0.35  # several independent attributes must all be right by luck


# ---------------------------------------------------------------- perplexity task


def test_text_perplexity_items_and_aggregate():
    task = get_task("toy-text-ppl")
    assert task.kind == "perplexity" and all(get_task(n).kind == "generate" for n in GENERATE_TASKS)
    items = task.items(6, seed=0)
    assert all(i.prompt_kind == "document" and i.max_new_tokens == 0 and len(i.prompt) == 1 for i in items)
    assert all(i.prompt[0]["type"] == "text" and i.prompt[0]["text"] == i.reference for i in items)
    assert parse_caption(items[0].reference) is not None and parse_motion_caption(items[1].reference) is not None
    summary = task.aggregate([{"nll": 2.0, "tokens": 2}, {"nll": 4.0, "tokens": 2}])
    assert summary["perplexity"] == pytest.approx(math.exp(1.5)) and summary["nll_per_token"] == 1.5
    uniform = task.aggregate([{"nll": 7 * math.log(50), "tokens": 7}])  # a uniform model over 50 tokens
    assert uniform["perplexity"] == pytest.approx(task.chance_perplexity(50)) == 50.0
    with pytest.raises(NotImplementedError):
        task.chance_reply(items[0], random.Random(0))


# ---------------------------------------------------------------- reports


def hand_results(tmp_path) -> dict:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 255, 255)]
    samples = []
    for i, colour in enumerate(colours):
        image = np.zeros((64, 64, 3), np.uint8)
        image[:, ::2] = colour  # 1 px stripes: any smoothing in the upscale would blur them
        Image.fromarray(image).save(tmp_path / f"draw-{i}.png")
        prompt = "user: Draw a large red circle at the top left. " * (1 + 3 * (i == 0))  # one long prompt
        samples.append(
            {
                "id": f"d{i}",
                "prompt": prompt,
                "reference": "",
                "output": "<image 64x64x3>",
                "media": [f"draw-{i}.png"],
                "scores": {"accuracy": float(i % 2)},
            }
        )
    return {
        "model": {"path": "runs/tiny", "hash": "abc123"},
        "seed": 0,
        "command": ["mmllm", "eval"],
        "tasks": {
            "toy-draw": {
                "metric": "accuracy",
                "higher_is_better": True,
                "n": 16,
                "metrics": {"accuracy": 0.875, "accuracy_stderr": 0.05},
                "references": {"chance": {"accuracy": 0.0}},
                "samples": samples,
            },
            "toy-speak": {
                "metric": "wer",
                "higher_is_better": False,
                "n": 8,
                "metrics": {"wer": 0.123},
                "references": {"chance": {"wer": 0.9}, "untrained": {"wer": 1.0}},
                "samples": [],
            },
        },
    }


def test_results_table_rows_and_formatting(tmp_path):
    table = report.results_table(hand_results(tmp_path))
    lines = table.splitlines()
    assert lines[0].startswith("| task | metric | model | chance | untrained | n |")
    assert "| toy-draw | accuracy ↑ | 87.5% ± 5.0 | 0.0% | — | 16 |" in lines
    assert "| toy-speak | wer ↓ | 0.123 | 0.900 | 1.000 | 8 |" in lines
    assert len(lines) == 4


def test_image_grid_and_markdown(tmp_path):
    results = hand_results(tmp_path)
    out = report.image_grid(results, tmp_path, tmp_path / "grid.png")
    assert out == tmp_path / "grid.png"
    with Image.open(out) as grid:
        assert grid.size == (4 * report.CELL_WIDTH, 2 * report.CELL_HEIGHT)  # five images, four per row
        pixels = np.asarray(grid.convert("RGB"))
    left = (report.CELL_WIDTH - report.IMAGE_PX) // 2
    first = pixels[report.PAD : report.PAD + report.IMAGE_PX, left : left + report.IMAGE_PX]
    with Image.open(tmp_path / "draw-0.png") as source:
        doubled = np.asarray(source).repeat(2, axis=0).repeat(2, axis=1)
    assert np.array_equal(first, doubled)  # the first image, each pixel a 2x2 block: no smoothing
    second = pixels[report.PAD + 5, report.CELL_WIDTH + left]
    assert tuple(second) == (0, 255, 0)
    assert report.image_grid(results, tmp_path, tmp_path / "none.png", tasks=("toy-speak",)) is None
    assert report.image_grid(results, tmp_path, tmp_path / "two.png", max_items=2) is not None
    with Image.open(tmp_path / "two.png") as two:
        assert two.size == (2 * report.CELL_WIDTH, report.CELL_HEIGHT)

    figures = {"prefill_latency_ms": 12.34, "decode_tokens_per_s": 1234.5, "peak_memory_mb": 512.0}
    results["efficiency"] = results["tasks"]["toy-draw"]["efficiency"] = figures
    md = report.write_markdown(results, tmp_path, tmp_path / "report" / "eval.md")
    text = md.read_text(encoding="utf-8")
    assert "| toy-draw | 12.3 | 1,234 | 512 |" in text and "| all tasks | 12.3 | 1,234 | 512 |" in text
    assert "| toy-draw | accuracy ↑ | 87.5% ± 5.0 |" in text and "abc123" in text
    assert "](eval_images.png)" in text and (tmp_path / "report" / "eval_images.png").is_file()
