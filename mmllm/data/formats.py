"""Readers of other dataset formats: each sample becomes an interleaved record (docs/data_format.md).

    jsonl        the project's own interleaved JSONL
    llava        LLaVA's JSON list of {"id", "image", "conversations": [{"from", "value"}]}
    hf           a `datasets` folder written by `save_to_disk`
    parquet      parquet files, such as `Dataset.to_parquet` writes and the Hub serves
    imagefolder  `datasets` image / audio folders captioned by metadata.jsonl or metadata.csv
    audiofolder
    webdataset   tar shards whose members are grouped into samples by key
    lerobot      LeRobot v2 robot episodes, one record per action chunk

`read_records` streams a source in its format and yields validated records. They are
self-contained: media come as in-memory `bytes` parts (a file's bytes, a parquet cell, a tar
member, a video frame as PNG) or inline action values, so `load_part(part)` needs no folder.
Media are not decoded here; `load_part` decodes them. A sample that cannot become a record is
reported by a one-line InputError naming the file and row or member; `on_error` decides
whether it stops the read.
"""

from __future__ import annotations

import glob
import inspect
import io
import itertools
import json
import logging
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from PIL import Image

from mmllm.data.interleaved import read_jsonl, validate_record
from mmllm.data.media import AUDIO_SUFFIXES, IMAGE_SUFFIXES, MEDIA_SUFFIXES
from mmllm.errors import InputError, MediaError

logger = logging.getLogger(__name__)

Record = dict[str, Any]
Sample = Record | InputError  # a record, or why a sample could not become one (for `read_records` to raise or skip)
OnError = Literal["raise", "skip"] | Callable[[InputError], None]

TEXT_COLUMNS = ("text", "caption", "sentence", "transcription")  # looked for in this order when not named
CONVERSATION_COLUMNS = ("conversations", "messages")
MEDIA_COLUMNS = {"image": ("image", "images"), "audio": ("audio",)}  # by name, when no `datasets` feature type says
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
PLACEHOLDER = re.compile(r"<(image|audio|video)>")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
WEBDATASET_TEXT = ("txt", "caption", "text")  # member extensions holding a sample's caption, first found wins
WEBDATASET_MEDIA = {  # member extension -> modality; .npy is left out: it may hold video or actions
    suffix[1:]: kind for kind in ("image", "audio", "video") for suffix in MEDIA_SUFFIXES[kind] if suffix != ".npy"
}
MAGIC = (  # (offset, signature, format): how media bytes that come without a file name are recognised
    (0, b"\x89PNG\r\n\x1a\n", "png"),
    (0, b"\xff\xd8\xff", "jpg"),
    (0, b"BM", "bmp"),
    (8, b"WEBP", "webp"),
    (8, b"WAVE", "wav"),
    (0, b"fLaC", "flac"),
    (0, b"OggS", "ogg"),
    (0, b"GIF8", "gif"),
    (4, b"ftyp", "mp4"),
    (0, b"\x1a\x45\xdf\xa3", "mkv"),  # EBML: Matroska and WebM, which FFmpeg reads alike
    (0, b"\x93NUMPY", "npy"),
)
ROWS_PER_BATCH = 64  # Arrow rows turned into Python at a time: memory holds a few dozen samples' media
JSON_READ_CHARS = 1 << 20  # a JSON list is parsed from a window of this many characters, refilled as items go
MAX_JSON_ITEM_CHARS = 64 << 20  # a LLaVA item is a few KB: one that is still unparsable at this size is malformed
LEROBOT_CHUNK_LENGTH = 10  # default steps per action chunk, as the toy world's reaching chunks
LEROBOT_CHUNKS_SIZE = 1000  # episodes per data/chunk-NNN folder when info.json does not say (LeRobot's default)


# ---------------------------------------------------------------- public API


def detect_format(source: str | Path | Sequence[str | Path]) -> str:
    """The format of `source` (a path, a glob, or a list of them), from file extensions or folder contents."""
    return _detect_all(_expand(source), source)


