"""MMBench and ScienceQA: multiple-choice questions about an image, answered with an option's letter.

Layouts (`--data NAME=PATH`):

    mmbench    PATH = the official TSV (e.g. MMBench_DEV_EN.tsv): a header row, then one question per row,
               columns index, question, hint, A, B, C, D, answer (a letter), category, l2-category,
               image (base64 of the image file; or the index of the row holding the same image)
    scienceqa  PATH/problems.json      {pid: {"question", "choices": [...], "answer": index, "hint",
                                        "image": "image.png" or null, "split", ...}}
               PATH/pid_splits.json    {"test": [pid, ...], ...}; the test split is scored
               PATH/images/test/{pid}/image.png

MMBench is scored with its CircularEval: a question with N options is asked N times, the options
rotated by one place each time (A B C D, then B C D A, ...), and counts as right only when every
rotation is answered right ("circular_accuracy", the primary metric; "vanilla_accuracy" scores
the first asking alone). Rows with index >= 1,000,000 are the official file's own rotated copies
of row index % 1,000,000; the rotations are made from the original row, so the copies are not
read. Options stop at the first empty column, as LLaVA's MMBench script reads them.

A reply picks an option by leading with its letter ("B", "B.", "(B) a cat"), or by being exactly
one option's text (case, punctuation and spacing aside); anything else picks nothing, is wrong,
and counts as "unreadable". This is the rule-based matching of VLMEvalKit and LLaVA's ScienceQA
script, without VLMEvalKit's fallback of asking a GPT model.

Prompts follow LLaVA-1.5 (its model_vqa_mmbench.py with --single-pred-prompt; lmms-eval's
scienceqa_img task): the image, the hint ("Context: ..." for ScienceQA) and question, one option
per line as "A. text", then ANSWER_WITH_LETTER.
"""

from __future__ import annotations

import base64
import binascii
import csv
import functools
import random
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmllm.errors import InputError
from mmllm.evaluation.benchmarks.base import (
    BenchmarkTask,
    MalformedRow,
    existing_file,
    field,
    keep_wellformed,
    layout_value,
    read_json,
    require_dir,
    require_file,
    text_reply,
)
from mmllm.evaluation.metrics import normalise_answer
from mmllm.evaluation.tasks import EvalItem, ReplyPart, reply_text

ANSWER_WITH_LETTER = "Answer with the option's letter from the given choices directly."  # LLaVA-1.5's MC prompt
LETTER_TOKENS = 16  # a letter, or a letter and its option's few words
LETTERS = string.ascii_uppercase
LEADING_LETTER = re.compile(r"\s*\(?([A-Z])(?![A-Za-z])")  # "B", "B.", "(B)", "B: cat"; not the word "But"


def chosen_letter(reply: str, options: Sequence[str]) -> str | None:
    """The letter of the option the reply picks: its leading letter, else the one option it names; None if neither."""
    letters = LETTERS[: len(options)]
    match = LEADING_LETTER.match(reply)
    if match and match.group(1) in letters:
        return match.group(1)
    said = normalise_answer(reply)
    named = [letter for letter, option in zip(letters, options, strict=True) if normalise_answer(option) == said]
    return named[0] if len(named) == 1 else None


def choice_prompt(context: str, question: str, options: Sequence[str]) -> str:
    """The context and question, one option per line as "A. text", then ANSWER_WITH_LETTER."""
    listed = [f"{letter}. {option}" for letter, option in zip(LETTERS, options, strict=False)]
    return "\n".join([*([context] if context else []), question, *listed, ANSWER_WITH_LETTER])


def score_choice(reply: list[ReplyPart], options: Sequence[str], answer: str) -> dict[str, float]:
    letter = chosen_letter(reply_text(reply), options)
    return {"correct": float(letter == answer), "unreadable": float(letter is None)}


def circular_accuracy(scores: Sequence[dict[str, float]]) -> dict[str, float]:
    """From per-asking {"correct", "rotation"} scores in order (rotation 0 opens each question): the share of
    questions right in every rotation, and the share right when first asked."""
    questions: list[list[float]] = []
    for score in scores:
        if score["rotation"] == 0:
            questions.append([])
        questions[-1].append(score["correct"])
    if not questions:
        return {"circular_accuracy": float("nan"), "vanilla_accuracy": float("nan")}
    return {
        "circular_accuracy": sum(all(hits) for hits in questions) / len(questions),
        "vanilla_accuracy": sum(hits[0] for hits in questions) / len(questions),
    }


