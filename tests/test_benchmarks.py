"""The standard benchmarks of `mmllm eval`: each reader on a tiny fixture in its official layout, each metric
against hand-computed values (the arithmetic is in the comments), bad input, and one run end to end."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
from pathlib import Path

import jiwer
import numpy as np
import pytest
import soundfile
from PIL import Image

from mmllm.cli import main
from mmllm.errors import InputError
from mmllm.evaluation.benchmarks.asr import asr_words, word_errors
from mmllm.evaluation.benchmarks.base import SHORT_ANSWER
from mmllm.evaluation.benchmarks.captions import CiderCorpus, bleu_statistics, caption_tokens, corpus_bleu
from mmllm.evaluation.benchmarks.choice import ANSWER_WITH_LETTER, chosen_letter
from mmllm.evaluation.benchmarks.vqa import (
    evalai_normalise,
    gqa_accuracy,
    normalise_prediction,
    process_digit_article,
    process_punctuation,
    textvqa_accuracy,
    vqa_accuracy,
    vqav2_accuracy,
)
from mmllm.evaluation.benchmarks.yes_no import MME_COGNITION, MME_PERCEPTION, mme_answer, pope_answer
from mmllm.evaluation.runner import resolve_tasks
from mmllm.evaluation.tasks import EvalItem, ReplyPart, get_task, prompt_text, read_prompt_media

# ---------------------------------------------------------------- fixture files in the official layouts


def write_image(path: Path, value: int = 128) -> Path:
    """An 8x8 flat image in the format the suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)
    return path