def read_records(
    source: str | Path | Sequence[str | Path],
    format: str | None = None,
    *,
    task: str | None = None,
    on_error: OnError = "raise",
    **options: Any,
) -> Iterator[Record]:
    """The records of `source` (a path, a glob, or a list of them; read one after another), lazily;
    the arguments are checked at once.

    `format` is one of FORMATS, detected when not given; `options` are that format's (docs/data_format.md,
    "Readers"). `task` names the records' task (default: the format's name; jsonl records keep theirs).
    A bad sample raises its InputError (`on_error="raise"`), is logged and skipped ("skip"), or is
    handed to `on_error` when it is a callable, and the read goes on.
    """
    paths = _expand(source)
    format = format or _detect_all(paths, source)
    if format not in READERS:
        raise InputError(f"unknown data format {format!r} (formats: {', '.join(FORMATS)})")
    reader = READERS[format]
    accepted = list(inspect.signature(reader).parameters)[1:]  # after the path
    for option in options:
        if option not in accepted:
            raise InputError(f"format {format!r} takes no option {option!r} (options: {', '.join(accepted) or 'none'})")
    if task is not None and (not isinstance(task, str) or not task):
        raise InputError(f"task must be a non-empty string, got {task!r}")
    if on_error not in ("raise", "skip") and not callable(on_error):
        raise InputError(f"on_error must be 'raise', 'skip' or a callable, got {on_error!r}")
    return _records(paths, reader, options, task, on_error)


def _records(
    paths: list[Path], reader: Callable[..., Iterator[Sample]], options: dict, task: str | None, on_error: OnError
) -> Iterator[Record]:
    skipped = 0
    for path in paths:
        for sample in reader(path, **options):
            if isinstance(sample, InputError):
                if on_error == "raise":
                    raise sample
                if on_error == "skip":
                    logger.warning("skipped a bad sample: %s", sample)
                    skipped += 1
                else:
                    on_error(sample)
                continue
            if task is not None:
                sample["task"] = task
            yield sample
    if skipped:
        logger.warning("skipped %d bad samples of %s", skipped, ", ".join(map(str, paths)))


# ---------------------------------------------------------------- sources