# ---------------------------------------------------------------- MMBench

MMBENCH_COLUMNS = ("index", "question", "A", "B", "answer", "image")  # what a row cannot do without
CIRCULAR_COPY = 1_000_000  # the official TSV numbers the k-th rotated copy of question i as i + k * 1e6
IMAGE_REFERENCE = re.compile(r"\d{1,16}")  # an image cell that names another row's index instead of holding bytes
EMPTY_CELLS = ("", "nan")  # how pandas writes a missing option or hint into the TSV


@dataclass(frozen=True)
class MMBenchQuestion:
    index: int
    question: str
    hint: str
    options: tuple[str, ...]
    answer: str  # the right option's letter in the original order
    image: bytes  # the image file's bytes


class MMBenchTask(BenchmarkTask):
    name = "mmbench"
    description = "MMBench (TSV): image + multiple choice -> a letter; CircularEval accuracy (--data mmbench=FILE.tsv)"
    layout = "the official MMBench TSV file"
    metric = "circular_accuracy"

    def read(self, path: Path) -> tuple[list[MMBenchQuestion], list[str]]:
        require_file(self.name, path)
        # Base64 images are larger than csv's default 128 KiB field limit; 2**31 - 1 is the largest it takes everywhere.
        csv.field_size_limit(2**31 - 1)
        with path.open(encoding="utf-8", newline="") as file:
            reader = csv.DictReader(file, delimiter="\t")
            missing = [column for column in MMBENCH_COLUMNS if column not in (reader.fieldnames or ())]
            if missing:
                raise InputError(
                    f"{self.name}: {path}: wrong layout: no {', '.join(missing)} column "
                    f"(header: {', '.join(reader.fieldnames or ['empty'])[:120]})"
                )
            rows = [(f"{path.name} row {i}", row) for i, row in enumerate(reader, start=2)]
        images = {_index(row): row.get("image") or "" for _, row in rows}
        originals = [(where, row) for where, row in rows if not _is_rotated_copy(row)]
        return keep_wellformed(originals, functools.partial(self._parse, images=images))

    @staticmethod
    def _parse(row: dict[str, Any], images: dict[str, str]) -> MMBenchQuestion:
        index = _index(row)
        if not index.isdigit():
            raise MalformedRow(f"index {index!r} is not a number")
        options = []
        for letter in LETTERS:
            if row.get(letter) in (None, *EMPTY_CELLS):
                break
            options.append(row[letter].strip())
        if len(options) < 2:
            raise MalformedRow(f"{len(options)} options, a question needs at least 2")
        answer = (row.get("answer") or "").strip()
        if answer not in LETTERS[: len(options)]:
            raise MalformedRow(f"answer {answer!r} is none of {LETTERS[: len(options)]}")
        cell = (row.get("image") or "").strip()
        if IMAGE_REFERENCE.fullmatch(cell):
            cell = images.get(cell, "")
        try:
            image = base64.b64decode(cell, validate=True)
        except binascii.Error:
            raise MalformedRow("the image is not base64") from None
        if not image:
            raise MalformedRow("no image")
        hint = (row.get("hint") or "").strip()
        return MMBenchQuestion(
            index=int(index),
            question=field(row, "question").strip(),
            hint="" if hint in EMPTY_CELLS else hint,
            options=tuple(options),
            answer=answer,
            image=image,
        )

    def row_items(self, row: MMBenchQuestion) -> list[EvalItem]:
        """The question once per rotation of its options; in rotation r the option first listed is option r."""
        items = []
        right = LETTERS.index(row.answer)
        for rotation in range(len(row.options)):
            options = row.options[rotation:] + row.options[:rotation]
            answer = LETTERS[(right - rotation) % len(options)]
            image = {"type": "image", "data": row.image, "format": "jpg"}  # Pillow reads any format by its header
            text = choice_prompt(row.hint, row.question, options)
            items.append(
                EvalItem(
                    id=f"{self.name}-{row.index}-r{rotation}",
                    prompt=[{"role": "user", "content": [image, {"type": "text", "text": text}]}],
                    prompt_kind="chat",
                    reply_modality="text",
                    max_new_tokens=LETTER_TOKENS,
                    meta={"options": list(options), "answer": answer, "rotation": rotation},
                    reference=f"{answer}. {options[LETTERS.index(answer)]}",
                )
            )
        return items

    def score(self, item: EvalItem, reply: list[ReplyPart]) -> dict[str, float]:
        return {**score_choice(reply, item.meta["options"], item.meta["answer"]), "rotation": item.meta["rotation"]}

    def aggregate(self, scores: list[dict[str, float]]) -> dict[str, float]:
        """CircularEval over each question's rotations (consecutive items: `row_items`), and the unreadable share."""
        unreadable = sum(s["unreadable"] for s in scores) / len(scores) if scores else float("nan")
        return {**circular_accuracy(scores), "unreadable": unreadable}

    def chance_reply(self, item: EvalItem, rng: random.Random) -> list[ReplyPart]:
        return text_reply(rng.choice(LETTERS[: len(item.meta["options"])]))


