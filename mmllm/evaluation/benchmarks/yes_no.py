"""POPE and MME: yes/no questions about an image, scored as their official evaluation scripts score them.

Layouts (`--data NAME=DIR`):

    pope  DIR/coco_pope_{random,popular,adversarial}.json  one JSON object per line (at least one of the three):
                                                          {"question_id", "image", "text", "label": "yes"|"no"}
          DIR/val2014/{image}                             the COCO val2014 images the questions name
    mme   DIR/{subtask}/ for each of the 14 subtasks (MME_Benchmark_release_version), either
              images/NAME.jpg + questions_answers_YN/NAME.txt, or NAME.png + NAME.txt side by side;
          each txt holds the image's two questions, one per line: "question<TAB>Yes" or "question<TAB>No"

POPE (its evaluate.py): the reply's first sentence is read as "no" when one of its words is "No",
"no" or "not", else as "yes"; "yes" is the positive class. Accuracy, precision, recall, F1
(= 2TP / (2TP + FP + FN)) and the share of "yes" replies are reported over all questions and per
sampling split (random, popular, adversarial). F1 is the primary metric.

MME (its eval_tool/calculation.py): the reply, lower-cased, is "yes" or "no" when it is exactly
that, else by which of the two its first four characters contain ("other" when neither: wrong).
Per subtask: accuracy over questions, accuracy+ over images (both of an image's questions right),
score = 100 * (accuracy + accuracy+), at most 200. The perception score sums the 10 perception
subtasks, the cognition score the 4 cognition subtasks (at most 2000 and 800). The official data
has every subtask; one missing is a wrong layout, since sums over fewer are not comparable.
`--limit N` takes the first N images; a sum then covers the subtasks those images reach.

Prompts are LLaVA-1.5's: the image, the question, then SHORT_ANSWER on a new line; MME's question
loses its own " Please answer yes or no." first, as lmms-eval's MME task does.
"""

from __future__ import annotations

import functools
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mmllm.errors import InputError
from mmllm.evaluation.benchmarks.base import (
    SHORT_ANSWER,
    BenchmarkTask,
    MalformedRow,
    existing_file,
    field,
    image_by_stem,
    image_question,
    keep_wellformed,
    most_common,
    require_dir,
    text_reply,
)
from mmllm.evaluation.tasks import EvalItem, ReplyPart, reply_text

# ---------------------------------------------------------------- POPE

POPE_SPLITS = ("random", "popular", "adversarial")
POPE_NEGATIONS = {"No", "no", "not"}  # the words that make a reply "no" (case as the official script has it)


def pope_answer(reply: str) -> str:
    """The reply read as "no" when its first sentence has the word No, no or not, else as "yes" (commas ignored)."""
    first_sentence = reply.split(".")[0].replace(",", "")
    return "no" if POPE_NEGATIONS & set(first_sentence.split(" ")) else "yes"