def _expand(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """The paths `source` names: a path, a glob pattern, or a list of either."""
    items = [source] if isinstance(source, (str, Path)) else list(source)
    paths: list[Path] = []
    for item in items:
        if Path(item).exists():
            paths.append(Path(item))
        elif any(char in str(item) for char in "*?["):
            matches = sorted(glob.glob(str(item)))
            if not matches:
                raise InputError(f"{item}: no files match")
            paths += [Path(match) for match in matches]
        else:
            raise InputError(f"{item}: no such file or folder")
    if not paths:
        raise InputError("no data source given")
    return paths


def _detect_all(paths: list[Path], source: Any) -> str:
    formats = {_detect(path) for path in paths}
    if len(formats) > 1:
        raise InputError(f"{source}: mixed formats ({', '.join(sorted(formats))}); read them one at a time")
    return formats.pop()


def _detect(path: Path) -> str:
    name = path.name.lower()
    if path.is_file():
        if name.endswith(".jsonl"):
            return "jsonl"
        if name.endswith(".json"):
            return "llava"
        if name.endswith(".parquet"):
            return "parquet"
        if name.endswith(TAR_SUFFIXES):
            return "webdataset"
    elif path.is_dir():
        if (path / "meta" / "info.json").is_file():
            return "lerobot"
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return "hf"
        if _has(path, "*.parquet"):
            return "parquet"
        if any(_has(path, f"*{suffix}") for suffix in TAR_SUFFIXES):
            return "webdataset"
        if _has(path, "metadata.jsonl") or _has(path, "metadata.csv"):
            suffixes = (file.suffix.lower() for file in path.rglob("*"))
            medium = next((suffix for suffix in suffixes if suffix in IMAGE_SUFFIXES + AUDIO_SUFFIXES), None)
            if medium is not None:
                return "imagefolder" if medium in IMAGE_SUFFIXES else "audiofolder"
    raise InputError(f"{path}: cannot tell the data format; name it (format=, --format) as one of {', '.join(FORMATS)}")


def _has(folder: Path, pattern: str) -> bool:
    return next(iter(folder.rglob(pattern)), None) is not None


def _one_line(err: BaseException) -> str:
    return str(err).strip().split("\n")[0]


def _checked(where: str, build: Callable[..., Record], *args: Any) -> Sample:
    """The record `build(*args)` makes, validated; or, when the sample is bad, its InputError."""
    try:
        record = build(*args)
        validate_record(record, where)
    except InputError as err:
        return err
    return record


# ---------------------------------------------------------------- media parts


def _bytes_part(kind: str, data: bytes, name: str, filename: str = "") -> dict[str, Any]:
    """An in-memory media part: its format is the file name's extension, else recognised from the bytes;
    `name` says where the bytes came from, for `load_part`'s errors."""
    formats = [suffix[1:] for suffix in MEDIA_SUFFIXES[kind]]
    extension = PurePosixPath(filename).suffix.lower()[1:]
    found = extension if extension in formats else _sniff(data)
    if found not in formats:
        raise MediaError(f"{name}: not in a format read here for {kind} ({', '.join(formats)})")
    return {"type": kind, "bytes": data, "format": found, "name": name}


def _sniff(data: bytes) -> str | None:
    return next((found for offset, magic, found in MAGIC if data[offset : offset + len(magic)] == magic), None)


def _file_part(kind: str, path: Path, where: str) -> dict[str, Any]:
    """A media file as a bytes part, read now, so that a missing file is a bad sample of its record."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InputError(f"{where}: cannot read {kind} file {path} ({err.strerror})") from err
    return _bytes_part(kind, data, str(path), path.name)


def _media_parts(kind: str, value: Any, where: str, base: Path) -> list[dict[str, Any]]:
    """The media a table cell holds: `datasets`' {"bytes", "path"}, raw bytes, a file path (relative to
    `base`), a list of these, or nothing (None)."""
    if value is None:
        return []
    if isinstance(value, list):
        return [part for item in value for part in _media_parts(kind, item, where, base)]
    if isinstance(value, dict) and value.get("bytes"):
        filename = value.get("path") or ""
        return [_bytes_part(kind, value["bytes"], f"{where} ({filename})" if filename else where, filename)]
    if isinstance(value, dict) and value.get("path"):
        return [_file_part(kind, base / value["path"], where)]
    if isinstance(value, dict) and not value.get("bytes") and not value.get("path"):  # `datasets`' empty cell
        return []
    if isinstance(value, bytes) and value:
        return [_bytes_part(kind, value, where)]
    if isinstance(value, str) and value:
        return [_file_part(kind, base / value, where)]
    raise InputError(f"{where}: cannot read {kind} from {type(value).__name__} {str(value)[:40]!r}")


def _png(frame: Any) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- messages


def _captioned(media: list[dict[str, Any]], text: str, prompt: str | None) -> list[dict[str, Any]]:
    """A captioned sample's messages: a document of its media then its text, or, given a `prompt`, a
    user turn of the media and the prompt answered by the text."""
    if prompt is None:
        return [{"role": "document", "content": [*media, {"type": "text", "text": text}]}]
    return [
        {"role": "user", "content": [*media, {"type": "text", "text": prompt}]},
        {"role": "assistant", "content": [{"type": "text", "text": text}]},
    ]


def _conversation(turns: Any, media: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """Messages from LLaVA / ShareGPT turns ({"from", "value"}) or chat turns ({"role", "content"}).

    `media` fill the turns' placeholders in order: `<image>`, `<audio>`, `<video>` in text, or a content
    part such as {"type": "image"}. Media of a kind that no placeholder asks for open the first user
    turn, as LLaVA does.
    """
    if not isinstance(turns, list) or not turns:
        raise InputError(f"{where}: the conversation must be a non-empty list of turns")
    pending = {kind: [part for part in media if part["type"] == kind] for kind in ("image", "audio", "video")}
    totals = {kind: len(parts) for kind, parts in pending.items()}
    messages = []
    for i, turn in enumerate(turns):
        role, pieces = _turn(turn, f"{where}: turn {i}")
        content = []
        for piece in pieces:
            kind = piece["type"]
            if kind == "text":
                content.append(piece)
            elif pending[kind]:
                content.append(pending[kind].pop(0))
            else:
                raise InputError(f"{where}: turn {i}: more <{kind}> placeholders than the sample's {totals[kind]}")
        messages.append({"role": role, "content": content})
    unplaced = []
    for kind, left in pending.items():
        if left and len(left) < totals[kind]:
            raise InputError(f"{where}: {totals[kind] - len(left)} <{kind}> placeholders for {totals[kind]} {kind}s")
        unplaced += left
    if unplaced:
        first_user = next((message for message in messages if message["role"] == "user"), None)
        if first_user is None:
            raise InputError(f"{where}: media but no user turn to put them in")
        first_user["content"][:0] = unplaced
    for message in messages:
        message["content"] = message["content"] or [{"type": "text", "text": ""}]
    return messages


def _turn(turn: Any, at: str) -> tuple[str, list[dict[str, Any]]]:
    """A turn's role and its content as text parts and media slots ({"type": kind}, to be filled)."""
    if not isinstance(turn, dict):
        raise InputError(f"{at}: a turn must be an object")
    speaker = turn.get("from", turn.get("role"))
    role = ROLE_NAMES.get(speaker.lower()) if isinstance(speaker, str) else None
    if role is None:
        raise InputError(f"{at}: unknown speaker {speaker!r} ({', '.join(ROLE_NAMES)})")
    value = turn.get("value", turn.get("content"))
    if isinstance(value, str):
        return role, _split_placeholders(value)
    if not isinstance(value, list):
        raise InputError(f"{at}: a turn needs a string 'value', or a 'content' string or list of parts")
    pieces = []
    for part in value:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append({"type": "text", "text": part["text"]})
        elif kind in ("image", "audio", "video"):
            pieces.append({"type": kind})
        else:
            raise InputError(f"{at}: unknown content part {str(part)[:60]}")
    return role, pieces


