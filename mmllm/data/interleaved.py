"""The project's interleaved JSONL (docs/data_format.md): read and validate records, load parts.

`read_jsonl` validates each record as it reads it and names the file and line of the first
problem; `load_part` turns a record's media part into an array in the media conventions. Records
built in memory (by `mmllm.data.formats`) may also carry media as an encoded file's `bytes`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from mmllm.data.media import DEFAULT_AUDIO_RATE, MEDIA_SUFFIXES, check_actions, decode_media, read_media
from mmllm.errors import InputError

ROLES = ("system", "user", "assistant", "document")
MEDIA_TYPES = ("image", "audio", "video", "action")
# where a media part's content is: a file, inline actions, tokenizer codes, or an encoded file's bytes in memory
SOURCES = ("path", "values", "codes", "bytes")


def read_jsonl(path: str | Path, check_media: bool = False) -> Iterator[dict[str, Any]]:
    """The records of an interleaved JSONL file, each validated; blank lines are skipped.

    A malformed record raises `InputError("<file>:<line>: <problem>")`. With `check_media`, every
    part's file must exist (paths are relative to the JSONL's folder).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    seen: set[str] = set()
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{where}: not JSON ({err.msg} at column {err.colno})") from err
            validate_record(record, where, path.parent if check_media else None)
            if record["id"] in seen:
                raise InputError(f"{where}: duplicate id {record['id']!r}")
            seen.add(record["id"])
            yield record


def record_texts(record: dict[str, Any]) -> list[str]:
    """Every text part of a record's messages, in order (a corpus for a text tokenizer)."""
    texts: list[str] = []
    for message in record["messages"]:
        content = message["content"]
        texts += [content] if isinstance(content, str) else [p["text"] for p in content if p["type"] == "text"]
    return texts


def validate_record(record: Any, where: str, media_root: Path | None = None) -> None:
    """Raise `InputError("<where>: ...")` unless `record` fits docs/data_format.md."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    for key in ("id", "task"):
        if not isinstance(record.get(key), str) or not record[key]:
            raise InputError(f"{where}: {key!r} must be a non-empty string")
    if not isinstance(record.get("meta", {}), dict):
        raise InputError(f"{where}: 'meta' must be an object")
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: 'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        at = f"{where}: message {i}"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise InputError(f"{at}: needs a 'role' in {', '.join(ROLES)}")
        if message["role"] == "document" and len(messages) != 1:
            raise InputError(f"{at}: a 'document' message must be the record's only message")
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list) or not content:
            raise InputError(f"{at}: 'content' must be a string or a non-empty list of parts")
        for j, part in enumerate(content):
            _validate_part(part, f"{at}, part {j}", media_root)


def _validate_part(part: Any, at: str, media_root: Path | None) -> None:
    if not isinstance(part, dict):
        raise InputError(f"{at}: a part must be an object")
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise InputError(f"{at}: a text part needs a string 'text'")
        return
    if kind not in MEDIA_TYPES:
        raise InputError(f"{at}: unknown part type {kind!r} (text, {', '.join(MEDIA_TYPES)})")
    sources = [key for key in SOURCES if key in part]
    if len(sources) != 1:
        raise InputError(f"{at}: a {kind} part needs exactly one of {', '.join(SOURCES)}, got {sources or 'none'}")
    if "values" in part:
        if kind != "action":
            raise InputError(f"{at}: inline 'values' are for action parts; a {kind} part needs a 'path'")
        check_actions(part["values"], at)
    elif "codes" in part:
        try:
            codes = np.asarray(part["codes"])
        except ValueError as err:
            raise InputError(f"{at}: 'codes' must be a rectangular array of integers") from err
        if codes.size == 0 or codes.dtype.kind not in "iu":
            raise InputError(f"{at}: 'codes' must be a non-empty array of integers")
    elif "bytes" in part:
        if not isinstance(part["bytes"], bytes) or not part["bytes"]:
            raise InputError(f"{at}: 'bytes' must be a non-empty bytes object")
        formats = [suffix[1:] for suffix in MEDIA_SUFFIXES[kind]]
        if not isinstance(part.get("format"), str) or part["format"].lower() not in formats:
            raise InputError(f"{at}: a {kind} part with 'bytes' needs a 'format' in {', '.join(formats)}")
    else:
        relative = part["path"]
        if not isinstance(relative, str) or not relative:
            raise InputError(f"{at}: 'path' must be a non-empty string")
        pure = PurePosixPath(relative)
        if pure.is_absolute() or ".." in pure.parts:
            raise InputError(f"{at}: 'path' {relative!r} must stay inside the JSONL's folder (relative, no '..')")
        if media_root is not None and not (media_root / relative).is_file():
            raise InputError(f"{at}: media file {relative!r} does not exist")


def load_part(
    part: dict[str, Any], root: str | Path | None = None, sample_rate: int = DEFAULT_AUDIO_RATE
) -> np.ndarray:
    """A validated media part as an array: its file read by modality (relative to `root`, the JSONL's
    folder), its inline action values, its codes (int64), or its in-memory bytes decoded as that file."""
    if "codes" in part:
        return np.asarray(part["codes"], dtype=np.int64)
    if "values" in part:
        return check_actions(part["values"], "inline action part")
    if "bytes" in part:
        where = part.get("name") or f"in-memory {part['format']} {part['type']}"
        return decode_media(part["type"], part["bytes"], part["format"], where, sample_rate)
    if root is None:
        raise InputError(f"{part['path']}: a media file's part needs the folder its path is relative to (root)")
    return read_media(part["type"], Path(root) / part["path"], sample_rate)
