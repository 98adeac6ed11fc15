"""`VocabLayout`: the one description of the unified vocabulary.

Every id the transformer sees falls in exactly one place:

    [0, text_size)               the text tokenizer's ids (its own specials included)
    [text_size, base_rows)       unused padding rows of a pretrained embedding (Qwen2: 151,665
                                 tokens in 151,936 rows); never produced, never allowed
    [base_rows, ...)             our special tokens: document, chat roles, span delimiters,
                                 pad, the CFG null token, register / pause / spare slots
    then one range per modality  its codes, with their structure (grid, residual levels with
                                 per-level sub-ranges, how levels are flattened into a stream)
    [total_size, padded_size)    padding up to a multiple of 64

The layout maps codes to ids and back, splits generated id streams into text and media spans,
and says which ids may come next at each step of a span (the generator's logit masks). It is
saved as `vocab_layout.json` in every checkpoint; no other code computes an offset by hand.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mmllm.config import from_dict, read_json_object
from mmllm.errors import LayoutError

FORMAT_NAME = "mmllm.vocab_layout"
FORMAT_VERSION = 1
# Embedding rows are padded to a multiple of 64 so the LM-head matmul tiles evenly (nanoGPT).
PAD_MULTIPLE = 64

Flattening = Literal["frame_major", "first_k", "delay"]
FLATTENINGS: tuple[str, ...] = ("frame_major", "first_k", "delay")

DOCUMENT_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|null|>")
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_OF_TURN = "<|end_of_turn|>"
LATENT_TOKEN = "<|latent|>"
# Begin/end delimiters of the standard span kinds; other modalities get <|begin_NAME|> etc.
SPAN_TOKENS = {
    "image": ("<|boi|>", "<|eoi|>"),
    "audio": ("<|boa|>", "<|eoa|>"),
    "video": ("<|bov|>", "<|eov|>"),
    "action": ("<|boact|>", "<|eoact|>"),
    "latent": ("<|bolt|>", "<|eolt|>"),
}


def span_tokens(modality: str) -> tuple[str, str]:
    """The begin and end token names of a modality's spans."""
    return SPAN_TOKENS.get(modality, (f"<|begin_{modality}|>", f"<|end_{modality}|>"))