def _split_placeholders(text: str) -> list[dict[str, Any]]:
    """Text cut at its media placeholders into text parts and slots; text that meets a placeholder is
    stripped (LLaVA writes "<image>\\n..."), and what is left empty is dropped."""
    pieces = PLACEHOLDER.split(text)  # the capture group keeps each placeholder's kind at the odd places
    if len(pieces) == 1:
        return [{"type": "text", "text": text}]
    parts = []
    for i, piece in enumerate(pieces):
        if i % 2:
            parts.append({"type": piece})
        elif piece.strip():
            parts.append({"type": "text", "text": piece.strip()})
    return parts


# ---------------------------------------------------------------- jsonl


def _read_jsonl(path: Path) -> Iterator[Sample]:
    """The project's own records, checked by `read_jsonl` (strictly: a malformed line stops the read),
    with their media files read into bytes parts."""
    for record in read_jsonl(path):
        where = f"{path}: record {record['id']!r}"
        yield _checked(where, _inline_files, record, path.parent, where)


def _inline_files(record: Record, root: Path, where: str) -> Record:
    for message in record["messages"]:
        if isinstance(message["content"], list):
            message["content"] = [
                _file_part(part["type"], root / part["path"], where) if "path" in part else part
                for part in message["content"]
            ]
    return record


# ---------------------------------------------------------------- llava


def _read_llava(path: Path, image_folder: str | Path | None = None) -> Iterator[Sample]:
    """LLaVA's JSON list; image paths are relative to `image_folder` (default: the JSON's folder)."""
    folder = Path(image_folder) if image_folder is not None else path.parent
    for index, item in enumerate(_json_list_items(path)):
        where = f"{path}: item {index}"
        yield _checked(where, _llava_record, item, where, folder, f"{path.stem}-{index}")


def _llava_record(item: Any, where: str, folder: Path, record_id: str) -> Record:
    if not isinstance(item, dict):
        raise InputError(f"{where}: an item must be an object, got {type(item).__name__}")
    images = item.get("image") or []
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(image, str) for image in images):
        raise InputError(f"{where}: 'image' must be a path or a list of paths")
    media = [_file_part("image", folder / image, where) for image in images]
    messages = _conversation(item.get("conversations"), media, where)
    meta = {"source_id": item["id"]} if "id" in item else {}
    return {"id": record_id, "task": "llava", "messages": messages, "meta": meta}


def _json_list_items(path: Path) -> Iterator[Any]:
    """The items of a file holding one JSON list, parsed one at a time, so that the file is never in
    memory whole (LLaVA's instruction sets are hundreds of MB)."""
    decoder = json.JSONDecoder()
    with path.open(encoding="utf-8") as file:
        text, position = "", 0

        def next_char() -> str:
            """The next non-space character (read from the file as needed), or "" at its end."""
            nonlocal text, position
            while True:
                while position < len(text) and text[position].isspace():
                    position += 1
                if position < len(text):
                    return text[position]
                text, position = file.read(JSON_READ_CHARS), 0
                if not text:
                    return ""

        if next_char() != "[":
            raise InputError(f"{path}: expected a JSON list of conversations")
        position += 1
        if next_char() == "]":
            return
        for index in itertools.count():  # until the list's "]"
            if not next_char():
                raise InputError(f"{path}: item {index}: the file ends inside the list")
            while True:
                try:
                    item, position = decoder.raw_decode(text, position)
                    break
                except json.JSONDecodeError as err:  # cut off by the window's end, or malformed
                    more = file.read(max(JSON_READ_CHARS, len(text) - position))  # grow geometrically
                    if not more or len(text) - position > MAX_JSON_ITEM_CHARS:
                        raise InputError(f"{path}: item {index}: not JSON ({err.msg})") from err
                    text, position = text[position:] + more, 0
            yield item
            separator = next_char()
            position += 1
            if separator == "]":
                return
            if separator != ",":
                raise InputError(f"{path}: after item {index}: expected ',' or ']', got {separator or 'the end'!r}")


