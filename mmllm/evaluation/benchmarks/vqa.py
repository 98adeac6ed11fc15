"""VQAv2, GQA and TextVQA: open questions about an image, scored as their official evaluations score them.

Layouts (`--data NAME=DIR`), as the official downloads unpack:

    vqav2    DIR/v2_OpenEnded_mscoco_val2014_questions.json  {"questions": [{"question_id", "image_id", "question"}]}
             DIR/v2_mscoco_val2014_annotations.json          {"annotations": [{"question_id", "answer_type",
                                                               "answers": [{"answer", ...} x 10], ...}]}
             DIR/val2014/COCO_val2014_000000XXXXXX.jpg       (image_id, zero-padded to 12 digits)
    gqa      DIR/testdev_balanced_questions.json             {question id: {"imageId", "question", "answer", ...}}
             DIR/images/{imageId}.jpg
    textvqa  DIR/TextVQA_0.5.1_val.json                      {"data": [{"question_id", "image_id", "question",
                                                               "answers": [10 strings]}]}
             DIR/train_images/{image_id}.jpg                 (the val images ship in train_val_images.zip)

VQA accuracy (VQAv2, TextVQA): an answer given by 3 of the 10 annotators is fully right, so one
annotator is left out in turn, the prediction scores min(#remaining annotators who gave it / 3, 1),
and the 10 scores are averaged, as the official scripts do. What is compared is normalised:

* VQAv2 follows GT-Vision-Lab/VQA's `vqaEval.py`: the prediction goes through processPunctuation
  and processDigitArticle; the annotators' answers through processPunctuation, and only when they
  disagree (the released answers are already normalised).
* TextVQA follows its evaluator (mmf's TextVQAAccuracyEvaluator, the one LLaVA runs), whose EvalAI
  answer processor lower-cases, drops ',' and '?', splits off "'s", then applies the same two steps,
  to the prediction and to every annotator's answer alike.
* GQA has one answer per question and its official eval scores exact match; both sides are
  normalised as a VQAv2 prediction is (LLaVA's GQA conversion lower-cases the reply and drops its
  final period; the VQA rules do that and more).

The prompt is the image, the question, then SHORT_ANSWER on a new line: LLaVA-1.5's for VQAv2 and
GQA, and lmms-eval's textvqa_val for TextVQA (LLaVA-1.5's own TextVQA file also lists OCR tokens;
we give the model the image alone).
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mmllm.evaluation.benchmarks.base import (
    SHORT_ANSWER,
    BenchmarkTask,
    MalformedRow,
    existing_file,
    field,
    image_question,
    keep_wellformed,
    layout_value,
    most_common,
    read_json,
    require_dir,
    text_reply,
)
from mmllm.evaluation.tasks import EvalItem, ReplyPart, reply_text

ANNOTATORS = 10  # every VQAv2 and TextVQA question has ten human answers; the 3-of-10 rule assumes them
AGREEMENT = 3  # annotators that must give an answer for it to be fully right

# ---------------------------------------------------------------- the VQA eval script's normalisation

# Marks processPunctuation removes or turns into a space.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
COMMA_IN_NUMBER = re.compile(r"\d,\d")
# The script's period pattern is "(?!<=\d)(\.)(?!\d)"; its "(?!<=" is a lookahead that never matches before a
# period, so what it does is drop every period not followed by a digit ("3.5" keeps its point).
PERIOD = re.compile(r"\.(?!\d)")
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = ("a", "an", "the")
# The script's contractions table: an apostrophe-less spelling -> the spelling annotators' answers use.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip


def process_punctuation(text: str) -> str:
    """Each mark of PUNCTUATION is deleted when it touches a space somewhere in the text (or the text has a
    comma between digits), else replaced by a space; then periods not followed by a digit are dropped."""
    glued = COMMA_IN_NUMBER.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        out = out.replace(mark, "" if glued or f"{mark} " in text or f" {mark}" in text else " ")
    return PERIOD.sub("", out)


def process_digit_article(text: str) -> str:
    """Lower case; number words as digits; articles dropped; apostrophe-less contractions spelled out."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalise_prediction(text: str) -> str:
    """A reply as the VQA eval script normalises a prediction: tabs and newlines as spaces, then both steps."""
    return process_digit_article(process_punctuation(text.replace("\n", " ").replace("\t", " ").strip()))


