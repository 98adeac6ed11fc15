"""Offline pretokenization: interleaved records -> Arrow shards of token ids, written once.

    mmllm pretokenize --data SRC --model-or-layout DIR --out SHARDS [--num-proc P] [--shard i/N]

`DIR` is a checkpoint or a tokenizer bundle: `vocab_layout.json`, `text_tokenizer/`, and one
`tokenizers/NAME/` per modality the data uses (`TokenizerBundle`). Every record is read by
`mmllm.data.formats`, its media run through their modality tokenizers in batches, and the
result framed by the chat template: a conversation as turns (loss on assistant turns), a
`document` message as `<|bos|> ... <|eos|>` (loss on everything).

Each shard row is one record (a `datasets` Arrow table, `SHARD_FEATURES`):

- `input_ids`, `loss_mask`: the ids and the training targets;
- `modality`: per token, 0 for text and specials, 1 + the layout index of a media span's
  modality (its delimiters included): the packer never cuts inside a span, and the loss is
  reported per modality;
- `condition`: per token, the conditioning text of a generation sample (a prompt whose answer
  is an image, audio or video; a document's text before such a span), which classifier-free
  guidance training may replace by `<|null|>`;
- `splittable`: documents may continue across packed rows, conversations may not;
- `id`, `task`.

Work is cut into chunks of `chunk_size` records. Each chunk is written to a temporary dir and
renamed into place, so a killed job loses at most the chunks in flight, and a rerun skips the
chunks that exist. `--shard i/N` keeps every N-th record (run one per machine, or let
`torchrun`/`deepspeed` ranks pick theirs from RANK/WORLD_SIZE); `--num-proc` encodes chunks in
worker processes. A record that cannot be read or encoded is skipped, counted, and listed with
its one-line error in the part's `report.json`; the job never dies on one sample.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mmllm.chat_template import encode_conversation, encode_document
from mmllm.data.interleaved import load_part
from mmllm.data.packing import Document
from mmllm.errors import InputError, LayoutError, MMLLMError
from mmllm.model.mmllm import LAYOUT_FILE, MODALITY_TOKENIZERS_DIR, TEXT_TOKENIZER_DIR
from mmllm.model.weights import atomic_directory
from mmllm.text_tokenizer import check_text_tokenizer, has_tokenizer_files, load_text_tokenizer
from mmllm.tokenizers.base import ModalityTokenizer, load_tokenizer
from mmllm.vocab import VocabLayout

GENERATED_MODALITIES = ("image", "audio", "video")  # outputs that classifier-free guidance steers
CHUNK_PREFIX = "chunk-"
REPORT_FILE = "report.json"
FAILURES_FILE = "failures.json"  # inside each chunk dir: the records it skipped and why
MANIFEST_FILE = "pretokenize.json"


def shard_features():
    """The Arrow schema of a shard (built lazily: importing `datasets` costs a second)."""
    from datasets import Features, Sequence, Value

    return Features(
        {
            "id": Value("string"),
            "task": Value("string"),
            "input_ids": Sequence(Value("int32")),
            "loss_mask": Sequence(Value("bool")),
            "modality": Sequence(Value("int8")),
            "condition": Sequence(Value("bool")),
            "splittable": Value("bool"),
        }
    )


# ---------------------------------------------------------------- the tokenizers of a vocabulary


@dataclass
class TokenizerBundle:
    """Everything that turns a record into ids: the layout, the text tokenizer, the modality tokenizers."""

    layout: VocabLayout
    text_tokenizer: Any
    modality_tokenizers: dict[str, ModalityTokenizer] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> TokenizerBundle:
        """From a checkpoint dir or a bundle dir (same file names, weights not needed)."""
        path = Path(path)
        if not (path / LAYOUT_FILE).is_file():
            raise LayoutError(f"{path}: no {LAYOUT_FILE} (give a checkpoint or a dir made by `mmllm vocab build`)")
        layout = VocabLayout.load(path / LAYOUT_FILE)
        if not has_tokenizer_files(path / TEXT_TOKENIZER_DIR):
            raise LayoutError(f"{path}: no {TEXT_TOKENIZER_DIR}/ beside {LAYOUT_FILE}")
        text_tokenizer = load_text_tokenizer(path / TEXT_TOKENIZER_DIR)
        check_text_tokenizer(layout, text_tokenizer, str(path))
        tokenizers = {}
        root = path / MODALITY_TOKENIZERS_DIR
        for directory in sorted(root.iterdir()) if root.is_dir() else ():
            if directory.is_dir():
                tokenizer = load_tokenizer(directory)
                tokenizer.check_fits(layout.modality(directory.name), f"{directory}")
                tokenizers[directory.name] = tokenizer
        return cls(layout, text_tokenizer, tokenizers)

    def save(self, path: str | Path) -> None:
        with atomic_directory(path) as tmp:
            self.layout.save(tmp / LAYOUT_FILE)
            self.text_tokenizer.save_pretrained(str(tmp / TEXT_TOKENIZER_DIR))
            for name, tokenizer in self.modality_tokenizers.items():
                tokenizer.save_pretrained(tmp / MODALITY_TOKENIZERS_DIR / name)

    def tokenizer(self, modality: str) -> ModalityTokenizer:
        if modality not in self.modality_tokenizers:
            have = ", ".join(sorted(self.modality_tokenizers)) or "none"
            raise LayoutError(f"no {modality} tokenizer in the bundle (it has: {have}); add tokenizers/{modality}/")
        return self.modality_tokenizers[modality]


# ---------------------------------------------------------------- one record -> one row


def encode_record(record: dict[str, Any], bundle: TokenizerBundle) -> dict[str, Any]:
    """The shard row of a record whose media parts already carry codes."""
    messages = record["messages"]
    if messages[0]["role"] == "document":
        encoded = encode_document(messages[0]["content"], bundle.layout, bundle.text_tokenizer)
    else:
        encoded = encode_conversation(messages, bundle.layout, bundle.text_tokenizer)
    index_of = {name: i + 1 for i, name in enumerate(bundle.layout.modalities)}
    modality = np.array([index_of.get(part, 0) for part in encoded.parts], dtype=np.int8)
    parts, roles = np.array(encoded.parts), np.array(encoded.roles)
    return {
        "id": record["id"],
        "task": record["task"],
        "input_ids": np.asarray(encoded.input_ids, dtype=np.int32),
        "loss_mask": np.asarray(encoded.loss_mask, dtype=bool),
        "modality": modality,
        "condition": _condition_mask(parts, roles),
        "splittable": bool(messages[0]["role"] == "document"),
    }


def _condition_mask(parts: np.ndarray, roles: np.ndarray) -> np.ndarray:
    """Text that conditions a generated image/audio/video: the user text of a conversation whose
    assistant answers with one, or a document's text before its first such span."""
    generated = np.isin(parts, GENERATED_MODALITIES)
    is_text = parts == "text"
    if not generated.any():
        return np.zeros(len(parts), dtype=bool)
    if (roles == "document").any():
        first = int(np.argmax(generated))
        return is_text & (np.arange(len(parts)) < first)
    if not (generated & (roles == "assistant")).any():
        return np.zeros(len(parts), dtype=bool)
    return is_text & (roles == "user")