def yes_no_metrics(said_yes: Sequence[float], is_yes: Sequence[float]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and yes-ratio of yes/no predictions, "yes" positive (NaN when undefined)."""
    pairs = list(zip(map(bool, said_yes), map(bool, is_yes), strict=True))
    tp = sum(said and truth for said, truth in pairs)
    fp = sum(said and not truth for said, truth in pairs)
    fn = sum(truth and not said for said, truth in pairs)
    n = len(pairs)
    tn = n - tp - fp - fn
    return {
        "accuracy": (tp + tn) / n if n else math.nan,
        "precision": tp / (tp + fp) if tp + fp else math.nan,
        "recall": tp / (tp + fn) if tp + fn else math.nan,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan,
        "yes_ratio": (tp + fp) / n if n else math.nan,
    }


@dataclass(frozen=True)
class PopeQuestion:
    id: str
    split: str
    image: Path
    question: str
    label: str  # "yes" or "no"


class PopeTask(BenchmarkTask):
    name = "pope"
    description = "POPE (COCO): image + 'is there a X?' -> yes/no; F1, accuracy, precision, recall (--data pope=DIR)"
    layout = "a dir with coco_pope_{random,popular,adversarial}.json and val2014/"
    metric = "f1"

    def read(self, path: Path) -> tuple[list[PopeQuestion], list[str]]:
        files = {split: path / f"coco_pope_{split}.json" for split in POPE_SPLITS}
        if not any(file.is_file() for file in files.values()):
            names = ", ".join(file.name for file in files.values())
            raise InputError(f"{self.name}: missing benchmark files in {path}: none of {names}")
        images = require_dir(self.name, path / "val2014")
        rows: list[PopeQuestion] = []
        skipped: list[str] = []
        for split, file in files.items():
            if not file.is_file():
                continue
            lines = enumerate(file.read_text(encoding="utf-8").splitlines(), start=1)
            kept, malformed = keep_wellformed(
                ((f"{file.name} line {i}", line) for i, line in lines if line.strip()),
                functools.partial(self._parse, split=split, images=images),
            )
            rows += kept
            skipped += malformed
        return rows, skipped

    @staticmethod
    def _parse(line: str, split: str, images: Path) -> PopeQuestion:
        try:
            question = json.loads(line)
        except json.JSONDecodeError as err:
            raise MalformedRow(f"not JSON ({err.msg})") from None
        label = field(question, "label").strip().lower()
        if label not in ("yes", "no"):
            raise MalformedRow(f"label {label!r} is not yes or no")
        return PopeQuestion(
            id=f"{split}-{field(question, 'question_id', (int, str))}",
            split=split,
            image=existing_file(images / field(question, "image")),
            question=field(question, "text"),
            label=label,
        )

    def row_items(self, row: PopeQuestion) -> list[EvalItem]:
        meta = {"label": row.label, "split": row.split}
        return [image_question(f"{self.name}-{row.id}", row.image, f"{row.question}\n{SHORT_ANSWER}", meta, row.label)]

    def score(self, item: EvalItem, reply: list[ReplyPart]) -> dict[str, float]:
        said_yes = float(pope_answer(reply_text(reply)) == "yes")
        is_yes = float(item.meta["label"] == "yes")
        split = item.meta["split"]
        return {"said_yes": said_yes, "is_yes": is_yes, f"{split}_said_yes": said_yes, f"{split}_is_yes": is_yes}

    def aggregate(self, scores: list[dict[str, float]]) -> dict[str, float]:
        """The yes/no metrics over all questions, then per split as "random_f1", "popular_accuracy"..."""
        metrics = yes_no_metrics([s["said_yes"] for s in scores], [s["is_yes"] for s in scores])
        for split in POPE_SPLITS:
            said = [s[f"{split}_said_yes"] for s in scores if f"{split}_said_yes" in s]
            if said:
                truth = [s[f"{split}_is_yes"] for s in scores if f"{split}_is_yes" in s]
                metrics |= {f"{split}_{key}": value for key, value in yes_no_metrics(said, truth).items()}
        return metrics

    @functools.cached_property
    def majority_label(self) -> str:
        return most_common(row.label for row in self.rows)

    def chance_reply(self, item: EvalItem, rng: random.Random) -> list[ReplyPart]:
        return text_reply(self.majority_label)


# ---------------------------------------------------------------- MME

MME_PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_QUESTIONS_PER_IMAGE = 2  # one whose answer is Yes, one whose answer is No
MME_ASKS_YES_NO = " Please answer yes or no."  # MME's own instruction, replaced by SHORT_ANSWER


def mme_answer(reply: str) -> str:
    """The reply, lower-cased, read as "yes" or "no" when it is that or its first 4 characters hold it, else "other"."""
    text = reply.lower()
    if text in ("yes", "no"):
        return text
    if "yes" in text[:4]:
        return "yes"
    if "no" in text[:4]:
        return "no"
    return "other"


def mme_scores(hits: dict[str, list[tuple[float, float]]]) -> dict[str, float]:
    """Per subtask accuracy, accuracy+ and score = 100 * (acc + acc+) from each image's two hits; perception and
    cognition sum the scores of their subtasks present (NaN when none is)."""
    metrics: dict[str, float] = {}
    for subtask, pairs in hits.items():
        accuracy = sum(a + b for a, b in pairs) / (MME_QUESTIONS_PER_IMAGE * len(pairs))
        accuracy_plus = sum(a * b for a, b in pairs) / len(pairs)
        metrics |= {
            subtask: 100 * (accuracy + accuracy_plus),
            f"{subtask}_accuracy": accuracy,
            f"{subtask}_accuracy_plus": accuracy_plus,
        }
    for total, subtasks in (("perception", MME_PERCEPTION), ("cognition", MME_COGNITION)):
        present = [metrics[s] for s in subtasks if s in metrics]
        metrics[total] = sum(present) if present else math.nan
    return metrics


@dataclass(frozen=True)
class MMEImage:
    subtask: str
    image: Path
    questions: tuple[tuple[str, str], ...]  # (question, "yes" | "no"), two of them


class MMETask(BenchmarkTask):
    name = "mme"
    description = "MME: image + yes/no question, two per image; perception and cognition scores (--data mme=DIR)"
    layout = "MME_Benchmark_release_version: one dir per subtask"
    metric = "perception"

    def read(self, path: Path) -> tuple[list[MMEImage], list[str]]:
        rows: list[MMEImage] = []
        skipped: list[str] = []
        for subtask in (*MME_PERCEPTION, *MME_COGNITION):
            folder = require_dir(self.name, path / subtask)
            if (folder / "questions_answers_YN").is_dir():
                texts, images = folder / "questions_answers_YN", require_dir(self.name, folder / "images")
            else:
                texts, images = folder, folder
            kept, malformed = keep_wellformed(
                ((f"{subtask}/{txt.name}", txt) for txt in sorted(texts.glob("*.txt"))),
                functools.partial(self._parse, subtask=subtask, images=images),
            )
            rows += kept
            skipped += malformed
        return rows, skipped

    @staticmethod
    def _parse(txt: Path, subtask: str, images: Path) -> MMEImage:
        questions = []
        for line in filter(str.strip, txt.read_text(encoding="utf-8").splitlines()):
            question, tab, answer = line.rpartition("\t")
            if not tab or not question.strip() or answer.strip().lower() not in ("yes", "no"):
                raise MalformedRow(f"line {line!r:.60} is not 'question<TAB>Yes|No'")
            questions.append((question.strip(), answer.strip().lower()))
        if len(questions) != MME_QUESTIONS_PER_IMAGE:
            raise MalformedRow(f"{len(questions)} questions, expected {MME_QUESTIONS_PER_IMAGE}")
        return MMEImage(subtask, image_by_stem(images, txt.stem), tuple(questions))

    def row_items(self, row: MMEImage) -> list[EvalItem]:
        return [
            image_question(
                f"{self.name}-{row.subtask}-{row.image.stem}-q{k}",
                row.image,
                f"{question.replace(MME_ASKS_YES_NO, '').strip()}\n{SHORT_ANSWER}",
                {"answer": answer, "subtask": row.subtask},
                answer,
            )
            for k, (question, answer) in enumerate(row.questions)
        ]

    def score(self, item: EvalItem, reply: list[ReplyPart]) -> dict[str, float]:
        said = mme_answer(reply_text(reply))
        hit = float(said == item.meta["answer"])
        return {"accuracy": hit, f"{item.meta['subtask']}_accuracy": hit, "unreadable": float(said == "other")}

    def aggregate(self, scores: list[dict[str, float]]) -> dict[str, float]:
        """MME's scores from the hits of each image's two questions (consecutive items: `row_items`)."""
        hits: dict[str, list[tuple[float, float]]] = {}
        for first, second in zip(scores[0::2], scores[1::2], strict=True):
            (subtask,) = (key.removesuffix("_accuracy") for key in first if key.endswith("_accuracy"))
            hits.setdefault(subtask, []).append((first["accuracy"], second[f"{subtask}_accuracy"]))
        metrics = mme_scores(hits)
        metrics["accuracy"] = sum(s["accuracy"] for s in scores) / len(scores) if scores else math.nan
        metrics["unreadable"] = sum(s["unreadable"] for s in scores) / len(scores) if scores else math.nan
        return metrics

    @functools.cached_property
    def majority_answer(self) -> str:
        return most_common(answer for row in self.rows for _, answer in row.questions)

    def chance_reply(self, item: EvalItem, rng: random.Random) -> list[ReplyPart]:
        return text_reply(self.majority_answer)
