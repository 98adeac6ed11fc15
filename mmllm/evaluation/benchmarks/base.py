"""What every benchmark read from local files shares: the task base class and readers that refuse a wrong layout.

A benchmark task is registered unloaded, under its name. `mmllm eval --tasks NAME --data NAME=PATH`
makes the runner call `with_data(PATH)` before any inference; it reads the files once and returns
a loaded copy of the task. What can be wrong with the files is reported in one of two ways:

* a missing file or directory, or a file not in the benchmark's layout (not JSON, a top-level key
  missing, TSV columns missing): `InputError`, one line naming the path, and nothing runs;
* one malformed row (a question without its answers, an answer index out of range, an image file
  that is not there): the row is left out with a one-line reason, and the count and the first
  reasons go into the task's entry of results.json (`skipped`, `skipped_reasons`) and onto the
  printed row. It is never scored as a silent zero.

Items are the rows in file order and `--limit N` takes the first N (the seed plays no part), so
every run of a benchmark scores the same questions; without `--limit` every row is scored. Media
stay on disk until their batch is encoded: an item's image part holds the file's path.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from mmllm.data.media import IMAGE_SUFFIXES
from mmllm.errors import InputError
from mmllm.evaluation.tasks import EvalItem, ReplyPart, Task

logger = logging.getLogger(__name__)

Row = TypeVar("Row")

# LLaVA-1.5's instruction for short answers: the prompts of its VQAv2, GQA, TextVQA, POPE and MME evaluations
# (LLaVA docs/Evaluation.md and the llava_*.jsonl question files), kept by lmms-eval as those tasks' post_prompt.
SHORT_ANSWER = "Answer the question using a single word or phrase."
SHORT_ANSWER_TOKENS = 16  # a word, a number or a short phrase fits in 16 tokens of any subword vocabulary


class MalformedRow(ValueError):
    """One row of a benchmark that cannot be scored; it is skipped and counted, never scored as zero."""


def keep_wellformed(rows: Iterable[tuple[str, Any]], parse: Callable[[Any], Row]) -> tuple[list[Row], list[str]]:
    """`parse` of each (where, raw row); a row it rejects with MalformedRow is left out and its reason kept."""
    kept: list[Row] = []
    skipped: list[str] = []
    for where, raw in rows:
        try:
            kept.append(parse(raw))
        except MalformedRow as err:
            skipped.append(f"{where}: {err}")
    return kept, skipped


def field(row: Any, key: str, kind: type | tuple[type, ...] = str) -> Any:
    """`row[key]` when `row` is an object holding a `kind` there (non-empty text for str), else MalformedRow."""
    if not isinstance(row, dict):
        raise MalformedRow(f"expected an object, got {type(row).__name__}")
    value = row.get(key)
    if value is None:
        raise MalformedRow(f"no {key!r}")
    if isinstance(value, bool) or not isinstance(value, kind):
        raise MalformedRow(f"{key!r} is {type(value).__name__} {value!r:.40}")
    if isinstance(value, str) and not value.strip():
        raise MalformedRow(f"{key!r} is empty")
    return value


def existing_file(path: Path) -> Path:
    """`path` when it is a file, else MalformedRow (a row naming a media file that is not there)."""
    if not path.is_file():
        raise MalformedRow(f"no file {path}")
    return path


def image_by_stem(folder: Path, stem: str) -> Path:
    """The image file `folder/stem.<ext>` for any image extension, else MalformedRow."""
    for suffix in IMAGE_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    raise MalformedRow(f"no image {folder / stem}.* ({'/'.join(IMAGE_SUFFIXES)})")


# ---------------------------------------------------------------- layout: a one-line error names the path


def require_file(task: str, path: Path) -> Path:
    if not path.is_file():
        raise InputError(f"{task}: missing benchmark file {path}")
    return path


def require_dir(task: str, path: Path) -> Path:
    if not path.is_dir():
        raise InputError(f"{task}: missing benchmark directory {path}")
    return path


def read_json(task: str, path: Path) -> Any:
    """The parsed JSON file, or a one-line InputError when it is missing or not JSON."""
    require_file(task, path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise InputError(f"{task}: {path} is not UTF-8 text ({err.reason})") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{task}: {path} is not JSON ({err.msg} at line {err.lineno})") from None


def layout_value(task: str, path: Path, data: Any, key: str | None, kind: type) -> Any:
    """`data[key]` (or `data` itself when `key` is None) as a `kind`, or a one-line InputError: a wrong layout."""
    where = "the top level" if key is None else f"top-level key {key!r}"
    value = data if key is None else data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, kind):
        found = "nothing" if value is None else type(value).__name__
        raise InputError(f"{task}: {path}: wrong layout: expected a {kind.__name__} at {where}, found {found}")
    return value


# ---------------------------------------------------------------- the task


class BenchmarkTask(Task):
    """A benchmark read from local files in its official layout; subclasses read rows and turn a row into items."""

    needs_data = True
    layout = ""  # what --data NAME=PATH points at, in a few words, for the error when it is missing
    input_modalities = ("image",)

    def __init__(self, path: Path | None = None, rows: Sequence[Any] = (), skipped: Sequence[str] = ()) -> None:
        self.path = path
        self.rows = list(rows)
        self.skipped = list(skipped)
        self.size = len(self.rows) if path is not None else None

    def with_data(self, path: Path) -> BenchmarkTask:
        """A copy of this task holding the rows under `path`: InputError for a missing path or a wrong layout."""
        path = Path(path)
        if not path.exists():
            raise InputError(f"{self.name}: no such file or directory: {path} (expected {self.layout})")
        rows, skipped = self.read(path)
        if not rows:
            first = f"; first: {skipped[0]}" if skipped else ""
            raise InputError(f"{self.name}: {path} holds no usable rows ({len(skipped)} malformed{first})")
        if skipped:
            logger.warning("%s: skipped %d malformed rows (first: %s)", self.name, len(skipped), skipped[0])
        return type(self)(path, rows, skipped)

    def read(self, path: Path) -> tuple[list[Any], list[str]]:
        """The well-formed rows under `path` in file order, and a reason per malformed row left out."""
        raise NotImplementedError

    def items(self, n: int, seed: int) -> list[EvalItem]:
        """The items of the first `n` rows in file order (the seed plays no part: a benchmark is fixed)."""
        if self.path is None:
            raise InputError(f"task {self.name} reads local files: pass --data {self.name}=PATH ({self.layout})")
        return [item for row in self.rows[:n] for item in self.row_items(row)]

    def row_items(self, row: Any) -> list[EvalItem]:
        """The items one row asks: one question, or several (both questions of an MME image, rotations...)."""
        raise NotImplementedError


def image_question(
    item_id: str, image: Path, text: str, meta: dict[str, Any], reference: str, max_tokens: int = SHORT_ANSWER_TOKENS
) -> EvalItem:
    """An item asking `text` about `image`, answered in text (by default in a word or phrase)."""
    return EvalItem(
        id=item_id,
        prompt=ask_about_image(image, text),
        prompt_kind="chat",
        reply_modality="text",
        max_new_tokens=max_tokens,
        meta=meta,
        reference=reference,
    )


def ask_about_image(image: Path, text: str) -> list[dict[str, Any]]:
    """A one-turn chat with the image first, then the text (LLaVA's `<image>\\n{question}` order)."""
    return [{"role": "user", "content": [{"type": "image", "path": str(image)}, {"type": "text", "text": text}]}]


def text_reply(text: str) -> list[ReplyPart]:
    return [ReplyPart("text", text=text)]


def most_common(values: Iterable[str]) -> str:
    """The most frequent value (the first seen among ties): what answering every question alike would say."""
    return Counter(values).most_common(1)[0][0]