def tokenize_media(records: list[dict[str, Any]], root: Path | None, bundle: TokenizerBundle) -> list[str | None]:
    """Replace every file/inline media part of `records` by its codes, batched per modality.

    Returns, per record, None or the one-line error that makes it unusable.
    """
    errors: list[str | None] = [None] * len(records)
    pending: dict[str, list[tuple[int, dict[str, Any], np.ndarray]]] = {}
    for r, record in enumerate(records):
        try:
            for message in record["messages"]:
                content = message["content"]
                for part in content if isinstance(content, list) else ():
                    if part["type"] == "text" or "codes" in part:
                        continue
                    tokenizer = bundle.tokenizer(part["type"])
                    raw = load_part(part, root, **_audio_rate(tokenizer))
                    media = tokenizer.prepare(raw, part.get("name") or part.get("path") or "inline media")
                    pending.setdefault(part["type"], []).append((r, part, media))
        except MMLLMError as err:
            errors[r] = str(err)
    for modality, items in pending.items():
        usable = [(r, part, media) for r, part, media in items if errors[r] is None]
        codes = bundle.tokenizer(modality).encode([media for _, _, media in usable]).items() if usable else []
        for (_, part, _), item_codes in zip(usable, codes, strict=True):
            for source_key in ("path", "values", "bytes", "format", "name"):
                part.pop(source_key, None)
            part["codes"] = item_codes
    return errors