# ---------------------------------------------------------------- Hugging Face tables and folders


def _read_hf(
    path: Path,
    split: str | None = None,
    prompt: str | None = None,
    text_column: str | None = None,
    conversation_column: str | None = None,
    image_column: str | None = None,
    audio_column: str | None = None,
) -> Iterator[Sample]:
    """A `save_to_disk` folder (a Dataset, or a DatasetDict and its `split`), read as Arrow batches:
    Image and Audio cells stay {"bytes", "path"}, never decoded by `datasets`."""
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except FileNotFoundError as err:
        raise InputError(f"{path}: not a `datasets` save_to_disk folder ({_one_line(err)})") from err
    if isinstance(dataset, DatasetDict):
        dataset = _split(dataset, split, path)
    elif split is not None:
        raise InputError(f"{path}: a single dataset, without splits; leave split out")
    given = {"text": text_column, "conversation": conversation_column, "image": image_column, "audio": audio_column}
    columns = _columns(dataset.column_names, dataset.features, given, str(path))
    rows = _arrow_rows(dataset.with_format("arrow").iter(batch_size=ROWS_PER_BATCH), path)
    yield from _row_samples(rows, columns, str(path), path.resolve().name, path, prompt, "hf")


def _read_parquet(
    path: Path,
    prompt: str | None = None,
    text_column: str | None = None,
    conversation_column: str | None = None,
    image_column: str | None = None,
    audio_column: str | None = None,
) -> Iterator[Sample]:
    """A parquet file, or every parquet file under a folder (in name order), streamed in row batches.
    Ids are `<file stem>-<row>` (under a folder, the file's path below it, joined by "-")."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Features

    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise InputError(f"{path}: no .parquet files")
    given = {"text": text_column, "conversation": conversation_column, "image": image_column, "audio": audio_column}
    for file in files:
        try:
            table = pq.ParquetFile(file)
        except (pa.ArrowException, OSError) as err:
            raise InputError(f"{file}: not a readable parquet file ({_one_line(err)})") from err
        schema = table.schema_arrow
        features = Features.from_arrow_schema(schema)  # `datasets` keeps its Image / Audio types in the metadata
        columns = _columns(schema.names, features, given, str(file))
        prefix = "-".join(file.relative_to(path).with_suffix("").parts) if path.is_dir() else file.stem
        rows = _arrow_rows(table.iter_batches(batch_size=ROWS_PER_BATCH), file)
        yield from _row_samples(rows, columns, str(file), prefix, file.parent, prompt, "parquet")


def _read_imagefolder(
    path: Path, split: str | None = None, prompt: str | None = None, text_column: str | None = None
) -> Iterator[Sample]:
    """An imagefolder with captions in metadata.jsonl / metadata.csv (`file_name` and a text column)."""
    return _read_folder(path, "image", split, prompt, text_column)


def _read_audiofolder(
    path: Path, split: str | None = None, prompt: str | None = None, text_column: str | None = None
) -> Iterator[Sample]:
    """An audiofolder with transcripts in metadata.jsonl / metadata.csv (`file_name` and a text column)."""
    return _read_folder(path, "audio", split, prompt, text_column)


def _read_folder(
    path: Path, kind: str, split: str | None, prompt: str | None, text_column: str | None
) -> Iterator[Sample]:
    from datasets import Value, load_dataset

    try:
        splits = load_dataset(f"{kind}folder", data_dir=str(path), streaming=True)
    except (FileNotFoundError, ValueError) as err:
        raise InputError(f"{path}: not a readable {kind}folder ({_one_line(err)})") from err
    # The builders give each file's local path; read as a plain string, since the Audio feature's
    # encoder needs torchcodec even with decode=False.
    dataset = _split(splits, split, path).cast_column(kind, Value("string"))
    columns = _columns(list(dataset.features), dataset.features, {"text": text_column, kind: kind}, str(path))
    yield from _row_samples(iter(dataset), columns, str(path), path.resolve().name, path, prompt, f"{kind}folder")


def _split(splits: Any, split: str | None, path: Path) -> Any:
    """The split asked for, else "train", else the only one."""
    names = list(splits)
    if split is None:
        if "train" not in names and len(names) != 1:
            raise InputError(f"{path}: several splits ({', '.join(names)}); choose one with split=")
        split = "train" if "train" in names else names[0]
    if split not in names:
        raise InputError(f"{path}: no split {split!r} (splits: {', '.join(names)})")
    return splits[split]


def _columns(names: list[str], features: Any, given: dict[str, str | None], where: str) -> dict[str, str]:
    """The column of each role (text, conversation, image, audio): the one named, else the first of the
    `datasets` feature type (Image, Audio), else the first of the common names."""
    columns = {}
    for role, column in given.items():
        if column is not None:
            if column not in names:
                raise InputError(f"{where}: no column {column!r} (columns: {', '.join(names)})")
            columns[role] = column
    known = {**MEDIA_COLUMNS}
    if "text" not in columns and "conversation" not in columns:  # a column named is not overruled by one found
        known.update(text=TEXT_COLUMNS, conversation=CONVERSATION_COLUMNS)
    kinds = {name: _feature_kind(features.get(name)) for name in names}
    for role, common in known.items():
        found = [name for name in names if kinds[name] == role] + [name for name in common if name in names]
        if role not in columns and found:
            columns[role] = found[0]
    if "text" not in columns and "conversation" not in columns:
        raise InputError(
            f"{where}: no text column (none of {', '.join(TEXT_COLUMNS + CONVERSATION_COLUMNS)} among "
            f"{', '.join(names)}); name one with text_column= or conversation_column="
        )
    return columns


def _feature_kind(feature: Any) -> str | None:
    """The modality ("image" or "audio") of a `datasets` Image or Audio feature, or of a list of them."""
    from datasets import Audio
    from datasets import Image as ImageFeature

    while hasattr(feature, "feature"):  # List, LargeList, Sequence
        feature = feature.feature
    if isinstance(feature, ImageFeature):
        return "image"
    if isinstance(feature, Audio):
        return "audio"
    return None


def _arrow_rows(batches: Iterable[Any], where: Path) -> Iterator[dict[str, Any]]:
    import pyarrow as pa

    try:
        for batch in batches:
            yield from batch.to_pylist()
    except pa.ArrowException as err:
        raise InputError(f"{where}: unreadable rows ({_one_line(err)})") from err


def _row_samples(
    rows: Iterable[dict[str, Any]],
    columns: dict[str, str],
    source: str,
    prefix: str,
    base: Path,
    prompt: str | None,
    task: str,
) -> Iterator[Sample]:
    for index, row in enumerate(rows):
        where = f"{source}:row {index}"
        yield _checked(where, _row_record, row, columns, where, base, prompt, f"{prefix}-{index}", task)


def _row_record(
    row: dict[str, Any], columns: dict[str, str], where: str, base: Path, prompt: str | None, record_id: str, task: str
) -> Record:
    media = []
    for kind in MEDIA_COLUMNS:
        if kind in columns:
            media += _media_parts(kind, row[columns[kind]], f"{where}, column {columns[kind]!r}", base)
    if "conversation" in columns:
        messages = _conversation(row[columns["conversation"]], media, where)
    else:
        text = row[columns["text"]]
        if not isinstance(text, str):
            raise InputError(f"{where}: column {columns['text']!r} must hold text, got {type(text).__name__}")
        messages = _captioned(media, text, prompt)
    return {"id": record_id, "task": task, "messages": messages}


# ---------------------------------------------------------------- WebDataset


def _read_webdataset(path: Path, prompt: str | None = None) -> Iterator[Sample]:
    """Tar shards (a file, or every shard under a folder in name order), each read in one pass. A
    sample's media are its image / audio / video members; its caption is its .txt, .caption or
    .text member, or the "caption" (or "text") of its .json, which also becomes the meta."""
    shards = sorted(file for file in path.rglob("*") if file.name.endswith(TAR_SUFFIXES)) if path.is_dir() else [path]
    for shard in shards:
        stem = next(shard.name[: -len(suffix)] for suffix in TAR_SUFFIXES if shard.name.endswith(suffix))
        for key, members in _tar_samples(shard):
            where = f"{shard}:{key}"
            yield _checked(where, _webdataset_record, key, members, where, f"{stem}-{key}", prompt)


def _tar_samples(shard: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample. WebDataset's convention: a member's key is its path up to
    the first dot of its file name, and the members of a sample follow one another."""
    key, members = None, {}
    try:
        with tarfile.open(shard, "r|*") as tar:  # a stream: members are read in order, never seeked
            for member in tar:
                folder, _, filename = member.name.rpartition("/")
                stem, dot, extension = filename.partition(".")
                if not member.isfile() or not stem or not dot:
                    continue
                member_key = f"{folder}/{stem}" if folder else stem
                if member_key != key:
                    if members:
                        yield key, members
                    key, members = member_key, {}
                members[extension.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise InputError(f"{shard}: not a readable tar ({_one_line(err)})") from err
    if members:
        yield key, members


def _webdataset_record(key: str, members: dict[str, bytes], where: str, record_id: str, prompt: str | None) -> Record:
    media = [
        _bytes_part(WEBDATASET_MEDIA[extension], data, f"{where}.{extension}", f"{key}.{extension}")
        for extension, data in members.items()
        if extension in WEBDATASET_MEDIA
    ]
    texts = {
        extension: _utf8(members[extension], f"{where}.{extension}")
        for extension in ("json", *WEBDATASET_TEXT)
        if extension in members
    }
    meta: dict[str, Any] = {"key": key}
    caption = next((texts[extension].strip() for extension in WEBDATASET_TEXT if extension in texts), None)
    if "json" in texts:
        try:
            info = json.loads(texts["json"])
        except json.JSONDecodeError as err:
            raise InputError(f"{where}.json: not JSON ({err.msg} at column {err.colno})") from err
        if isinstance(info, dict):
            meta["json"] = info
            found = info.get("caption", info.get("text"))
            if caption is None and isinstance(found, str):
                caption = found
    if caption is None:
        raise InputError(f"{where}: no caption (a .txt, .caption or .text member, or 'caption' in its .json)")
    return {"id": record_id, "task": "webdataset", "messages": _captioned(media, caption, prompt), "meta": meta}


def _utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start})") from err