def evalai_normalise(text: str) -> str:
    """EvalAI's answer processor (TextVQA): lower case, ',' and '?' dropped, "'s" split off, then both steps."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return normalise_prediction(text)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """min(#other annotators who gave `prediction` / 3, 1), averaged over leaving out each annotator in turn."""
    matches = sum(answer == prediction for answer in answers)
    return sum(min(1.0, (matches - (answer == prediction)) / AGREEMENT) for answer in answers) / len(answers)


def vqav2_accuracy(reply: str, answers: Sequence[str]) -> float:
    """VQA accuracy as vqaEval.py computes it: annotators' answers get processPunctuation when they disagree."""
    if len(set(answers)) > 1:
        answers = [process_punctuation(answer) for answer in answers]
    return vqa_accuracy(normalise_prediction(reply), answers)


def textvqa_accuracy(reply: str, answers: Sequence[str]) -> float:
    """VQA accuracy as TextVQA's evaluator computes it: EvalAI's processor on the reply and every answer."""
    return vqa_accuracy(evalai_normalise(reply), [evalai_normalise(answer) for answer in answers])


def gqa_accuracy(reply: str, answer: str) -> float:
    """1.0 when the normalised reply is the normalised answer, else 0.0."""
    return float(normalise_prediction(reply) == normalise_prediction(answer))


# ---------------------------------------------------------------- rows and tasks


@dataclass(frozen=True)
class Question:
    id: str
    image: Path
    question: str
    answers: tuple[str, ...]  # the annotators' answers (GQA: its one answer)
    answer_type: str = ""  # VQAv2's "yes/no", "number" or "other"


def ten_answers(raw: object) -> tuple[str, ...]:
    """The ten annotators' answers, given as strings (TextVQA) or {"answer": ...} objects (VQAv2), else MalformedRow."""
    if not isinstance(raw, list) or len(raw) != ANNOTATORS:
        raise MalformedRow(f"'answers' must hold {ANNOTATORS} answers, found {raw!r:.60}")
    answers = tuple(answer.get("answer") if isinstance(answer, dict) else answer for answer in raw)
    if not all(isinstance(answer, str) for answer in answers):
        raise MalformedRow(f"an answer is not text: {raw!r:.60}")
    return answers


class VQATask(BenchmarkTask):
    """An open question about an image, answered in a word or phrase; the chance row always says the top answer."""

    def row_items(self, row: Question) -> list[EvalItem]:
        meta = {"answers": list(row.answers), "answer_type": row.answer_type}
        text = f"{row.question}\n{SHORT_ANSWER}"
        return [image_question(f"{self.name}-{row.id}", row.image, text, meta, most_common(row.answers))]

    @functools.cached_property
    def top_answer(self) -> str:
        """The answer most questions' annotators agree on most (VQAv2: "yes")."""
        return most_common(most_common(row.answers) for row in self.rows)

    def chance_reply(self, item: EvalItem, rng: random.Random) -> list[ReplyPart]:
        return text_reply(self.top_answer)


class VQAv2Task(VQATask):
    name = "vqav2"
    description = "VQAv2 val: image + question -> a word or phrase; VQA accuracy (--data vqav2=DIR)"
    layout = "a dir with the val questions and annotations JSON and val2014/"
    questions_file = "v2_OpenEnded_mscoco_val2014_questions.json"
    annotations_file = "v2_mscoco_val2014_annotations.json"

    def read(self, path: Path) -> tuple[list[Question], list[str]]:
        questions_path, annotations_path = path / self.questions_file, path / self.annotations_file
        questions = layout_value(self.name, questions_path, read_json(self.name, questions_path), "questions", list)
        annotations = layout_value(
            self.name, annotations_path, read_json(self.name, annotations_path), "annotations", list
        )
        images = require_dir(self.name, path / "val2014")
        by_question: dict[int, dict] = {}
        skipped = []
        for i, annotation in enumerate(annotations):
            try:
                by_question[field(annotation, "question_id", int)] = annotation
            except MalformedRow as err:
                skipped.append(f"{annotations_path.name} annotations[{i}]: {err}")

        def parse(question: object) -> Question:
            question_id = field(question, "question_id", int)
            if question_id not in by_question:
                raise MalformedRow("no annotation")
            annotation = by_question[question_id]
            image = images / f"COCO_val2014_{field(question, 'image_id', int):012d}.jpg"
            return Question(
                id=str(question_id),
                image=existing_file(image),
                question=field(question, "question"),
                answers=ten_answers(annotation.get("answers")),
                answer_type=str(annotation.get("answer_type", "")),
            )

        rows, malformed = keep_wellformed(
            ((f"{questions_path.name} questions[{i}]", q) for i, q in enumerate(questions)), parse
        )
        return rows, skipped + malformed

    def score(self, item: EvalItem, reply: list[ReplyPart]) -> dict[str, float]:
        accuracy = vqav2_accuracy(reply_text(reply), item.meta["answers"])
        kind = item.meta["answer_type"].replace("/", "_")  # "yes/no" -> "yes_no_accuracy"
        return {"accuracy": accuracy, **({f"{kind}_accuracy": accuracy} if kind else {})}


class GQATask(VQATask):
    name = "gqa"
    description = "GQA testdev-balanced: image + question -> a word; exact match (--data gqa=DIR)"
    layout = "a dir with testdev_balanced_questions.json and images/"
    questions_file = "testdev_balanced_questions.json"

    def read(self, path: Path) -> tuple[list[Question], list[str]]:
        questions_path = path / self.questions_file
        questions = layout_value(self.name, questions_path, read_json(self.name, questions_path), None, dict)
        images = require_dir(self.name, path / "images")

        def parse(entry: tuple[str, object]) -> Question:
            question_id, question = entry
            return Question(
                id=question_id,
                image=existing_file(images / f"{field(question, 'imageId')}.jpg"),
                question=field(question, "question"),
                answers=(field(question, "answer"),),
            )

        return keep_wellformed(((f"question {qid}", (qid, q)) for qid, q in questions.items()), parse)

    def score(self, item: EvalItem, reply: list[ReplyPart]) -> dict[str, float]:
        return {"accuracy": gqa_accuracy(reply_text(reply), item.meta["answers"][0])}


class TextVQATask(VQATask):
    name = "textvqa"
    description = "TextVQA val: image + question on its text -> a word or phrase; VQA accuracy (--data textvqa=DIR)"
    layout = "a dir with TextVQA_0.5.1_val.json and train_images/"
    questions_file = "TextVQA_0.5.1_val.json"

    def read(self, path: Path) -> tuple[list[Question], list[str]]:
        questions_path = path / self.questions_file
        questions = layout_value(self.name, questions_path, read_json(self.name, questions_path), "data", list)
        images = require_dir(self.name, path / "train_images")

        def parse(question: object) -> Question:
            return Question(
                id=str(field(question, "question_id", int)),
                image=existing_file(images / f"{field(question, 'image_id')}.jpg"),
                question=field(question, "question"),
                answers=ten_answers(question.get("answers")),
            )

        return keep_wellformed(((f"data[{i}]", q) for i, q in enumerate(questions)), parse)

    def score(self, item: EvalItem, reply: list[ReplyPart]) -> dict[str, float]:
        return {"accuracy": textvqa_accuracy(reply_text(reply), item.meta["answers"])}