def _index(row: dict[str, Any]) -> str:
    return (row.get("index") or "").strip()


def _is_rotated_copy(row: dict[str, Any]) -> bool:
    """A row the official TSV adds as a rotated copy of question index % CIRCULAR_COPY."""
    index = _index(row)
    return index.isdigit() and int(index) >= CIRCULAR_COPY


# ---------------------------------------------------------------- ScienceQA

SCIENCEQA_SPLIT = "test"


@dataclass(frozen=True)
class ScienceQuestion:
    id: str
    question: str
    hint: str
    choices: tuple[str, ...]
    answer: str  # the right choice's letter
    image: Path | None


class ScienceQATask(BenchmarkTask):
    name = "scienceqa"
    description = "ScienceQA test: (image +) multiple choice -> a letter; accuracy (--data scienceqa=DIR)"
    layout = "a dir with problems.json, pid_splits.json and images/"

    def read(self, path: Path) -> tuple[list[ScienceQuestion], list[str]]:
        problems_path, splits_path = path / "problems.json", path / "pid_splits.json"
        problems = layout_value(self.name, problems_path, read_json(self.name, problems_path), None, dict)
        splits = read_json(self.name, splits_path)
        pids = layout_value(self.name, splits_path, splits, SCIENCEQA_SPLIT, list)
        images = require_dir(self.name, path / "images" / SCIENCEQA_SPLIT)

        def parse(pid: object) -> ScienceQuestion:
            if str(pid) not in problems:
                raise MalformedRow(f"no problem {pid} in {problems_path.name}")
            problem = problems[str(pid)]
            choices = field(problem, "choices", list)
            if len(choices) < 2 or not all(isinstance(choice, str) for choice in choices):
                raise MalformedRow(f"'choices' must be at least 2 strings, found {choices!r:.60}")
            answer = field(problem, "answer", int)
            if not 0 <= answer < len(choices):
                raise MalformedRow(f"answer {answer} is out of range for {len(choices)} choices")
            image = problem.get("image")
            return ScienceQuestion(
                id=str(pid),
                question=field(problem, "question"),
                hint=str(problem.get("hint") or "").strip(),
                choices=tuple(choices),
                answer=LETTERS[answer],
                image=existing_file(images / str(pid) / image) if image else None,
            )

        return keep_wellformed(
            ((f"{splits_path.name} {SCIENCEQA_SPLIT}[{i}]", pid) for i, pid in enumerate(pids)), parse
        )

    def row_items(self, row: ScienceQuestion) -> list[EvalItem]:
        text = choice_prompt(f"Context: {row.hint}" if row.hint else "", row.question, row.choices)
        content = [{"type": "image", "path": str(row.image)}] if row.image else []
        return [
            EvalItem(
                id=f"{self.name}-{row.id}",
                prompt=[{"role": "user", "content": [*content, {"type": "text", "text": text}]}],
                prompt_kind="chat",
                reply_modality="text",
                max_new_tokens=LETTER_TOKENS,
                meta={"options": list(row.choices), "answer": row.answer, "has_image": row.image is not None},
                reference=f"{row.answer}. {row.choices[LETTERS.index(row.answer)]}",
            )
        ]

    def score(self, item: EvalItem, reply: list[ReplyPart]) -> dict[str, float]:
        scores = score_choice(reply, item.meta["options"], item.meta["answer"])
        accuracy = {"accuracy": scores["correct"], "unreadable": scores["unreadable"]}
        return accuracy | ({"image_accuracy": scores["correct"]} if item.meta["has_image"] else {})

    def chance_reply(self, item: EvalItem, rng: random.Random) -> list[ReplyPart]:
        return text_reply(rng.choice(LETTERS[: len(item.meta["options"])]))