# ---------------------------------------------------------------- LeRobot


def _read_lerobot(
    path: Path, chunk_length: int = LEROBOT_CHUNK_LENGTH, stride: int | None = None, camera: str | None = None
) -> Iterator[Sample]:
    """A LeRobot v2 dataset: per episode, one record per chunk of `chunk_length` actions, every `stride`
    steps (default: `chunk_length`, so chunks do not overlap); a tail shorter than a chunk is left out.
    The user turn is the `camera`'s frame at the chunk's start (default camera: the first video or image
    feature of meta/info.json) and the task's instruction; the assistant turn is the action chunk."""
    info_path = path / "meta" / "info.json"
    info = _json_file(info_path)
    version = str(info.get("codebase_version", ""))
    if not version.startswith("v2"):
        raise InputError(f"{info_path}: codebase_version {version!r}; this reader takes LeRobot v2.x datasets")
    for key in ("fps", "features", "data_path", "total_episodes"):
        if key not in info:
            raise InputError(f"{info_path}: no {key!r}")
    features = info["features"]
    if "action" not in features:
        raise InputError(f"{info_path}: no 'action' feature (features: {', '.join(features)})")
    cameras = [name for name, spec in features.items() if spec.get("dtype") in ("video", "image")]
    camera = camera or (cameras[0] if cameras else None)
    if camera not in cameras:
        raise InputError(f"{info_path}: no camera {camera!r} (video or image features: {', '.join(cameras) or 'none'})")
    stride = stride or chunk_length
    if chunk_length < 1 or stride < 1:
        raise InputError(f"{path}: chunk_length and stride must be positive, got {chunk_length} and {stride}")
    tasks = {row.get("task_index"): row.get("task") for row in _jsonl_rows(path / "meta" / "tasks.jsonl")}
    episodes = _LeRobotEpisodes(path, info, camera, chunk_length, stride, tasks)
    for episode in range(info["total_episodes"]):
        yield from episodes.samples(episode)


