"""The ModalityTokenizer contract (docs/architecture.md, decision 9).

A modality tokenizer turns a batch of media into integer codes and back:

    encode(items)  -> EncodedBatch   codes (batch, frames, levels) plus each item's frame count
    decode(codes)  -> Decoded        one medium per item, plus a flag per item saying what was
                                     repaired; never raises on malformed codes

An item is a sequence of frames (grid cells for images and video, time steps for audio and
actions); every frame holds `levels` codes in [0, codebook_size). Frames are listed in the
order the VocabLayout streams them (row-major over the grid), so `EncodedBatch.items()` feeds
`VocabLayout.codes_to_ids` directly, and `VocabLayout.ids_to_codes` feeds `decode`.

Media conventions (numpy, channels last):

    image   uint8 (H, W, 3)
    audio   float32 (samples,), mono, at the tokenizer's `sample_rate`; or a (samples, rate)
            pair, which `prepare` resamples
    video   uint8 (T, H, W, 3)
    action  float32 (steps, dims), normalised to [-1, 1]

`prepare` brings an item to the tokenizer's convention (resize, resample, frame count) or
raises a one-line `MediaError`; batch jobs catch it per item, count it and go on.

A tokenizer is saved as a directory: `tokenizer_config.json` (registry name, modality, the
constructor's config) and `model.safetensors` (its parameters and buffers). `load_tokenizer`
takes such a directory or a registry name.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mmllm.config import read_json_object
from mmllm.errors import CheckpointError, LayoutError, MediaError
from mmllm.vocab import ModalityRange

FORMAT_NAME = "mmllm.modality_tokenizer"
FORMAT_VERSION = 1
CONFIG_FILE = "tokenizer_config.json"
WEIGHTS_FILE = "model.safetensors"
MODALITIES = ("image", "audio", "video", "action")
APPEARANCE_BATCH = 64  # codes decoded at once by `code_appearance`: 64 toy images are 3 MB
# Values kept of each code's decoded look: a random projection to a model's width needs no more,
# and a toy video's 110,592 values for each of 512 codes would be 226 MB.
APPEARANCE_FEATURES = 4096


@dataclass
class EncodedBatch:
    """Codes of a batch: `codes` (batch, frames, levels), right-padded with 0 past `lengths`.

    `shapes` holds each item's grid when it can vary (variable-resolution images: (rows, cols)),
    and is None when every item has the tokenizer's fixed grid or is a ragged 1-D sequence.
    """

    codes: torch.Tensor
    lengths: torch.Tensor
    shapes: list[tuple[int, ...]] | None = None

    def __len__(self) -> int:
        return self.codes.shape[0]

    def items(self) -> list[np.ndarray]:
        """Each item's codes as an int64 array (frames, levels) without padding, or (rows, cols,
        levels) when `shapes` is set: the form `VocabLayout.codes_to_ids` takes."""
        codes = self.codes.detach().cpu().numpy().astype(np.int64)
        items = [codes[i, :n] for i, n in enumerate(self.lengths.tolist())]
        if self.shapes is not None:
            items = [item.reshape(*shape, item.shape[-1]) for item, shape in zip(items, self.shapes, strict=True)]
        return items


@dataclass
class Decoded:
    """Decoded media, one per item, and a flag per item: "" when the codes were well formed,
    otherwise a short note of what was repaired ("12 codes out of range were clamped")."""

    media: list[np.ndarray]
    flags: list[str] = field(default_factory=list)

    @property
    def num_flagged(self) -> int:
        return sum(bool(f) for f in self.flags)


class ModalityTokenizer(nn.Module):
    """Base class of every modality tokenizer; subclasses register with `@register_tokenizer`.

    Subclasses set `name` and `modality`, accept their config as constructor keywords (and
    return the same dict from `get_config`), and implement `_encode` and `_decode`. Gradient-
    trained tokenizers set `trainable` and implement `collate` and `training_loss`; tokenizers
    fitted from statistics (action bins, FAST's BPE) set `fittable` and implement `fit`.
    """

    name: ClassVar[str] = ""
    modality: ClassVar[str] = ""
    trainable: ClassVar[bool] = False
    fittable: ClassVar[bool] = False
    # Upstream models without a decoder (Chameleon's VQ-VAE) set this; the generator then
    # refuses to generate their modality.
    can_decode: ClassVar[bool] = True

    # ------------------------------------------------------------ structure of the codes

    codebook_size: int  # codes per level
    levels: int  # codes per frame (residual or factorised levels)
    grid: tuple[int, ...] | None  # frames per item as a grid, or None when ragged
    max_frames: int | None  # the ragged limit, when grid is None

    @property
    def num_codes(self) -> int:
        """Distinct codes per level."""
        return self.codebook_size

    @property
    def tokens_per_item(self) -> int:
        """Codes per item (the maximum when ragged)."""
        frames = int(np.prod(self.grid)) if self.grid is not None else self.max_frames
        return frames * self.levels

    def modality_range(self, name: str | None = None, flattening: str = "frame_major", **options: Any) -> ModalityRange:
        """The VocabLayout range these codes need (give it to `VocabLayout.build`)."""
        return ModalityRange(
            name=name or self.modality,
            codebook_size=self.codebook_size,
            levels=self.levels,
            grid=self.grid,
            max_frames=None if self.grid is not None else self.max_frames,
            flattening=flattening,
            **options,
        )

    def check_fits(self, m: ModalityRange, where: str = "model") -> None:
        """Raise a one-line LayoutError unless this tokenizer's codes fit layout range `m`.

        A ragged range may allow more frames than the tokenizer makes, never fewer.
        """
        mine = self.modality_range(m.name)
        mismatches = [
            (key, getattr(mine, key), getattr(m, key))
            for key in ("codebook_size", "levels", "grid", "row_end")
            if getattr(mine, key) != getattr(m, key)
        ]
        if m.grid is None and mine.max_frames is not None and mine.max_frames > m.max_frames:
            mismatches.append(("max_frames", mine.max_frames, m.max_frames))
        if mismatches:
            key, ours, theirs = mismatches[0]
            raise LayoutError(
                f"{where}: tokenizer '{self.name}' makes {key} {ours} but the layout's '{m.name}' range has {theirs}"
            )

    def get_config(self) -> dict[str, Any]:
        """The constructor keywords that rebuild this tokenizer (JSON-serialisable)."""
        raise NotImplementedError

    # ------------------------------------------------------------ encode / decode

    def prepare(self, item: Any, where: str = "input") -> np.ndarray:
        """Bring one medium to this tokenizer's convention, or raise a MediaError naming `where`."""
        return np.asarray(item)

    @torch.no_grad()
    def encode(self, items: Sequence[Any]) -> EncodedBatch:
        """Codes of a batch of media (each passed through `prepare` first)."""
        prepared = [self.prepare(item, f"item {i}") for i, item in enumerate(items)]
        if not prepared:
            return EncodedBatch(torch.zeros(0, 0, self.levels, dtype=torch.long), torch.zeros(0, dtype=torch.long))
        was_training = self.training
        self.eval()
        try:
            return self._encode(prepared)
        finally:
            self.train(was_training)

    def _encode(self, items: list[np.ndarray]) -> EncodedBatch:
        raise NotImplementedError

    @torch.no_grad()
    def decode(self, codes: EncodedBatch | Sequence[Any]) -> Decoded:
        """Media of a batch of codes; malformed codes are repaired and flagged, never raised on.

        `codes` is an EncodedBatch or a list of per-item arrays (frames, levels) (or (frames,)
        with one level), as `VocabLayout.ids_to_codes` returns them.
        """
        items = codes.items() if isinstance(codes, EncodedBatch) else list(codes)
        if not items:
            return Decoded([], [])
        if not self.can_decode:
            return Decoded([self.blank() for _ in items], [f"{self.name} cannot decode (encode-only)"] * len(items))
        repaired, flags = zip(*(self.repair(item) for item in items), strict=True)
        was_training = self.training
        self.eval()
        try:
            media = self._decode(list(repaired))
        except Exception as err:  # decoding must never take a generation or control loop down
            note = f"decode failed ({type(err).__name__}: {err}); blank output"
            return Decoded([self.blank() for _ in items], [note] * len(items))
        finally:
            self.train(was_training)
        return Decoded(list(media), list(flags))

    def _decode(self, codes: list[np.ndarray]) -> list[np.ndarray]:
        """Media of well-formed codes (each (frames, levels), in range, of an allowed length)."""
        raise NotImplementedError

    @torch.no_grad()
    def code_appearance(self) -> np.ndarray | None:
        """(codebook_size, features): each code's look, the medium decoded from an item whose every
        frame is that code (`mmllm.model.code_init` starts the LM's code rows from it). A medium
        with more than APPEARANCE_FEATURES values is read at a fixed random subset of them.

        None when the codes cannot be decoded, have no item length, or come in levels: a residual
        level's code alone decodes to nothing it means in context.
        """
        frames = int(np.prod(self.grid)) if self.grid is not None else self.max_frames
        if not self.can_decode or self.levels != 1 or not frames:
            return None
        looks, kept = [], None
        for first in range(0, self.codebook_size, APPEARANCE_BATCH):
            batch = range(first, min(first + APPEARANCE_BATCH, self.codebook_size))
            media = self.decode([np.full((frames, 1), code) for code in batch]).media
            values = np.stack([np.asarray(medium, dtype=np.float32).reshape(-1) for medium in media])
            if kept is None:
                kept = np.arange(values.shape[1])
                if len(kept) > APPEARANCE_FEATURES:
                    kept = np.sort(np.random.default_rng(0).choice(len(kept), APPEARANCE_FEATURES, replace=False))
            looks.append(values[:, kept])
        return np.concatenate(looks)

    def blank(self) -> np.ndarray:
        """A medium of the declared shape, returned when nothing can be decoded."""
        raise NotImplementedError

    def repair(self, item: Any) -> tuple[np.ndarray, str]:
        """Force one item's codes into the declared structure; return them and a note of fixes.

        Codes outside [0, codebook_size) are clamped; missing levels are filled with 0 and
        extra ones dropped; a fixed grid is padded by repeating the last frame (or truncated),
        a ragged item is cut to `max_frames` and an empty one gets a single 0 frame.
        """
        notes = []
        try:
            array = np.asarray(item.cpu() if hasattr(item, "cpu") else item)
            if array.dtype.kind not in "iub":
                if array.dtype.kind == "f" and np.isfinite(array).all():
                    array = np.rint(array)
                else:
                    raise TypeError(f"codes of dtype {array.dtype}")
            array = array.astype(np.int64)
        except (TypeError, ValueError) as err:
            array = np.zeros((0, self.levels), dtype=np.int64)
            notes.append(f"unusable codes ({err})")
        if array.ndim == 1:
            whole_frames = array.size % self.levels == 0
            array = array.reshape(-1, self.levels) if whole_frames else array.reshape(-1, 1)
        elif array.ndim != 2:
            array = array.reshape(-1, array.shape[-1]) if array.ndim > 2 else array.reshape(0, self.levels)
        if array.shape[1] != self.levels:
            notes.append(f"{array.shape[1]} levels per frame, expected {self.levels}")
            fixed = np.zeros((array.shape[0], self.levels), dtype=np.int64)
            keep = min(array.shape[1], self.levels)
            fixed[:, :keep] = array[:, :keep]
            array = fixed
        out_of_range = int(((array < 0) | (array >= self.codebook_size)).sum())
        if out_of_range:
            notes.append(f"{out_of_range} codes out of [0, {self.codebook_size}) clamped")
            array = array.clip(0, self.codebook_size - 1)
        want = int(np.prod(self.grid)) if self.grid is not None else None
        frames = array.shape[0]
        if want is not None and frames != want:
            notes.append(f"{frames} frames, expected {want}")
            if frames == 0:
                array = np.zeros((want, self.levels), dtype=np.int64)
            elif frames < want:
                array = np.concatenate([array, np.repeat(array[-1:], want - frames, axis=0)])
            else:
                array = array[:want]
        elif want is None and frames == 0:
            notes.append("no frames")
            array = np.zeros((1, self.levels), dtype=np.int64)
        elif want is None and self.max_frames is not None and frames > self.max_frames:
            notes.append(f"{frames} frames, at most {self.max_frames} kept")
            array = array[: self.max_frames]
        return array, "; ".join(notes)

    # ------------------------------------------------------------ training

    def collate(self, items: list[np.ndarray]) -> torch.Tensor:
        """A training batch of prepared media, as the network takes it."""
        raise NotImplementedError

    def training_loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one training batch, and scalars to log (reconstruction, codebook usage...)."""
        raise NotImplementedError

    def fit(self, items: Sequence[np.ndarray]) -> dict[str, float]:
        """Fit statistics (bin edges, a BPE vocabulary) on prepared media; return scalars to log."""
        raise NotImplementedError

    # ------------------------------------------------------------ save / load

    def save_pretrained(self, path: str | Path) -> None:
        """Write `tokenizer_config.json`, `model.safetensors` and any extra files into `path`.

        Files are written to a temp dir inside `path` and moved into place one by one, the
        config last, so other files in `path` (a training run's logs and checkpoints) stay and a
        crash never leaves a config without its weights.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path, prefix=".save-") as tmp_name:
            tmp = Path(tmp_name)
            tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            self.save_extra(tmp)
            config = {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "name": self.name,
                "modality": self.modality,
                "config": self.get_config(),
            }
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            for written in sorted(tmp.iterdir(), key=lambda f: f.name == CONFIG_FILE):
                target = path / written.name
                if target.is_dir():
                    shutil.rmtree(target)
                os.replace(written, target)

    def save_extra(self, directory: Path) -> None:
        """Write files beyond config and tensors (FAST's BPE vocabulary); none by default."""

    def load_extra(self, directory: Path) -> None:
        """Read what `save_extra` wrote."""

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModalityTokenizer:
        """Load a saved tokenizer of any registered kind (`cls` need not be the saved class)."""
        path = Path(path)
        config_path = path / CONFIG_FILE
        data = read_json_object(config_path, CheckpointError, "modality tokenizer config")
        if data.get("format") != FORMAT_NAME or data.get("version") != FORMAT_VERSION:
            raise CheckpointError(f"{config_path}: not a modality tokenizer config (format {data.get('format')!r})")
        tokenizer_class = tokenizer_class_for(str(data.get("name")))
        try:
            tokenizer = tokenizer_class(**data.get("config", {}))
        except TypeError as err:
            raise CheckpointError(f"{config_path}: config does not fit {tokenizer_class.__name__} ({err})") from None
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            raise CheckpointError(f"{weights}: missing")
        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{weights}: unreadable ({err})") from None
        missing, unexpected = tokenizer.load_state_dict(state, strict=False)
        if missing or unexpected:
            names = (missing or unexpected)[:3]
            kind = "missing" if missing else "unexpected"
            raise CheckpointError(f"{weights}: {kind} tensors {', '.join(names)} for {tokenizer_class.__name__}")
        tokenizer.load_extra(path)
        return tokenizer.eval()


# ---------------------------------------------------------------- registry

# Built-in tokenizers by registry name, imported on first use so that `import mmllm.tokenizers`
# stays light (the transformers adapters import large model code).
BUILTIN: dict[str, str] = {
    "image-conv": "mmllm.tokenizers.image:ConvImageTokenizer",
    "image-titok": "mmllm.tokenizers.image_1d:TiTokTokenizer",
    "audio-codec": "mmllm.tokenizers.audio:SpectrogramCodec",
    "video-causal3d": "mmllm.tokenizers.video:CausalVideoTokenizer",
    "video-per-frame": "mmllm.tokenizers.video:PerFrameVideoTokenizer",
    "action-bins": "mmllm.tokenizers.action:BinningActionTokenizer",
    "action-fast": "mmllm.tokenizers.action:FastActionTokenizer",
    "action-vqbet": "mmllm.tokenizers.action:ResidualVQActionTokenizer",
    "hf-emu3": "mmllm.tokenizers.adapters:Emu3Adapter",
    "hf-janus": "mmllm.tokenizers.adapters:JanusAdapter",
    "hf-chameleon": "mmllm.tokenizers.adapters:ChameleonAdapter",
    "hf-encodec": "mmllm.tokenizers.adapters:EncodecAdapter",
    "hf-mimi": "mmllm.tokenizers.adapters:MimiAdapter",
    "hf-dac": "mmllm.tokenizers.adapters:DacAdapter",
}
_REGISTERED: dict[str, type[ModalityTokenizer]] = {}


def register_tokenizer(cls: type[ModalityTokenizer]) -> type[ModalityTokenizer]:
    """Class decorator: make `cls` loadable by its `name` (user tokenizers use it too)."""
    if not cls.name or cls.modality not in MODALITIES:
        raise TypeError(f"{cls.__name__} needs a registry name and a modality in {MODALITIES}")
    _REGISTERED[cls.name] = cls
    return cls


def tokenizer_class_for(name: str) -> type[ModalityTokenizer]:
    if name not in _REGISTERED and name in BUILTIN:
        module, _, attr = BUILTIN[name].partition(":")
        _REGISTERED[name] = getattr(importlib.import_module(module), attr)
    if name not in _REGISTERED:
        known = ", ".join(sorted(set(BUILTIN) | set(_REGISTERED)))
        raise CheckpointError(f"unknown modality tokenizer '{name}' (registered: {known})")
    return _REGISTERED[name]


def available_tokenizers() -> list[str]:
    return sorted(set(BUILTIN) | set(_REGISTERED))


def load_tokenizer(path_or_name: str | Path, **config: Any) -> ModalityTokenizer:
    """A tokenizer from a saved directory, or a fresh one by registry name (with `config`)."""
    path = Path(path_or_name)
    if (path / CONFIG_FILE).is_file():
        if config:
            raise CheckpointError(f"{path}: a saved tokenizer takes no config overrides")
        return ModalityTokenizer.from_pretrained(path)
    if path.exists():
        raise CheckpointError(f"{path}: no {CONFIG_FILE} (not a saved modality tokenizer)")
    return tokenizer_class_for(str(path_or_name))(**config)


def check_media_shape(array: np.ndarray, ndim: int, channels: int | None, where: str, what: str) -> None:
    """Raise a one-line MediaError unless `array` has `ndim` dims (and `channels` last)."""
    if array.ndim != ndim or (channels is not None and array.shape[-1] != channels):
        want = f"{ndim}-d" + (f" with {channels} channels last" if channels is not None else "")
        raise MediaError(f"{where}: {what} has shape {tuple(array.shape)}, expected {want}")