@dataclass
class ModalityRange:
    """One modality's id range and the structure of its codes.

    An item is a sequence of frames (grid cells for images and video, time steps for audio);
    each frame has `levels` codes (residual or multi-codebook levels), each level its own
    sub-range of `codebook_size` ids. Frames are flattened into the token stream by:

    * `frame_major`: f0l0 f0l1 ... f1l0 ... (AnyGPT's music, VALL-E style interleave);
    * `first_k`: the same, keeping only the first `first_k` levels (coarse codes only);
    * `delay`: MusicGen's delay pattern: level l lags l steps and each step carries one code per
      level, the gaps filled with the range's `empty` id. It needs a fixed number of frames.

    `grid` fixes the frames per item (H x W for images, T x H x W for video). Without a grid
    the modality is ragged: up to `max_frames` frames, closed by the end token.

    `row_end` gives variable resolution and aspect ratio the way Emu3 does: the 2-D `grid` is
    then the largest (rows, cols), and each row of an item is followed by the range's
    end-of-row id, so an item of any rows x cols within the grid reads back with its shape.
    """

    name: str
    codebook_size: int
    levels: int = 1
    grid: tuple[int, ...] | None = None
    flattening: Flattening = "frame_major"
    first_k: int | None = None
    max_frames: int | None = None
    row_end: bool = False
    start: int = -1  # first id; assigned by VocabLayout.build

    def __post_init__(self) -> None:
        if self.grid is not None:
            self.grid = tuple(int(g) for g in self.grid)

    @property
    def stream_levels(self) -> int:
        """Levels that appear in the token stream."""
        return self.first_k if self.flattening == "first_k" else self.levels

    @property
    def size(self) -> int:
        extra = 1 if self.flattening == "delay" or self.row_end else 0
        return self.stream_levels * self.codebook_size + extra

    @property
    def end(self) -> int:
        return self.start + self.size

    @property
    def empty_id(self) -> int | None:
        """The delay pattern's filler id, or None."""
        return self.end - 1 if self.flattening == "delay" else None

    @property
    def row_end_id(self) -> int | None:
        """The end-of-row id of a variable-resolution range, or None."""
        return self.end - 1 if self.row_end else None

    @property
    def frames(self) -> int | None:
        """Frames per item, or None when ragged (no grid, or a grid that is only a maximum)."""
        return math.prod(self.grid) if self.grid is not None and not self.row_end else None

    @property
    def fixed_length(self) -> int | None:
        """Ids per item between the begin and end tokens, or None when ragged."""
        if self.frames is None:
            return None
        if self.flattening == "delay":
            return (self.frames + self.levels - 1) * self.levels
        return self.frames * self.stream_levels

    @property
    def max_length(self) -> int:
        if self.row_end:
            rows, cols = self.grid
            return rows * (cols * self.stream_levels + 1)
        frames = self.frames if self.frames is not None else self.max_frames
        return self.fixed_length or frames * self.stream_levels

    def level_start(self, level: int) -> int:
        return self.start + level * self.codebook_size

    def check(self, where: str) -> None:
        n = f"{where}: modality '{self.name}'"
        if self.codebook_size < 1 or self.levels < 1:
            raise LayoutError(f"{n}: codebook_size and levels must be >= 1")
        if self.flattening not in FLATTENINGS:
            raise LayoutError(f"{n}: flattening '{self.flattening}' is not one of {', '.join(FLATTENINGS)}")
        if self.flattening == "first_k" and not (self.first_k and 1 <= self.first_k <= self.levels):
            raise LayoutError(f"{n}: first_k flattening needs 1 <= first_k <= levels ({self.levels})")
        if self.flattening != "first_k" and self.first_k is not None:
            raise LayoutError(f"{n}: first_k is only used with first_k flattening")
        if self.grid is not None and (not self.grid or min(self.grid) < 1):
            raise LayoutError(f"{n}: grid dimensions must be >= 1, got {self.grid}")
        if self.row_end and (self.grid is None or len(self.grid) != 2 or self.flattening == "delay"):
            raise LayoutError(f"{n}: row_end needs a 2-D maximum grid (rows, cols) and no delay pattern")
        if self.grid is None and not (self.max_frames and self.max_frames >= 1):
            raise LayoutError(f"{n}: a ragged modality (no grid) needs max_frames >= 1")
        if self.flattening == "delay" and self.grid is None:
            raise LayoutError(f"{n}: the delay pattern needs a fixed frame count (a grid); use frame_major")

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "start": self.start,
            "end": self.end,
            "codebook_size": self.codebook_size,
            "levels": self.levels,
            "grid": list(self.grid) if self.grid is not None else None,
            "flattening": self.flattening,
        }
        if self.first_k is not None:
            data["first_k"] = self.first_k
        if self.max_frames is not None:
            data["max_frames"] = self.max_frames
        if self.row_end:
            data["row_end"] = True
        return data


# `mmllm vocab build --modality NAME=N` defaults for the standard names: the toy world's
# token budgets (64 image tokens, 192 video, at most 100 audio, 20 action).
DEFAULT_STRUCTURE: dict[str, dict[str, Any]] = {
    "image": {"grid": (8, 8)},
    "video": {"grid": (3, 8, 8)},
    "audio": {"max_frames": 100},
    "action": {"grid": (10, 2)},
}


def parse_modality(spec: str) -> ModalityRange:
    """Parse the CLI syntax `NAME=CODEBOOK[:key=value...]`, e.g. `audio=1024:levels=4:flattening=delay:grid=50`.

    Keys: grid (AxB[xC]), levels, flattening, first_k, max_frames, row_end (1/0). Standard names take the
    toy-world structure in DEFAULT_STRUCTURE unless given.
    """
    head, *options = spec.split(":")
    name, sep, size = head.partition("=")
    if not sep or not name or not size.isdigit():
        raise LayoutError(f"modality spec {spec!r}: expected NAME=CODEBOOK_SIZE[:key=value...]")
    fields: dict[str, Any] = dict(DEFAULT_STRUCTURE.get(name, {}))
    for option in options:
        key, sep, value = option.partition("=")
        if not sep:
            raise LayoutError(f"modality spec {spec!r}: option {option!r} is not key=value")
        if key == "grid":
            fields["grid"] = tuple(int(v) for v in value.lower().split("x"))
            fields.pop("max_frames", None)
        elif key in ("levels", "first_k", "max_frames"):
            fields[key] = int(value)
            if key == "max_frames":
                fields.pop("grid", None)
        elif key == "flattening":
            fields[key] = value
        elif key == "row_end":
            fields[key] = value.lower() in ("1", "true", "yes")
        else:
            raise LayoutError(
                f"modality spec {spec!r}: unknown option {key!r} "
                "(grid, levels, flattening, first_k, max_frames, row_end)"
            )
    return ModalityRange(name=name, codebook_size=int(size), **fields)