class _LeRobotEpisodes:
    """What the episodes of a LeRobot dataset share, and the records of one episode."""

    def __init__(self, root: Path, info: dict, camera: str, chunk_length: int, stride: int, tasks: dict) -> None:
        self.root, self.info, self.camera, self.tasks = root, info, camera, tasks
        self.chunk_length, self.stride = chunk_length, stride
        self.from_video = info["features"][camera]["dtype"] == "video"  # else an image column of the parquet

    def samples(self, episode: int) -> Iterator[Sample]:
        """The episode's records; an episode whose parquet or video cannot be read is one bad sample."""
        chunk = episode // self.info.get("chunks_size", LEROBOT_CHUNKS_SIZE)
        data = self.root / self.info["data_path"].format(episode_chunk=chunk, episode_index=episode)
        try:
            table = _parquet_columns(data, ["action", "task_index"] + ([] if self.from_video else [self.camera]))
            actions = table.column("action").to_pylist()
            starts = list(range(0, len(actions) - self.chunk_length + 1, self.stride))
            if self.from_video:
                video = self.info.get("video_path", "")
                video = video.format(episode_chunk=chunk, video_key=self.camera, episode_index=episode)
                frames = _video_frames(self.root / video, starts)
            else:
                cells = table.column(self.camera).to_pylist()
                frames = [cells[start] for start in starts]
        except InputError as err:
            yield err
            return
        task_indices = table.column("task_index").to_pylist()
        for start, frame in zip(starts, frames, strict=True):
            where = f"{data}:row {start}"
            chunk_actions = actions[start : start + self.chunk_length]
            yield _checked(where, self._record, episode, start, frame, chunk_actions, task_indices[start], where)

    def _record(self, episode: int, start: int, frame: Any, actions: list, task_index: int, where: str) -> Record:
        if self.from_video:
            images = [frame]
        else:
            images = _media_parts("image", frame, f"{where}, column {self.camera!r}", self.root)
            if len(images) != 1:
                raise InputError(f"{where}: column {self.camera!r} must hold one image, got {len(images)}")
        instruction = self.tasks.get(task_index)
        if not isinstance(instruction, str):
            raise InputError(f"{where}: task_index {task_index} has no task in meta/tasks.jsonl")
        return {
            "id": f"{self.root.resolve().name}-{episode}-{start}",
            "task": "lerobot",
            "messages": [
                {"role": "user", "content": [*images, {"type": "text", "text": instruction}]},
                {"role": "assistant", "content": [{"type": "action", "values": actions}]},
            ],
            "meta": {"episode_index": episode, "frame_index": start, "fps": self.info["fps"], "camera": self.camera},
        }