def _audio_rate(tokenizer: ModalityTokenizer) -> dict[str, int]:
    rate = getattr(tokenizer, "sample_rate", None)
    return {"sample_rate": rate} if tokenizer.modality == "audio" and rate else {}


# ---------------------------------------------------------------- the job


@dataclass
class PretokenizeReport:
    records: int = 0  # records of this part (this shard's share of the source)
    written: int = 0
    skipped: int = 0
    tokens: int = 0
    chunks_reused: int = 0  # chunks found complete from an earlier, interrupted run
    seconds: float = 0.0
    failures: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def parse_shard(spec: str | None) -> tuple[int, int]:
    """`i/N` -> (i, N); None -> this process's RANK/WORLD_SIZE under torchrun/deepspeed, else (0, 1)."""
    if spec is None:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        index, count = (int(x) for x in spec.split("/"))
    except ValueError:
        raise InputError(f"--shard must look like i/N (e.g. 0/4), got {spec!r}") from None
    if not 0 <= index < count:
        raise InputError(f"--shard {spec}: need 0 <= i < N")
    return index, count


def pretokenize(
    records: Iterator[dict[str, Any]],
    root: str | Path | None,
    bundle_dir: str | Path,
    out: str | Path,
    shard: tuple[int, int] = (0, 1),
    num_proc: int = 1,
    chunk_size: int = 256,
    progress: bool = True,
) -> PretokenizeReport:
    """Encode this shard's share of `records` into `out/part-i-of-N/chunk-*` and write its report.

    `root` is the folder `path` parts are relative to (None when records carry their media, as
    `mmllm.data.formats` readers make them).
    """
    index, count = shard
    part_dir = Path(out) / f"part-{index:05d}-of-{count:05d}"
    part_dir.mkdir(parents=True, exist_ok=True)
    bundle = TokenizerBundle.load(bundle_dir)
    _write_manifest(Path(out), bundle, bundle_dir)
    report = PretokenizeReport()
    start = time.perf_counter()
    mine = (record for n, record in enumerate(records) if n % count == index)
    bar = tqdm(desc=f"pretokenize {part_dir.name}", unit="rec", disable=not progress)
    context = get_context("spawn")
    pool = ProcessPoolExecutor(num_proc, context, _init_worker, (str(bundle_dir),)) if num_proc > 1 else None
    in_flight: set[Future] = set()

    def collect(futures) -> None:
        for future in futures:
            result = future.result()
            _add_chunk(report, *result)
            bar.update(result[0])

    try:
        for number, chunk in enumerate(_chunks(mine, chunk_size)):
            target = part_dir / f"{CHUNK_PREFIX}{number:06d}"
            if target.exists():  # finished by an earlier run
                report.chunks_reused += 1
                _add_chunk(report, len(chunk), *_read_chunk_summary(target))
                bar.update(len(chunk))
                continue
            if pool is None:
                written = _encode_chunk(chunk, _as_path(root), bundle, target)
                _add_chunk(report, *written)
                bar.update(len(chunk))
                continue
            if len(in_flight) >= 2 * num_proc:  # bounded: records stay streamed, not all in memory
                done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                collect(done)
            in_flight.add(pool.submit(_encode_chunk_in_worker, chunk, _as_path(root), target))
        collect(wait(in_flight).done)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    report.seconds = round(time.perf_counter() - start, 3)
    (part_dir / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    return report


def _chunks(records: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _encode_chunk(
    chunk: list[dict[str, Any]], root: Path | None, bundle: TokenizerBundle, target: Path
) -> tuple[int, int, int, list[dict[str, str]]]:
    """Encode and write one chunk atomically; (records, written, tokens, failures)."""
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()  # one bar per job (ours), not one per chunk write
    errors = tokenize_media(chunk, root, bundle)
    rows, failures = [], []
    for record, error in zip(chunk, errors, strict=True):
        if error is None:
            try:
                rows.append(encode_record(record, bundle))
            except MMLLMError as err:
                error = str(err)
        if error is not None:
            failures.append({"id": str(record.get("id")), "error": error})
    columns = {name: [row[name] for row in rows] for name in shard_features()}
    tokens = sum(len(row["input_ids"]) for row in rows)
    with atomic_directory(target) as tmp:
        Dataset.from_dict(columns, features=shard_features()).save_to_disk(str(tmp / "data"))
        summary = {"written": len(rows), "tokens": tokens, "failures": failures}
        (tmp / FAILURES_FILE).write_text(json.dumps(summary) + "\n")
    return len(chunk), len(rows), tokens, failures


def _read_chunk_summary(target: Path) -> tuple[int, int, list[dict[str, str]]]:
    summary = json.loads((target / FAILURES_FILE).read_text())
    return summary["written"], summary["tokens"], summary["failures"]


def _add_chunk(report: PretokenizeReport, records: int, written: int, tokens: int, failures) -> None:
    report.records += records
    report.written += written
    report.skipped += len(failures)
    report.tokens += tokens
    report.failures += failures


_WORKER_BUNDLE: TokenizerBundle | None = None


def _init_worker(bundle_dir: str) -> None:
    import torch

    torch.set_num_threads(1)  # one thread per worker process: --num-proc sets the parallelism
    global _WORKER_BUNDLE
    _WORKER_BUNDLE = TokenizerBundle.load(bundle_dir)


def _encode_chunk_in_worker(chunk: list[dict[str, Any]], root: Path | None, target: Path):
    assert _WORKER_BUNDLE is not None
    return _encode_chunk(chunk, root, _WORKER_BUNDLE, target)


def _as_path(root: str | Path | None) -> Path | None:
    return None if root is None else Path(root)


def _write_manifest(out: Path, bundle: TokenizerBundle, bundle_dir: str | Path) -> None:
    """What the shards were made with; `load_shards` refuses shards of another layout."""
    manifest = {"layout": bundle.layout.to_dict(), "bundle": str(bundle_dir)}
    path = out / MANIFEST_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        if old["layout"] != manifest["layout"]:
            raise LayoutError(f"{out}: holds shards of another vocab layout; use a new --out dir")
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------- reading shards back


def load_shards(path: str | Path, layout: VocabLayout | None = None):
    """All chunks under `path` (every part) as one memory-mapped `datasets.Dataset`.

    With `layout`, refuses shards written for a different vocabulary.
    """
    from datasets import concatenate_datasets, load_from_disk

    path = Path(path)
    if not (path / MANIFEST_FILE).is_file():
        raise InputError(f"{path}: not a pretokenized shard dir (no {MANIFEST_FILE}; run `mmllm pretokenize`)")
    if layout is not None:
        written_for = VocabLayout.from_dict(json.loads((path / MANIFEST_FILE).read_text())["layout"], str(path))
        if written_for.to_dict() != layout.to_dict():
            raise LayoutError(f"{path}: shards were written for another vocab layout than the model's")
    chunks = sorted(path.glob(f"part-*/{CHUNK_PREFIX}*/data"))
    if not chunks:
        raise InputError(f"{path}: no finished chunks (is pretokenization still running?)")
    return concatenate_datasets([load_from_disk(str(chunk)) for chunk in chunks])


class ShardDocuments:
    """The rows of a shard dataset as packing `Document`s, read lazily by index."""

    def __init__(self, dataset, source: int = 0) -> None:
        self.dataset = dataset.with_format("numpy")
        self.source = source

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Document:
        row = self.dataset[int(i)]
        return Document(
            row["input_ids"].astype(np.int64),
            row["loss_mask"].astype(bool),
            row["modality"].astype(np.int8),
            row["condition"].astype(bool),
            bool(row["splittable"]),
            self.source,
        )