@dataclass
class VocabSpec:
    """What `mmllm vocab build --config` reads (configs/vocab/*.yaml)."""

    modalities: dict[str, dict[str, Any]] = field(default_factory=dict)
    base_rows: int | None = None
    registers: int = 16
    pause: int = 4
    spare: int = 32

    def modality_ranges(self) -> list[ModalityRange]:
        return [
            from_dict(ModalityRange, {**spec, "name": name}, f"modality {name}")
            for name, spec in self.modalities.items()
        ]


@dataclass
class Segment:
    """A piece of a split id stream: text ids, one special token, or one modality span."""

    kind: Literal["text", "special", "span"]
    ids: list[int]
    name: str = ""  # the special token's name, or the span's modality
    codes: np.ndarray | None = None  # (frames, levels) for spans
    complete: bool = True  # False for a span that lacks codes or its end token


@dataclass
class SplitResult:
    segments: list[Segment]
    dropped: int = 0  # ids removed in lenient mode


@dataclass
class CodesResult:
    codes: np.ndarray  # (frames, stream levels), int64
    dropped: int = 0


@dataclass
class VocabLayout:
    text_size: int
    base_rows: int
    special_tokens: dict[str, int]
    modalities: dict[str, ModalityRange]
    padded_size: int
    text_tokenizer_fingerprint: str | None = None
    _id_to_special: dict[int, str] = field(init=False, repr=False, compare=False)
    _allowed_cache: dict[tuple[str, int], np.ndarray] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._id_to_special = {i: name for name, i in self.special_tokens.items()}
        self._allowed_cache = {}

    # ---------------------------------------------------------------- building and I/O

    @classmethod
    def build(
        cls,
        text_size: int,
        modalities: Sequence[ModalityRange],
        base_rows: int | None = None,
        num_registers: int = 16,
        num_pause: int = 4,
        num_spare: int = 32,
        text_tokenizer_fingerprint: str | None = None,
    ) -> VocabLayout:
        """Assign ids: specials after the text (and any padding rows), then each modality.

        `num_registers` learned register slots (Darcet et al. use 4-16 per image), `num_pause`
        pause/filler tokens, and `num_spare` spare specials, so later features can add special
        tokens without moving the modality ranges of trained checkpoints.
        """
        base_rows = text_size if base_rows is None else base_rows
        if base_rows < text_size:
            raise LayoutError(f"base_rows ({base_rows}) is smaller than the text tokenizer ({text_size} tokens)")
        names = list(DOCUMENT_TOKENS) + list(ROLE_TOKENS.values()) + [END_OF_TURN, LATENT_TOKEN]
        span_kinds = list(SPAN_TOKENS) + [m.name for m in modalities if m.name not in SPAN_TOKENS]
        for kind in span_kinds:
            names.extend(span_tokens(kind))
        names += [f"<|register_{i}|>" for i in range(num_registers)]
        names += [f"<|pause_{i}|>" for i in range(num_pause)]
        names += [f"<|spare_{i}|>" for i in range(num_spare)]
        specials = {name: base_rows + i for i, name in enumerate(names)}
        next_id = base_rows + len(names)
        placed = {}
        for m in modalities:
            if m.name in placed or m.name == "text":
                raise LayoutError(f"modality name '{m.name}' is used twice or reserved")
            m = dataclasses.replace(m, start=next_id)
            m.check("vocab build")
            placed[m.name] = m
            next_id = m.end
        padded = -(-next_id // PAD_MULTIPLE) * PAD_MULTIPLE
        layout = cls(text_size, base_rows, specials, placed, padded, text_tokenizer_fingerprint)
        layout.validate("vocab build")
        return layout

    @property
    def total_size(self) -> int:
        """One past the last id in use."""
        ends = [self.base_rows] + [i + 1 for i in self.special_tokens.values()]
        ends += [m.end for m in self.modalities.values()]
        return max(ends)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "text_size": self.text_size,
            "base_rows": self.base_rows,
            "total_size": self.total_size,
            "padded_size": self.padded_size,
            "text_tokenizer_fingerprint": self.text_tokenizer_fingerprint,
            "special_tokens": dict(self.special_tokens),
            "modalities": {name: m.to_dict() for name, m in self.modalities.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "vocab layout") -> VocabLayout:
        if data.get("format") != FORMAT_NAME:
            raise LayoutError(f"{where}: not a vocab layout (format is {data.get('format')!r})")
        if data.get("version") != FORMAT_VERSION:
            raise LayoutError(f"{where}: layout version {data.get('version')} is not supported")
        try:
            modalities = {}
            for name, spec in data["modalities"].items():
                m = ModalityRange(
                    name=name,
                    codebook_size=int(spec["codebook_size"]),
                    levels=int(spec["levels"]),
                    grid=spec.get("grid"),
                    flattening=spec["flattening"],
                    first_k=spec.get("first_k"),
                    max_frames=spec.get("max_frames"),
                    row_end=bool(spec.get("row_end", False)),
                    start=int(spec["start"]),
                )
                m.check(where)
                if "end" in spec and int(spec["end"]) != m.end:
                    raise LayoutError(
                        f"{where}: modality '{name}' ends at {spec['end']} but its structure needs {m.end}"
                    )
                modalities[name] = m
            layout = cls(
                text_size=int(data["text_size"]),
                base_rows=int(data["base_rows"]),
                special_tokens={str(k): int(v) for k, v in data["special_tokens"].items()},
                modalities=modalities,
                padded_size=int(data["padded_size"]),
                text_tokenizer_fingerprint=data.get("text_tokenizer_fingerprint"),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise LayoutError(f"{where}: malformed layout ({type(err).__name__}: {err})") from None
        layout.validate(where)
        return layout

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> VocabLayout:
        """Load and validate `vocab_layout.json` (or the file of that name in a dir)."""
        path = Path(path)
        if path.is_dir():
            path = path / "vocab_layout.json"
        return cls.from_dict(read_json_object(path, LayoutError, "vocab layout"), str(path))

    def validate(self, where: str = "vocab layout") -> None:
        """Ranges must not overlap or leave [base_rows, padded_size); padded to a multiple of 64."""
        if self.text_size < 1:
            raise LayoutError(f"{where}: text_size must be >= 1")
        if self.base_rows < self.text_size:
            raise LayoutError(f"{where}: base_rows ({self.base_rows}) < text_size ({self.text_size})")
        if self.padded_size % PAD_MULTIPLE:
            raise LayoutError(f"{where}: padded_size {self.padded_size} is not a multiple of {PAD_MULTIPLE}")
        if len(set(self.special_tokens.values())) != len(self.special_tokens):
            raise LayoutError(f"{where}: two special tokens share an id")
        required = [*DOCUMENT_TOKENS, *ROLE_TOKENS.values(), END_OF_TURN, *SPAN_TOKENS["latent"]]
        missing = [name for name in required if name not in self.special_tokens]
        for modality in self.modalities:
            missing += [t for t in span_tokens(modality) if t not in self.special_tokens]
        if missing:
            raise LayoutError(f"{where}: special token {missing[0]} is missing")
        intervals = [(i, i + 1, name) for name, i in self.special_tokens.items()]
        intervals += [(m.start, m.end, f"modality '{m.name}'") for m in self.modalities.values()]
        intervals.sort()
        for lo, hi, name in intervals:
            if lo < self.base_rows or hi > self.padded_size:
                raise LayoutError(
                    f"{where}: {name} occupies [{lo}, {hi}), outside [{self.base_rows}, {self.padded_size})"
                )
        for (lo_a, hi_a, a), (lo_b, _, b) in itertools.pairwise(intervals):
            if lo_b < hi_a:
                raise LayoutError(f"{where}: {a} [{lo_a}, {hi_a}) overlaps {b} starting at {lo_b}")

    def describe(self) -> str:
        """A table of the layout's ranges, as `mmllm vocab show` prints it."""
        rows = [
            f"{'range':<12} {'ids':>20} {'size':>8}  structure",
            f"{'text':<12} {f'[0, {self.text_size})':>20} {self.text_size:>8}",
        ]
        if self.base_rows > self.text_size:
            unused = self.base_rows - self.text_size
            rows.append(f"{'(unused)':<12} {f'[{self.text_size}, {self.base_rows})':>20} {unused:>8}")
        first, last = min(self.special_tokens.values()), max(self.special_tokens.values()) + 1
        rows.append(f"{'specials':<12} {f'[{first}, {last})':>20} {len(self.special_tokens):>8}")
        for m in self.modalities.values():
            structure = f"codebook {m.codebook_size} x {m.levels} levels, {m.flattening}"
            if m.row_end:
                structure += f", up to {'x'.join(map(str, m.grid))} with end-of-row ids"
            else:
                structure += f", grid {'x'.join(map(str, m.grid))}" if m.grid else f", up to {m.max_frames} frames"
            rows.append(f"{m.name:<12} {f'[{m.start}, {m.end})':>20} {m.size:>8}  {structure}, {m.max_length} ids/item")
        rows.append(f"{'total':<12} {self.total_size:>29}  padded to {self.padded_size}")
        return "\n".join(rows)

    # ---------------------------------------------------------------- lookups

    def token_id(self, name: str) -> int:
        try:
            return self.special_tokens[name]
        except KeyError:
            raise LayoutError(f"special token {name} is not in this layout") from None

    def modality(self, name: str) -> ModalityRange:
        try:
            return self.modalities[name]
        except KeyError:
            known = ", ".join(self.modalities) or "none"
            raise LayoutError(f"modality '{name}' is not in this layout (it has: {known})") from None

    @property
    def pad_id(self) -> int:
        return self.special_tokens["<|pad|>"]

    @property
    def null_id(self) -> int:
        return self.special_tokens["<|null|>"]

    def begin_id(self, modality: str) -> int:
        return self.token_id(span_tokens(modality)[0])

    def end_id(self, modality: str) -> int:
        return self.token_id(span_tokens(modality)[1])

    def role_id(self, role: str) -> int:
        if role not in ROLE_TOKENS:
            raise LayoutError(f"unknown chat role '{role}' (roles: {', '.join(ROLE_TOKENS)})")
        return self.special_tokens[ROLE_TOKENS[role]]

    def modality_of(self, token_id: int) -> str | None:
        """Which modality's range holds `token_id`, or None."""
        for m in self.modalities.values():
            if m.start <= token_id < m.end:
                return m.name
        return None

    def token_name(self, token_id: int) -> str | None:
        """A readable name for a non-text id (`<|image_0042|>`, `<|audio_l1_0007|>`); None for text."""
        if token_id < self.text_size:
            return None
        if token_id in self._id_to_special:
            return self._id_to_special[token_id]
        name = self.modality_of(token_id)
        if name is None:
            return f"<|unused_{token_id}|>"
        m = self.modalities[name]
        if token_id == m.empty_id:
            return f"<|{name}_empty|>"
        if token_id == m.row_end_id:
            return f"<|{name}_end_of_row|>"
        level, code = divmod(token_id - m.start, m.codebook_size)
        width = len(str(m.codebook_size - 1))
        return f"<|{name}_{code:0{width}d}|>" if m.stream_levels == 1 else f"<|{name}_l{level}_{code:0{width}d}|>"

    # ---------------------------------------------------------------- codes <-> ids

    def codes_to_ids(self, modality: str, codes: Any) -> np.ndarray:
        """The stream ids of one item's codes, without begin/end tokens.

        `codes` is (frames, levels), or the grid shape followed by levels, or, with one level,
        just (frames,) or the grid shape. With `first_k` flattening, extra levels are ignored.
        A `row_end` modality takes (rows, cols, levels), or (rows, cols) with one level.
        """
        m = self.modality(modality)
        if m.row_end:
            return self._rows_to_ids(m, codes)
        frames = self._as_frames(m, codes)
        levels = m.stream_levels
        offsets = m.start + np.arange(levels, dtype=np.int64) * m.codebook_size
        if m.flattening != "delay":
            return (frames[:, :levels] + offsets).reshape(-1)
        n, k = frames.shape[0], m.levels
        stream = np.full((n + k - 1, k), m.empty_id, dtype=np.int64)
        for level in range(k):
            stream[level : level + n, level] = frames[:, level] + offsets[level]
        return stream.reshape(-1)

    def _rows_to_ids(self, m: ModalityRange, codes: Any) -> np.ndarray:
        array = np.asarray(codes.cpu() if hasattr(codes, "cpu") else codes)
        if array.ndim == 2 and m.levels == 1:
            array = array[..., None]
        max_rows, max_cols = m.grid
        if array.ndim != 3 or not (1 <= array.shape[0] <= max_rows and 1 <= array.shape[1] <= max_cols):
            raise LayoutError(
                f"{m.name} codes have shape {tuple(array.shape)}; expected (rows, cols, {m.levels}) "
                f"within {max_rows}x{max_cols}"
            )
        rows, cols = array.shape[:2]
        frames = self._as_frames(_one_row_range(m, rows * cols), array.reshape(rows * cols, -1))
        k = m.stream_levels
        offsets = m.start + np.arange(k, dtype=np.int64) * m.codebook_size
        body = (frames[:, :k] + offsets).reshape(rows, cols * k)
        return np.concatenate([body, np.full((rows, 1), m.row_end_id, dtype=np.int64)], axis=1).reshape(-1)

    def span_ids(self, modality: str, codes: Any) -> list[int]:
        """One item as it sits in a sequence: begin token, code ids, end token."""
        return [self.begin_id(modality), *self.codes_to_ids(modality, codes).tolist(), self.end_id(modality)]

    def codes_to_ids_batch(self, modality: str, items: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        """Ids of several items, right-padded with the pad id, and each item's length."""
        streams = [self.codes_to_ids(modality, item) for item in items]
        lengths = np.array([len(s) for s in streams], dtype=np.int64)
        batch = np.full((len(streams), int(lengths.max(initial=0))), self.pad_id, dtype=np.int64)
        for row, stream in zip(batch, streams, strict=True):
            row[: len(stream)] = stream
        return batch, lengths

    def ids_to_codes(self, modality: str, ids: Iterable[int], strict: bool = True) -> CodesResult:
        """Codes (frames, stream levels) of one span's ids (between begin and end).

        Strict mode raises on any id that is not a code of the level its position expects.
        Lenient mode drops such ids, and frames left incomplete, and counts them.
        """
        m = self.modality(modality)
        ids = np.asarray(list(ids), dtype=np.int64).reshape(-1)
        if m.flattening == "delay":
            return self._undelay(m, ids, strict)
        if m.row_end:
            return self._ids_to_rows(m, ids, strict)
        return self._ids_to_frames(m, ids, strict)

    def _ids_to_frames(self, m: ModalityRange, ids: np.ndarray, strict: bool) -> CodesResult:
        modality = m.name
        k = m.stream_levels
        level = (ids - m.start) // m.codebook_size
        in_range = (ids >= m.start) & (ids < m.start + k * m.codebook_size)
        if strict:
            expected = np.arange(len(ids)) % k
            bad = np.flatnonzero(~in_range | (level != expected))
            if bad.size:
                p = int(bad[0])
                want = int(expected[p])
                lo = m.level_start(want)
                raise LayoutError(
                    f"id {int(ids[p])} at position {p} of a {modality} span is not a level-{want} code "
                    f"(expected [{lo}, {lo + m.codebook_size}))"
                )
            if m.fixed_length is not None and len(ids) != m.fixed_length:
                raise LayoutError(f"{modality} span has {len(ids)} ids, expected {m.fixed_length}")
            if len(ids) % k or len(ids) > m.max_length:
                raise LayoutError(
                    f"{modality} span has {len(ids)} ids; expected whole frames of {k} levels, "
                    f"at most {m.max_length} ids"
                )
            return CodesResult(((ids - m.start) % m.codebook_size).reshape(-1, k))
        # Lenient: per-level sub-ranges make each id self-describing, so keep ids whose level
        # continues the current frame, restart on an early level-0 id, and drop the rest.
        frames, frame, dropped = [], [], 0
        for token, lvl, ok in zip(ids.tolist(), level.tolist(), in_range.tolist(), strict=True):
            code = (token - m.start) % m.codebook_size
            if ok and lvl == len(frame):
                frame.append(code)
                if len(frame) == k:
                    frames.append(frame)
                    frame = []
            elif ok and lvl == 0:
                dropped += len(frame)
                frame = [code]
            else:
                dropped += 1
        dropped += len(frame)
        limit = m.frames or m.max_frames
        if len(frames) > limit:
            dropped += (len(frames) - limit) * k
            frames = frames[:limit]
        codes = np.array(frames, dtype=np.int64).reshape(-1, k)
        return CodesResult(codes, dropped)

    def _ids_to_rows(self, m: ModalityRange, ids: np.ndarray, strict: bool) -> CodesResult:
        """Codes (rows, cols, levels) of a variable-resolution span; each row ends with end-of-row.

        Lenient mode keeps the rows as wide as the first non-empty one (up to the grid's rows),
        and drops the other rows and any ids after the last end-of-row, counting them.
        """
        max_rows, max_cols = m.grid
        pieces = np.split(ids, np.flatnonzero(ids == m.row_end_id) + 1)
        tail, rows = pieces[-1], [piece[:-1] for piece in pieces[:-1]]
        row_range = _one_row_range(m, max_cols)
        if strict:
            if tail.size or not rows:
                raise LayoutError(f"{m.name} span does not end with an end-of-row id after its last row")
            if len(rows) > max_rows:
                raise LayoutError(f"{m.name} span has {len(rows)} rows; the grid allows {max_rows}")
            if any(row.size == 0 for row in rows):
                raise LayoutError(f"{m.name} span has an empty row")
            decoded = [self._ids_to_frames(row_range, row, strict=True).codes for row in rows]
            widths = sorted({len(row) for row in decoded})
            if len(widths) != 1:
                raise LayoutError(f"{m.name} span has rows of different widths {widths}")
            return CodesResult(np.stack(decoded))
        dropped = len(tail)
        kept: list[np.ndarray] = []
        for row in rows:
            result = self._ids_to_frames(row_range, row, strict=False)
            width = len(kept[0]) if kept else len(result.codes)
            if len(result.codes) and len(result.codes) == width and len(kept) < max_rows:
                kept.append(result.codes)
                dropped += result.dropped
            else:
                dropped += row.size + 1  # the whole row and its end-of-row id
        codes = np.stack(kept) if kept else np.zeros((0, 0, m.stream_levels), dtype=np.int64)
        return CodesResult(codes, dropped)

    def _undelay(self, m: ModalityRange, ids: np.ndarray, strict: bool) -> CodesResult:
        k, n = m.levels, m.frames
        expected = self.codes_to_ids(m.name, np.zeros((n, k), dtype=np.int64))
        is_empty_slot = expected == m.empty_id
        levels = np.arange(len(expected)) % k
        padded = np.full(len(expected), -1, dtype=np.int64)
        padded[: min(len(ids), len(expected))] = ids[: len(expected)]
        lo = m.start + levels * m.codebook_size
        ok = np.where(is_empty_slot, padded == m.empty_id, (padded >= lo) & (padded < lo + m.codebook_size))
        if strict:
            if len(ids) != len(expected):
                raise LayoutError(f"{m.name} span has {len(ids)} ids, expected {len(expected)} (delay pattern)")
            bad = np.flatnonzero(~ok)
            if bad.size:
                p = int(bad[0])
                want = "the empty id" if is_empty_slot[p] else f"a level-{int(levels[p])} code"
                raise LayoutError(f"id {int(padded[p])} at position {p} of a {m.name} span is not {want}")
        stream = np.where(ok, padded - lo, -1).reshape(-1, k)
        codes = np.stack([stream[level : level + n, level] for level in range(k)], axis=1)
        keep = (codes >= 0).all(axis=1)
        dropped = int((~ok & ~is_empty_slot).sum()) + max(0, len(ids) - len(expected))
        return CodesResult(codes[keep], dropped)

    def _as_frames(self, m: ModalityRange, codes: Any) -> np.ndarray:
        array = np.asarray(codes.cpu() if hasattr(codes, "cpu") else codes)
        if array.dtype.kind not in "iu":
            raise LayoutError(f"{m.name} codes must be integers, got {array.dtype}")
        array = array.astype(np.int64)
        grid = m.grid or ()
        if m.levels == 1 and array.ndim in (1, len(grid)) and (array.ndim == 1 or array.shape == grid):
            array = array.reshape(-1, 1)
        elif grid and array.shape[:-1] == grid:
            array = array.reshape(-1, array.shape[-1])
        if array.ndim != 2 or array.shape[1] < m.stream_levels or array.shape[1] > m.levels:
            raise LayoutError(
                f"{m.name} codes have shape {tuple(np.shape(codes))}; expected (frames, {m.levels})"
                + (f" or {(*grid, m.levels)}" if grid else "")
            )
        if m.frames is not None and array.shape[0] != m.frames:
            raise LayoutError(f"{m.name} codes have {array.shape[0]} frames; the grid {m.grid} needs {m.frames}")
        if m.frames is None and not 1 <= array.shape[0] <= m.max_frames:
            raise LayoutError(f"{m.name} codes have {array.shape[0]} frames; allowed 1..{m.max_frames}")
        if array.size and (array.min() < 0 or array.max() >= m.codebook_size):
            raise LayoutError(f"{m.name} code {int(array.max())} is outside [0, {m.codebook_size})")
        return array

    # ---------------------------------------------------------------- splitting streams

    def split(self, ids: Iterable[int], strict: bool = True) -> SplitResult:
        """Split an id stream into text runs, special tokens and modality spans (with codes).

        Strict mode raises on an id outside every range, a code outside a span, or an
        unclosed span; lenient mode drops such ids (counting them) and marks unclosed spans
        incomplete, so a generation loop never dies on one bad id.
        """
        ids = [int(i) for i in ids]
        begins = {self.begin_id(name): name for name in self.modalities}
        segments: list[Segment] = []
        dropped = 0
        text: list[int] = []

        def flush_text() -> None:
            if text:
                segments.append(Segment("text", list(text)))
                text.clear()

        i = 0
        while i < len(ids):
            token = ids[i]
            if 0 <= token < self.text_size:
                text.append(token)
                i += 1
                continue
            flush_text()
            if token in begins:
                name = begins[token]
                end = self.end_id(name)
                j = i + 1
                while j < len(ids) and ids[j] != end:
                    j += 1
                closed = j < len(ids)
                if not closed and strict:
                    raise LayoutError(f"{name} span opened at position {i} is not closed")
                result = self.ids_to_codes(name, ids[i + 1 : j], strict=strict)
                dropped += result.dropped
                m = self.modalities[name]
                full = len(result.codes) > 0 if m.frames is None else len(result.codes) == m.frames
                span_ids = ids[i : j + 1] if closed else ids[i:j]
                segments.append(Segment("span", span_ids, name, result.codes, closed and full))
                i = j + 1
                continue
            if token in self._id_to_special:
                segments.append(Segment("special", [token], self._id_to_special[token]))
            elif strict:
                owner = self.modality_of(token)
                if owner is not None:
                    raise LayoutError(f"id {token} at position {i} is a {owner} code outside a {owner} span")
                raise LayoutError(
                    f"id {token} at position {i} is not a valid id (text ends at {self.text_size}, specials "
                    f"start at {self.base_rows}, the vocabulary has {self.padded_size} rows)"
                )
            else:
                dropped += 1
            i += 1
        flush_text()
        return SplitResult(segments, dropped)

    # ---------------------------------------------------------------- logit masks

    def allowed_ids(self, modality: str, step: int, row_width: int | None = None) -> np.ndarray:
        """Ids allowed at `step` of a span (0 = right after its begin token), sorted.

        For "text": text ids, every span's begin token, end of turn and end of document.
        For a modality: the codes of the level this step holds (the empty id where the delay
        pattern needs it), the end token once the item may end, and only it when it must.
        A `row_end` modality lays out rows of `row_width` frames (default: the grid's widest),
        each followed by its end-of-row id; the item may end after any whole row.
        """
        key = (modality, step, row_width)
        if key not in self._allowed_cache:
            self._allowed_cache[key] = _allowed_ids(self, modality, step, row_width)
        return self._allowed_cache[key]

    def allowed_mask(self, modality: str, step: int, row_width: int | None = None) -> np.ndarray:
        """`allowed_ids` as a boolean mask over all `padded_size` rows."""
        mask = np.zeros(self.padded_size, dtype=bool)
        mask[self.allowed_ids(modality, step, row_width)] = True
        return mask


def _one_row_range(m: ModalityRange, max_frames: int) -> ModalityRange:
    """`m` seen as a plain ragged range, to read one row (or all rows' frames) of a row_end item."""
    return dataclasses.replace(m, grid=None, row_end=False, max_frames=max_frames)


def _allowed_ids(layout: VocabLayout, modality: str, step: int, row_width: int | None) -> np.ndarray:
    if modality == "text":
        extra = [layout.begin_id(name) for name in layout.modalities]
        extra += [layout.token_id("<|bolt|>"), layout.token_id(END_OF_TURN), layout.token_id("<|eos|>")]
        return np.union1d(np.arange(layout.text_size), np.array(extra, dtype=np.int64))
    m = layout.modality(modality)
    if step < 0:
        raise LayoutError(f"step must be >= 0, got {step}")
    end = np.array([layout.end_id(modality)], dtype=np.int64)
    if m.flattening == "delay":
        expected = layout.codes_to_ids(modality, np.zeros((m.frames, m.levels), dtype=np.int64))
        if step < len(expected):
            if expected[step] == m.empty_id:
                return np.array([m.empty_id], dtype=np.int64)
            lo = m.level_start(step % m.levels)
            return np.arange(lo, lo + m.codebook_size, dtype=np.int64)
        return end if step == len(expected) else np.empty(0, dtype=np.int64)
    if m.row_end:
        return _allowed_in_rows(layout, m, step, row_width)
    k = m.stream_levels
    frames_done, level = divmod(step, k)
    limit = m.frames if m.frames is not None else m.max_frames
    if frames_done >= limit:
        return end if (frames_done == limit and level == 0) else np.empty(0, dtype=np.int64)
    lo = m.level_start(level)
    codes = np.arange(lo, lo + m.codebook_size, dtype=np.int64)
    if m.frames is None and level == 0 and frames_done >= 1:
        return np.concatenate([codes, end])
    return codes


def _allowed_in_rows(layout: VocabLayout, m: ModalityRange, step: int, row_width: int | None) -> np.ndarray:
    max_rows, max_cols = m.grid
    width = max_cols if row_width is None else row_width
    if not 1 <= width <= max_cols:
        raise LayoutError(f"row_width {width} is outside 1..{max_cols} for {m.name}")
    k = m.stream_levels
    row, position = divmod(step, width * k + 1)
    if position == width * k:
        return np.array([m.row_end_id], dtype=np.int64)
    end = np.array([layout.end_id(m.name)], dtype=np.int64)
    if row == max_rows:
        return end if position == 0 else np.empty(0, dtype=np.int64)
    lo = m.level_start(position % k)
    codes = np.arange(lo, lo + m.codebook_size, dtype=np.int64)
    return np.concatenate([codes, end]) if position == 0 and row >= 1 else codes