def _parquet_columns(path: Path, columns: list[str]) -> Any:
    """The named columns of a parquet file as a pyarrow Table, or an InputError naming the first missing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        missing = [column for column in columns if column not in names]
        if missing:
            raise InputError(f"{path}: no column {missing[0]!r} (columns: {', '.join(names)})")
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"{path}: not a readable parquet file ({_one_line(err)})") from err


def _video_frames(video: Path, indices: Sequence[int]) -> list[dict[str, Any]]:
    """The frames of `video` at `indices` (ascending) as PNG bytes parts, decoded in one pass that stops
    at the last one asked for."""
    import av  # PyAV loads FFmpeg's libraries: imported only when a video is read

    if not indices:
        return []
    if not video.is_file():
        raise MediaError(f"{video}: no such file")
    wanted, parts, decoded = set(indices), [], 0
    try:
        with av.open(str(video)) as container:
            if not container.streams.video:
                raise MediaError(f"{video}: no video stream")
            for index, frame in enumerate(container.decode(video=0)):
                decoded = index + 1
                if index in wanted:
                    data = _png(frame.to_ndarray(format="rgb24"))
                    parts.append({"type": "image", "bytes": data, "format": "png", "name": f"{video}: frame {index}"})
                if index == indices[-1]:
                    break
    except av.FFmpegError as err:
        raise MediaError(f"{video}: not a readable video ({_one_line(err)})") from err
    if len(parts) < len(indices):
        raise MediaError(f"{video}: {decoded} frames, but the episode's chunks start up to frame {indices[-1]}")
    return parts


def _json_file(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from err
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not JSON ({err.msg} at line {err.lineno})") from err
    if not isinstance(value, dict):
        raise InputError(f"{path}: expected a JSON object")
    return value


def _jsonl_rows(path: Path) -> Iterator[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from err
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{number}: not JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise InputError(f"{path}:{number}: expected a JSON object")
            yield row


READERS: dict[str, Callable[..., Iterator[Sample]]] = {
    "jsonl": _read_jsonl,
    "llava": _read_llava,
    "hf": _read_hf,
    "parquet": _read_parquet,
    "imagefolder": _read_imagefolder,
    "audiofolder": _read_audiofolder,
    "webdataset": _read_webdataset,
    "lerobot": _read_lerobot,
}
FORMATS = tuple(READERS)