def png_base64(value: int = 128) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_json(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def answers(*counts: tuple[str, int]) -> list[str]:
    return [answer for answer, n in counts for _ in range(n)]


def make_vqav2(root: Path) -> Path:
    """Two good questions, one without an annotation, one with 9 answers, one annotation without question_id."""
    questions = [
        {"image_id": 42, "question": "What color is the bus?", "question_id": 420},
        {"image_id": 42, "question": "How many wheels?", "question_id": 421},
        {"image_id": 42, "question": "Unannotated?", "question_id": 422},
        {"image_id": 7, "question": "Nine answers?", "question_id": 70},
    ]
    vote = [
        {"answer": a, "answer_confidence": "yes", "answer_id": i}
        for i, a in enumerate(answers(("red", 3), ("blue", 7)))
    ]
    annotations = [
        {"question_id": 420, "image_id": 42, "answer_type": "other", "multiple_choice_answer": "blue", "answers": vote},
        {"question_id": 421, "image_id": 42, "answer_type": "number", "answers": [{"answer": "4"}] * 10},
        {"question_id": 70, "image_id": 7, "answer_type": "yes/no", "answers": [{"answer": "yes"}] * 9},
        {"image_id": 7, "answers": []},
    ]
    write_json(root / "v2_OpenEnded_mscoco_val2014_questions.json", {"questions": questions})
    write_json(root / "v2_mscoco_val2014_annotations.json", {"annotations": annotations})
    write_image(root / "val2014" / "COCO_val2014_000000000042.jpg")
    write_image(root / "val2014" / "COCO_val2014_000000000007.jpg")
    return root


def make_gqa(root: Path) -> Path:
    """Two good questions and one whose image file is missing."""
    questions = {
        "201307251": {"imageId": "n161313", "question": "Is it overcast?", "answer": "no", "types": {}},
        "201640614": {"imageId": "n161313", "question": "Who is wearing a shirt?", "answer": "girl"},
        "20968379": {"imageId": "n999999", "question": "Where is the image?", "answer": "nowhere"},
    }
    write_json(root / "testdev_balanced_questions.json", questions)
    write_image(root / "images" / "n161313.jpg")
    return root


def make_textvqa(root: Path) -> Path:
    """One good question and one without answers."""
    data = [
        {"question_id": 34602, "image_id": "003a8ae2ef43b901", "question": "what is the brand?",
         "answers": answers(("Coca-Cola's", 2), ("coca cola 's", 1), ("pepsi", 7)), "set_name": "val"},
        {"question_id": 34603, "image_id": "003a8ae2ef43b901", "question": "no answers?", "set_name": "val"},
    ]  # fmt: skip
    write_json(root / "TextVQA_0.5.1_val.json", {"dataset_type": "val", "dataset_version": "0.5.1", "data": data})
    write_image(root / "train_images" / "003a8ae2ef43b901.jpg")
    return root


POPE_ROWS = {
    "random": [("yes", "a dog"), ("yes", "a cat"), ("no", "a bus")],
    "adversarial": [("yes", "a cup"), ("no", "a car")],
}


def make_pope(root: Path) -> Path:
    """POPE's jsonl files (random and adversarial), plus one line that is not JSON and one with label "maybe"."""
    for split, rows in POPE_ROWS.items():
        lines = [
            json.dumps({"question_id": i, "image": "COCO_val2014_000000310196.jpg",
                        "text": f"Is there {thing} in the image?", "label": label})
            for i, (label, thing) in enumerate(rows, start=1)
        ]  # fmt: skip
        if split == "adversarial":
            lines += ["{not json", json.dumps({"question_id": 9, "image": "x.jpg", "text": "?", "label": "maybe"})]
        (root / f"coco_pope_{split}.json").parent.mkdir(parents=True, exist_ok=True)
        (root / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_image(root / "val2014" / "COCO_val2014_000000310196.jpg")
    return root


MME_FOLDERS = ("artwork", "celebrity", "landmark", "posters", "scene")  # the release's images/ + questions_answers_YN/


def make_mme(root: Path) -> Path:
    """Every subtask with one image (count: two), each with a Yes and a No question; color gets a second
    image whose txt has a line without a tab (malformed)."""
    for subtask in (*MME_PERCEPTION, *MME_COGNITION):
        folder = root / subtask
        images, texts = (
            (folder / "images", folder / "questions_answers_YN") if subtask in MME_FOLDERS else (folder, folder)
        )
        for k in range(2 if subtask == "count" else 1):
            write_image(images / f"{subtask}_{k}.png")
            texts.mkdir(parents=True, exist_ok=True)
            asked = [
                f"Is this {subtask} {k}? Please answer yes or no.\tYes",
                f"Is this a fake {k}? Please answer yes or no.\tNo",
            ]
            (texts / f"{subtask}_{k}.txt").write_text("\n".join(asked) + "\n", encoding="utf-8")
    write_image(root / "color" / "color_bad.png")
    (root / "color" / "color_bad.txt").write_text("Is it red? Yes\nIs it blue?\tNo\n", encoding="utf-8")
    return root


MMBENCH_HEADER = [
    "index",
    "question",
    "hint",
    "A",
    "B",
    "C",
    "D",
    "answer",
    "category",
    "image",
    "l2-category",
    "split",
]


def make_mmbench(path: Path) -> Path:
    """Question 0 (4 options, answer B, a hint), question 1 (2 options, answer A, its image a reference to row 0),
    question 0's official rotated copy (index 1000000, not read), and a row whose answer is no option."""
    image = png_base64()
    rows = [
        ["0", "What is in the picture?", "A photo.", "cat", "dog", "bird", "fish", "B", "identity", image, "CP", "dev"],
        ["1", "Is it day or night?", "nan", "day", "night", "", "", "A", "scene", "0", "CP", "dev"],
        [
            "1000000",
            "What is in the picture?",
            "A photo.",
            "dog",
            "bird",
            "fish",
            "cat",
            "A",
            "identity",
            "0",
            "CP",
            "dev",
        ],
        ["2", "Broken?", "", "yes", "no", "", "", "E", "scene", image, "CP", "dev"],
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file, delimiter="\t")
        writer.writerow(MMBENCH_HEADER)
        writer.writerows(rows)
    return path


def make_scienceqa(root: Path) -> Path:
    """Test split: one image question (answer A), one text question (answer C), one answer out of range, one pid
    missing from problems.json; a train problem that is not scored."""
    problems = {
        "5": {"question": "Which is a mammal?", "choices": ["whale", "shark"], "answer": 0, "hint": "",
              "image": "image.png", "split": "test", "subject": "natural science"},
        "9": {"question": "What is 2 + 2?", "choices": ["3", "5", "4"], "answer": 2, "hint": "Count carefully.",
              "image": None, "split": "test"},
        "11": {"question": "Out of range?", "choices": ["a", "b"], "answer": 5, "hint": "", "image": None,
               "split": "test"},
        "1": {"question": "Train?", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None, "split": "train"},
    }  # fmt: skip
    write_json(root / "problems.json", problems)
    write_json(root / "pid_splits.json", {"train": ["1"], "val": [], "test": ["5", "9", "11", "404"]})
    write_image(root / "images" / "test" / "5" / "image.png")
    return root


def make_coco(root: Path) -> Path:
    """Two captioned images, one image without captions, one annotation without its caption."""
    data = {
        "info": {},
        "images": [
            {"id": 1, "file_name": "COCO_val2014_000000000001.jpg", "height": 8, "width": 8},
            {"id": 2, "file_name": "COCO_val2014_000000000002.jpg", "height": 8, "width": 8},
            {"id": 3, "file_name": "COCO_val2014_000000000003.jpg", "height": 8, "width": 8},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "A cat sits on a mat."},
            {"id": 11, "image_id": 1, "caption": "A cat on the mat"},
            {"id": 12, "image_id": 2, "caption": "A dog runs in the park."},
            {"id": 13, "image_id": 2},
        ],
    }
    write_json(root / "annotations" / "captions_val2014.json", data)
    for i in (1, 2, 3):
        write_image(root / "val2014" / f"COCO_val2014_00000000000{i}.jpg")
    return root


def make_librispeech(root: Path) -> Path:
    """Speaker 19, chapter 198: two utterances with audio, one line without a transcript, one without its flac."""
    chapter = root / "19" / "198"
    chapter.mkdir(parents=True)
    lines = ["19-198-0000 THE CAT SAT ON THE MAT", "19-198-0001 HELLO WORLD", "19-198-0002", "19-198-0003 NO AUDIO"]
    (chapter / "19-198.trans.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tone = 0.1 * np.sin(2 * np.pi * 440 * np.arange(8000) / 16000)  # half a second of A4 at 16 kHz
    for utterance in ("19-198-0000", "19-198-0001", "19-198-0002"):
        soundfile.write(chapter / f"{utterance}.flac", tone.astype(np.float32), 16000)
    return root


def say(text: str) -> list[ReplyPart]:
    return [ReplyPart("text", text=text)]


def words(text: str) -> list[str]:
    return text.split()


def user_text(item: EvalItem) -> str:
    return next(part["text"] for part in item.prompt[0]["content"] if part["type"] == "text")


# ---------------------------------------------------------------- VQAv2, GQA, TextVQA


def test_vqa_normalisation_follows_the_official_script():
    assert process_punctuation("yes.") == "yes"  # a period not before a digit goes
    assert process_punctuation("3.5") == "3.5"  # ... one before a digit stays
    assert process_punctuation("red, white") == "red white"  # ", " touches a space: deleted
    assert process_punctuation("a/b") == "a b"  # "/" touches no space: a space instead
    assert process_punctuation("1,000 / 2") == "1000  2"  # a comma between digits: every mark deleted
    assert process_digit_article("The Two dogs") == "2 dogs"  # lower case, number word, article dropped
    assert process_digit_article("none") == "0" and process_digit_article("dont know") == "don't know"
    assert normalise_prediction("\tTwo.\n") == "2"
    assert normalise_prediction("A dog!") == "dog"
    assert evalai_normalise("Coca-Cola's?") == "coca cola 's"  # "'s" split off, "-" between letters a space


def test_vqa_accuracy_on_hand_computed_cases():
    # 3 say yes, 7 say no; reply yes. Leaving out a "yes" annotator: 2 others agree -> 2/3 (3 such);
    # leaving out a "no" annotator: 3 agree -> min(3/3, 1) = 1 (7 such). (3 * 2/3 + 7 * 1) / 10 = 0.9
    assert vqa_accuracy("yes", answers(("yes", 3), ("no", 7))) == pytest.approx(0.9)
    # 2 say 2, 8 say 3; reply "two" -> "2". Out a "2": 1 agrees -> 1/3 (2 such); out a "3": 2 agree -> 2/3 (8 such).
    # (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 0.6
    assert vqav2_accuracy("two", answers(("2", 2), ("3", 8))) == pytest.approx(0.6)
    # 4 agree: any 9 of the 10 still hold 3 of them -> 1.0; nobody agrees -> 0.0
    assert vqa_accuracy("red", answers(("red", 4), ("blue", 6))) == 1.0
    assert vqa_accuracy("green", answers(("red", 4), ("blue", 6))) == 0.0
    # VQAv2 normalises annotators only when they disagree (punctuation alone); TextVQA normalises everyone fully.
    assert vqav2_accuracy("coca cola", ["Coca Cola"] * 10) == 0.0
    assert textvqa_accuracy("COCA COLA", ["Coca Cola"] * 10) == 1.0
    assert gqa_accuracy("The table.", "table") == 1.0 and gqa_accuracy("tables", "table") == 0.0


def test_vqav2_reader_items_and_scores(tmp_path):
    task = get_task("vqav2").with_data(make_vqav2(tmp_path / "vqav2"))
    assert task.size == 2 and len(task.skipped) == 3
    assert any("annotations[3]: no 'question_id'" in s for s in task.skipped)
    assert any("questions[2]: no annotation" in s for s in task.skipped)
    assert any("questions[3]: 'answers' must hold 10 answers" in s for s in task.skipped)
    first, second = task.items(10, seed=0)
    assert first.id == "vqav2-420" and first.reference == "blue" and first.max_new_tokens == 16
    assert user_text(first) == f"What color is the bus?\n{SHORT_ANSWER}"
    assert prompt_text(first) == f"user: <image COCO_val2014_000000000042.jpg> What color is the bus?\n{SHORT_ANSWER}"
    assert read_prompt_media(first)[0]["content"][0]["array"].shape == (8, 8, 3)  # read when its batch is encoded
    # "Red." -> "red", said by 3 of 10 -> 0.9 (as in the hand-computed case above)
    assert task.score(first, say("Red.")) == pytest.approx({"accuracy": 0.9, "other_accuracy": 0.9})
    assert task.score(second, say("four")) == {"accuracy": 1.0, "number_accuracy": 1.0}
    assert task.chance_reply(first, rng=None)[0].text == "blue"  # the top answer: "blue" (7 of 10) vs "4"
    assert [item.id for item in task.items(1, seed=5)] == ["vqav2-420"]  # --limit takes rows in file order


def test_gqa_and_textvqa_readers_and_scores(tmp_path):
    gqa = get_task("gqa").with_data(make_gqa(tmp_path / "gqa"))
    assert gqa.size == 2 and len(gqa.skipped) == 1 and "question 20968379: no file" in gqa.skipped[0]
    overcast, who = gqa.items(2, 0)
    assert user_text(overcast) == f"Is it overcast?\n{SHORT_ANSWER}"
    assert gqa.score(overcast, say("No.")) == {"accuracy": 1.0} and gqa.score(who, say("boy")) == {"accuracy": 0.0}

    textvqa = get_task("textvqa").with_data(make_textvqa(tmp_path / "textvqa"))
    assert textvqa.size == 1 and "data[1]: 'answers' must hold 10 answers" in textvqa.skipped[0]
    (item,) = textvqa.items(5, 0)
    # "Coca-Cola's" (2) and "coca cola 's" (1) normalise alike: 3 of 10 -> 0.9; "pepsi" (7) -> 1.0
    assert textvqa.score(item, say("coca cola's")) == pytest.approx({"accuracy": 0.9})
    assert textvqa.score(item, say("Pepsi")) == {"accuracy": 1.0}


# ---------------------------------------------------------------- POPE and MME


def test_pope_answer_reads_the_first_sentence_as_the_official_script():
    assert pope_answer("Yes, there is a dog.") == "yes"
    assert pope_answer("No, there is no dog.") == "no"
    assert pope_answer("There is not a dog in the image") == "no"
    assert pope_answer("Yes. No dog is missing.") == "yes"  # only the first sentence counts
    assert pope_answer("") == "yes"  # no negation word


def test_pope_reader_and_metrics(tmp_path):
    task = get_task("pope").with_data(make_pope(tmp_path / "pope"))
    assert task.size == 5 and len(task.skipped) == 2
    assert "coco_pope_adversarial.json line 3: not JSON" in task.skipped[0]
    assert "line 4: label 'maybe' is not yes or no" in task.skipped[1]
    items = task.items(10, 0)
    assert [i.meta["label"] for i in items] == ["yes", "yes", "no", "yes", "no"]
    assert user_text(items[0]) == f"Is there a dog in the image?\n{SHORT_ANSWER}"
    replies = ["Yes", "No, there is not.", "yes", "There is a cup.", "No."]  # said: yes, no, yes, yes, no
    metrics = task.aggregate([task.score(i, say(r)) for i, r in zip(items, replies, strict=True)])
    # labels y y n | y n, said y n y | y n: TP = 2 (items 1, 4), FN = 1 (2), FP = 1 (3), TN = 1 (5).
    # accuracy 3/5; precision 2/(2+1); recall 2/(2+1); F1 = 2*2 / (2*2 + 1 + 1) = 2/3; yes ratio 3/5
    assert metrics["accuracy"] == pytest.approx(0.6)
    assert metrics["precision"] == pytest.approx(2 / 3) and metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(2 / 3) and metrics["yes_ratio"] == pytest.approx(0.6)
    # random split: TP 1, FN 1, FP 1, TN 0 -> accuracy 1/3, F1 = 2/(2+1+1) = 0.5
    assert metrics["random_accuracy"] == pytest.approx(1 / 3) and metrics["random_f1"] == pytest.approx(0.5)
    # adversarial split: TP 1, TN 1 -> everything 1.0
    assert metrics["adversarial_f1"] == 1.0 and metrics["adversarial_accuracy"] == 1.0
    assert "popular_f1" not in metrics  # no file for that split
    # all "no" on a yes/no mix: no positives said, TP = 0 -> precision undefined (NaN), recall 0, F1 0
    all_no = task.aggregate([task.score(i, say("No")) for i in items])
    assert math.isnan(all_no["precision"]) and all_no["recall"] == 0.0 and all_no["f1"] == 0.0


def test_mme_answer_parsing():
    assert mme_answer("Yes") == "yes" and mme_answer("no") == "no"
    assert mme_answer("No, it is not.") == "no"  # "no, " holds "no" in its first 4 characters
    assert mme_answer("Yes.") == "yes"
    assert mme_answer("I think so") == "other"


def test_mme_reader_and_scores(tmp_path):
    task = get_task("mme").with_data(make_mme(tmp_path / "mme"))
    assert task.size == 15  # 14 subtasks, one image each, count two
    assert len(task.skipped) == 1 and "color/color_bad.txt: line 'Is it red? Yes'" in task.skipped[0]
    items = task.items(100, 0)
    assert len(items) == 30  # two questions per image
    assert user_text(items[0]) == f"Is this existence 0?\n{SHORT_ANSWER}"  # MME's own instruction replaced
    assert items[0].prompt[0]["content"][0]["path"].endswith("existence/existence_0.png")
    artwork = next(i for i in items if i.meta["subtask"] == "artwork")
    assert "artwork/images/artwork_0.png" in artwork.prompt[0]["content"][0]["path"]

    def reply(item: EvalItem) -> str:
        if item.meta["subtask"] == "existence" or item.id.startswith("mme-count-count_0"):
            return item.meta["answer"]  # existence: both right; count image 0: both right
        if item.id == "mme-count-count_1-q1":
            return "Yes"  # count image 1: q0 (Yes) right, q1 (No) wrong
        return "Yes"  # elsewhere: the Yes question right, the No question wrong

    metrics = task.aggregate([task.score(i, say(reply(i))) for i in items])
    # existence: acc 2/2, acc+ 1/1 -> 100 * (1 + 1) = 200
    # count: acc 3/4, acc+ 1/2 (image 0 both right) -> 100 * (0.75 + 0.5) = 125
    # the other 8 perception subtasks: acc 1/2, acc+ 0 -> 50 each -> 400; perception 200 + 125 + 400 = 725
    # the 4 cognition subtasks: 50 each -> 200
    assert metrics["existence"] == 200 and metrics["count"] == pytest.approx(125)
    assert metrics["count_accuracy_plus"] == 0.5 and metrics["OCR"] == 50
    assert metrics["perception"] == pytest.approx(725) and metrics["cognition"] == pytest.approx(200)
    assert task.chance_reply(items[0], rng=None)[0].text == "yes"  # yes and no tie; yes is seen first


# ---------------------------------------------------------------- MMBench and ScienceQA


def test_chosen_letter_reads_a_leading_letter_or_an_option_text():
    options = ["cat", "Dog", "bird"]
    assert chosen_letter("B", options) == "B" and chosen_letter(" (C) bird", options) == "C"
    assert chosen_letter("A. cat", options) == "A" and chosen_letter("dog.", options) == "B"
    assert chosen_letter("But why", options) is None  # "B" starting a word is no letter
    assert chosen_letter("D", options) is None  # no option D


def test_mmbench_reader_and_circular_evaluation(tmp_path):
    task = get_task("mmbench").with_data(make_mmbench(tmp_path / "MMBench_DEV_EN.tsv"))
    assert task.size == 2 and len(task.skipped) == 1 and "row 5: answer 'E' is none of AB" in task.skipped[0]
    items = task.items(10, 0)
    assert [i.id for i in items] == [f"mmbench-0-r{r}" for r in range(4)] + ["mmbench-1-r0", "mmbench-1-r1"]
    assert user_text(items[0]) == (
        f"A photo.\nWhat is in the picture?\nA. cat\nB. dog\nC. bird\nD. fish\n{ANSWER_WITH_LETTER}"
    )
    # rotation 1 lists dog bird fish cat, so the right letter (dog) moves from B to A; rotation 3 puts dog at C
    assert items[1].meta["options"] == ["dog", "bird", "fish", "cat"] and items[1].meta["answer"] == "A"
    assert items[3].meta["answer"] == "C"
    assert user_text(items[4]) == f"Is it day or night?\nA. day\nB. night\n{ANSWER_WITH_LETTER}"  # no hint ("nan")
    image = read_prompt_media(items[4])[0]["content"][0]["array"]  # row 1's image is row 0's, by reference
    assert image.shape == (8, 8, 3)
    # question 0 right in every rotation; question 1 right in rotation 0 (A = day), wrong in rotation 1
    # (day is B there; "A" is night). circular: 1 of 2 questions = 0.5; vanilla (rotation 0): 2 of 2 = 1.0
    replies = ["B", "A", "dog", "C", "A", "A"]
    scores = [task.score(i, say(r)) for i, r in zip(items, replies, strict=True)]
    assert task.aggregate(scores) == {"circular_accuracy": 0.5, "vanilla_accuracy": 1.0, "unreadable": 0.0}
    assert task.score(items[0], say("I am not sure"))["unreadable"] == 1.0


def test_scienceqa_reader_and_accuracy(tmp_path):
    task = get_task("scienceqa").with_data(make_scienceqa(tmp_path / "scienceqa"))
    assert task.size == 2 and len(task.skipped) == 2
    assert "test[2]: answer 5 is out of range for 2 choices" in task.skipped[0]
    assert "test[3]: no problem 404 in problems.json" in task.skipped[1]
    mammal, sums = task.items(10, 0)
    assert user_text(mammal) == f"Which is a mammal?\nA. whale\nB. shark\n{ANSWER_WITH_LETTER}"
    assert mammal.prompt[0]["content"][0]["path"].endswith("images/test/5/image.png")
    assert user_text(sums) == f"Context: Count carefully.\nWhat is 2 + 2?\nA. 3\nB. 5\nC. 4\n{ANSWER_WITH_LETTER}"
    assert [part["type"] for part in sums.prompt[0]["content"]] == ["text"]  # no image for this one
    # the image question right, the text question wrong: accuracy 1/2; on image questions 1/1
    metrics = task.aggregate([task.score(mammal, say("A")), task.score(sums, say("B"))])
    assert metrics["accuracy"] == 0.5 and metrics["image_accuracy"] == 1.0 and metrics["unreadable"] == 0.0


# ---------------------------------------------------------------- COCO captions


def test_caption_tokens_stand_in_for_ptb_tokenizer():
    assert caption_tokens("A man's T-shirt, on 3.5 stairs.") == ["a", "man", "'s", "t-shirt", "on", "3.5", "stairs"]
    assert caption_tokens('He "doesn\'t" (really) -- care!') == ["he", "does", "n't", "really", "care"]


def test_bleu4_on_hand_computed_cases():
    hyp, ref = words("the cat sat on a mat"), words("the cat sat on the mat")
    # 1-grams: the cat sat on mat match, "a" does not -> 5/6; 2-grams: the-cat cat-sat sat-on -> 3/5;
    # 3-grams: the-cat-sat cat-sat-on -> 2/4; 4-grams: the-cat-sat-on -> 1/3. Lengths 6 = 6: no penalty.
    # BLEU-4 = (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = (1/12) ** (1/4)
    assert corpus_bleu([bleu_statistics(hyp, [ref])]) == pytest.approx((1 / 12) ** 0.25)
    # Corpus-level: a second, perfect 4-word image adds 4/4, 3/3, 2/2, 1/1; the reference closest in length (4)
    # (not "a big dog", 3) is used: (9/10 * 6/8 * 4/6 * 2/4) ** (1/4), and no penalty (10 = 10)
    second = bleu_statistics(words("a dog runs fast"), [words("a dog runs fast"), words("a big dog")])
    assert second["reference_length"] == 4
    both = corpus_bleu([bleu_statistics(hyp, [ref]), second])
    assert both == pytest.approx((9 / 10 * 6 / 8 * 4 / 6 * 2 / 4) ** 0.25)
    # Too short: "the cat" (2) against 4 words: 2/2, 1/1, then no 3- or 4-grams (~1e-15 / 1e-9 each),
    # times exp(1 - 4/2): tiny, but a number
    short = corpus_bleu([bleu_statistics(["the", "cat"], [["the", "cat", "sat", "down"]])])
    assert short == pytest.approx((1e-15 / 1e-9) ** (2 / 4) * math.exp(1 - 4 / 2))


def test_cider_on_hand_computed_cases():
    # Two images, one-word captions: image 1 refs [cat], hyp cat; image 2 refs [dog], hyp cat. Each word is in one
    # image's references: weight log(2/1) = log 2. Image 1: unigram cosine (log2 * log2) / (log2 * log2) = 1,
    # no 2- to 4-grams (0), equal bigram lengths (no penalty): mean over n = 1/4, times 10 = 2.5.
    # Image 2: no overlap, 0. CIDEr = (2.5 + 0) / 2 = 1.25
    corpus = CiderCorpus([[["cat"]], [["dog"]]])
    assert corpus.score(["cat"], [["cat"]]) == pytest.approx(2.5)
    assert corpus.score(["cat"], [["dog"]]) == 0.0
    # "a cat" / "a dog", each hyp = its ref: "a" is in both images (weight log(2/2) = 0), "cat" in one (log 2):
    # unigram cosine (0*0 + log2*log2) / (log2 * log2) = 1; the bigram "a cat" (log 2) likewise 1;
    # n = 3, 4: nothing. Mean over n = 2/4, times 10 = 5
    pair = CiderCorpus([[["a", "cat"]], [["a", "dog"]]])
    assert pair.score(["a", "cat"], [["a", "cat"]]) == pytest.approx(5.0)
    # hyp "a cat a cat" against ref "a cat". Unigrams: "cat" twice (2 log2) clipped to the ref's log2:
    # log2 * log2 / (2 log2 * log2) = 1/2. Bigrams: "a cat" twice (2 log2), "cat a" once (log2, unseen in any
    # reference: weight log(2/1)), norm sqrt(4 + 1) log2; overlap min(2 log2, log2) * log2 -> 1/sqrt(5).
    # 3- and 4-grams: the reference has none, 0. Length penalty: 3 bigrams against 1: exp(-(3 - 1)^2 / (2 * 6^2)).
    expected = 10 * (1 / 2 + 1 / math.sqrt(5)) / 4 * math.exp(-4 / 72)
    assert pair.score(["a", "cat", "a", "cat"], [["a", "cat"]]) == pytest.approx(expected)


def test_bleu_and_cider_equal_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    references = {
        1: ["a cat sits on a mat", "a cat on the mat", "the cat is sitting on a red mat"],
        2: ["a dog runs in the park", "a brown dog running on grass"],
        3: ["two people ride bikes down a street", "people riding bicycles on a road", "two cyclists on a street"],
        4: ["a plate of food", "food on a white plate with a fork"],
    }
    hypotheses = {1: "a cat sitting on a mat", 2: "a dog in the park", 3: "a man rides a bike", 4: "a plate"}
    bleu, _ = Bleu(4).compute_score(references, {k: [v] for k, v in hypotheses.items()}, verbose=0)
    cider, per_image = Cider().compute_score(references, {k: [v] for k, v in hypotheses.items()})
    tokens = {k: [r.split() for r in refs] for k, refs in references.items()}
    corpus = CiderCorpus(list(tokens.values()))
    ours = [corpus.score(hypotheses[k].split(), tokens[k]) for k in references]
    assert ours == pytest.approx(list(per_image), abs=1e-12) and np.mean(ours) == pytest.approx(cider, abs=1e-12)
    statistics = [bleu_statistics(hypotheses[k].split(), tokens[k]) for k in references]
    assert corpus_bleu(statistics) == pytest.approx(bleu[3], abs=1e-12)


def test_coco_reader_and_corpus_scores(tmp_path):
    task = get_task("coco-caption").with_data(make_coco(tmp_path / "coco"))
    assert task.size == 2 and len(task.skipped) == 2
    assert "annotations[3]: no 'caption'" in task.skipped[0] and "images[2]: no captions" in task.skipped[1]
    items = task.items(10, 0)
    assert user_text(items[0]) == "Provide a one-sentence caption for the provided image."
    assert items[0].meta["captions"] == ["A cat sits on a mat.", "A cat on the mat"]
    replies = ["A cat sits on the mat.", "A dog."]
    metrics = task.aggregate([task.score(i, say(r)) for i, r in zip(items, replies, strict=True)])
    hypotheses = [caption_tokens(r) for r in replies]
    references = [[caption_tokens(c) for c in i.meta["captions"]] for i in items]
    corpus = CiderCorpus(references)
    cider = np.mean([corpus.score(h, r) for h, r in zip(hypotheses, references, strict=True)])
    assert metrics["cider"] == pytest.approx(cider)
    statistics = [bleu_statistics(h, r) for h, r in zip(hypotheses, references, strict=True)]
    assert metrics["bleu4"] == pytest.approx(corpus_bleu(statistics)) and metrics["cider"] > 0


# ---------------------------------------------------------------- LibriSpeech


def test_word_error_rate_on_hand_computed_cases():
    assert asr_words("HELLO, World's  END!") == "hello world's end"
    assert word_errors("THE CAT SAT ON THE MAT", "the cat sat on mat") == (1, 6)  # one deletion
    assert word_errors("HELLO WORLD", "Hello there, world.") == (1, 2)  # one insertion
    assert word_errors("HELLO WORLD", "") == (2, 2)  # two deletions


def test_librispeech_reader_and_corpus_wer(tmp_path):
    task = get_task("librispeech").with_data(make_librispeech(tmp_path / "test-clean"))
    assert task.size == 2 and len(task.skipped) == 2
    assert "19-198.trans.txt line 3: '19-198-0002' is not 'ID TRANSCRIPT'" in task.skipped[0]
    assert "line 4: no file" in task.skipped[1]
    items = task.items(10, 0)
    assert [part["type"] for part in items[0].prompt[0]["content"]] == ["audio", "text"]
    audio = read_prompt_media(items[0])[0]["content"][0]
    assert audio["array"].dtype == np.float32 and audio["array"].shape == (8000,) and audio["sample_rate"] == 16000
    replies = ["the cat sat on mat", "hello there world"]
    metrics = task.aggregate([task.score(i, say(r)) for i, r in zip(items, replies, strict=True)])
    # corpus: (1 deletion + 1 insertion) / (6 + 2 reference words) = 2/8 = 0.25, which is jiwer's corpus WER too
    assert metrics["wer"] == pytest.approx(0.25)
    assert metrics["wer"] == pytest.approx(jiwer.wer(["the cat sat on the mat", "hello world"], replies))


# ---------------------------------------------------------------- bad input


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_files_and_wrong_layouts_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match=r"vqav2: no such file or directory: .*nowhere") as err:
        get_task("vqav2").with_data(tmp_path / "nowhere")
    one_line(err)
    vqav2 = make_vqav2(tmp_path / "vqav2")
    (vqav2 / "v2_mscoco_val2014_annotations.json").unlink()
    with pytest.raises(InputError, match=r"missing benchmark file .*v2_mscoco_val2014_annotations\.json"):
        get_task("vqav2").with_data(vqav2)
    write_json(vqav2 / "v2_mscoco_val2014_annotations.json", {"annotation": []})
    with pytest.raises(InputError, match="wrong layout: expected a list at top-level key 'annotations', found nothing"):
        get_task("vqav2").with_data(vqav2)
    (vqav2 / "v2_mscoco_val2014_annotations.json").write_text("{oops", encoding="utf-8")
    with pytest.raises(InputError, match=r"annotations\.json is not JSON \(.* at line 1\)"):
        get_task("vqav2").with_data(vqav2)
    write_json(tmp_path / "gqa" / "testdev_balanced_questions.json", [])
    with pytest.raises(InputError, match="gqa: .* wrong layout: expected a dict at the top level, found list"):
        get_task("gqa").with_data(tmp_path / "gqa")

    tsv = make_mmbench(tmp_path / "mmbench.tsv")
    tsv.write_text(tsv.read_text(encoding="utf-8").replace("\tanswer\t", "\tsolution\t", 1), encoding="utf-8")
    with pytest.raises(InputError, match="mmbench: .* wrong layout: no answer column") as err:
        get_task("mmbench").with_data(tsv)
    one_line(err)
    mme = make_mme(tmp_path / "mme")
    for file in (mme / "OCR").iterdir():
        file.unlink()
    (mme / "OCR").rmdir()
    with pytest.raises(InputError, match=r"mme: missing benchmark directory .*OCR"):
        get_task("mme").with_data(mme)
    with pytest.raises(InputError, match="pope: missing benchmark files in .*: none of coco_pope_random.json"):
        get_task("pope").with_data(tmp_path)
    (tmp_path / "empty-split").mkdir()
    with pytest.raises(InputError, match="librispeech: .* wrong layout: no SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt"):
        get_task("librispeech").with_data(tmp_path / "empty-split")
    textvqa = make_textvqa(tmp_path / "textvqa")
    write_json(textvqa / "TextVQA_0.5.1_val.json", {"data": [{"question_id": 1}]})
    with pytest.raises(
        InputError, match=r"textvqa: .* holds no usable rows \(1 malformed; first: data\[0\]: no 'image_id'"
    ):
        get_task("textvqa").with_data(textvqa)


def test_the_runner_refuses_benchmarks_without_data_before_inference(tmp_path):
    with pytest.raises(InputError, match=r"task pope reads local files: pass --data pope=PATH"):
        resolve_tasks(["pope"], None)
    with pytest.raises(InputError, match=r"--data gqa=\.\.\.: gqa is not among the tasks \(pope\)"):
        resolve_tasks(["pope"], None, {"pope": make_pope(tmp_path / "pope"), "gqa": tmp_path})
    with pytest.raises(InputError, match="task toy-caption reads no files"):
        resolve_tasks(["toy-caption"], None, {"toy-caption": tmp_path})
    with pytest.raises(InputError, match="task mme reads local files"):
        get_task("mme").items(2, 0)  # the registered task, unloaded


def test_cli_reports_bad_data_before_loading_the_model(capsys, tmp_path):
    """The model path does not exist: the data error must come first, as one line."""
    for argv, message in (
        (["--tasks", "pope"], "task pope reads local files: pass --data pope=PATH"),
        (["--tasks", "pope", "--data", "pope"], "--data 'pope': expected NAME=PATH"),
        (["--tasks", "pope", "--data", f"pope={tmp_path / 'none'}"], "pope: no such file or directory"),
    ):
        capsys.readouterr()
        code = main(
            ["--quiet", "eval", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "r.json"), *argv]
        )
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "r.json").exists()


# ---------------------------------------------------------------- end to end


def test_eval_cli_runs_benchmarks_end_to_end(capsys, toy_model, tmp_path):
    """Two rows of POPE, MMBench and LibriSpeech through `mmllm eval` with the random toy model: the plumbing
    (image files, image bytes and audio; skipped rows reported), not the score."""
    toy_model.save_pretrained(tmp_path / "model")
    data = {
        "pope": make_pope(tmp_path / "pope"),
        "mmbench": make_mmbench(tmp_path / "MMBench_DEV_EN.tsv"),
        "librispeech": make_librispeech(tmp_path / "test-clean"),
    }
    out = tmp_path / "eval" / "results.json"
    capsys.readouterr()
    code = main(
        ["--quiet", "eval", "--model", str(tmp_path / "model"), "--tasks", ",".join(data), "--limit", "2",
         "--no-untrained", "--out", str(out), *(f"--data={name}={path}" for name, path in data.items())]
    )  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0, printed.err
    results = json.loads(out.read_text())
    assert results["settings"]["data"] == {name: str(path) for name, path in data.items()}
    pope, mmbench, librispeech = (results["tasks"][name] for name in data)
    assert (pope["n"], mmbench["n"], librispeech["n"]) == (2, 4 + 2, 2)  # MMBench: every rotation of 2 questions
    assert (pope["skipped"], mmbench["skipped"], librispeech["skipped"]) == (2, 1, 2)
    assert "not JSON" in pope["skipped_reasons"][0]
    for entry, metric in ((pope, "f1"), (mmbench, "circular_accuracy"), (librispeech, "wer")):
        assert entry["metric"] == metric and entry["metrics"][metric] is not None
        assert entry["references"]["chance"][metric] is not None and "untrained" not in entry["references"]
    assert pope["samples"][0]["prompt"].startswith("user: <image COCO_val2014_000000310196.jpg> Is there a dog")
    assert all(isinstance(sample["output"], str) for sample in mmbench["samples"] + librispeech["samples"])
    assert "[eval] pope: f1" in printed.out and "n=2; 2 malformed rows skipped" in printed.out
