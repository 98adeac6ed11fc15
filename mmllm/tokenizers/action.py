"""Action tokenizers: chunks of continuous actions <-> integer codes, three ways.

An action item is a chunk float32 (steps, dims) of normalised actions. `prepare` is shared:

* the array must be 2-D, numeric, finite, with the configured `dims` and 1..`chunk` steps,
  otherwise a one-line MediaError;
* values are clipped to [-1, 1] (actions are normalised upstream; OpenVLA clips the same way);
* a chunk shorter than `chunk` is padded with zero actions up to `chunk` steps. Actions are
  deltas in the toy world ((dx, dy) per step), so a zero action means "stay" and padding keeps
  where the chunk ends; decoding returns the padded `chunk` steps. A longer chunk is refused
  rather than truncated, because truncation would silently drop motion: split it first.

The tokenizers (registry names in brackets):

* `BinningActionTokenizer` [action-bins] (RT-2, OpenVLA): every value falls in one of 256 bins
  of its dimension; grid (chunk, dims), one code per value. `mode: uniform` cuts [-1, 1] evenly
  and decodes to bin centres, so the round-trip error is at most half a bin. `mode: quantile`
  places each dimension's edges at the data's quantiles (`fit`), spending bins where actions
  are dense, and decodes to the median of the training values in each bin (the value that
  minimises the mean absolute error), or to the bin centre for a bin no training value fell in.
* `FastActionTokenizer` [action-fast] (FAST, Pertsch et al. 2025, as in openpi): a DCT-II per
  dimension over the chunk, coefficients times `scale` rounded to integers and listed frequency
  by frequency (all dims of frequency 0, then of frequency 1, ...), each integer one character,
  then a byte-pair encoding learned on data (`fit`). Smooth chunks have few non-zero high
  frequencies, so BPE merges them into few tokens; the codes are ragged, at most chunk * dims.
  Decoding never fails (openpi#833: 171 of 500 episodes hit a malformed FAST decode): ids that
  are not in the vocabulary are dropped, and a sequence that does not spell exactly chunk * dims
  coefficients is zero-filled (missing high frequencies) or truncated, and flagged.
* `ResidualVQActionTokenizer` [action-vqbet] (VQ-BeT, Lee et al. 2024): an MLP encodes each
  sub-chunk of `sub_chunk` steps into a latent, a residual VQ quantizes it into `depth` codes,
  and an MLP decodes the quantized latent back; trained with MSE plus the quantizer's loss.
  Grid (chunk // sub_chunk,), levels = the quantizer's depth.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.fft import dct, idct
from tokenizers import Tokenizer, models, trainers
from torch import nn

from mmllm.errors import CheckpointError, ConfigError, MediaError
from mmllm.tokenizers.base import EncodedBatch, ModalityTokenizer, check_media_shape, register_tokenizer
from mmllm.tokenizers.quantizers import build_quantizer

CHUNK_STEPS = 10  # the toy world's reaching chunks: 10 steps
ACTION_DIMS = 2  # (dx, dy)


class ActionChunkTokenizer(ModalityTokenizer):
    """What every action tokenizer shares: a chunk of `chunk` steps of `dims` values in [-1, 1]."""

    modality = "action"

    def __init__(self, chunk: int, dims: int):
        super().__init__()
        if int(chunk) < 1 or int(dims) < 1:
            raise ConfigError(f"{self.name}: chunk and dims must be positive, got chunk={chunk}, dims={dims}")
        self.chunk = int(chunk)
        self.dims = int(dims)

    def prepare(self, item: Any, where: str = "input") -> np.ndarray:
        """A float32 (chunk, dims) chunk in [-1, 1]: clipped, and padded with zero actions when short."""
        try:
            array = np.asarray(item)
        except ValueError as err:  # ragged nested lists
            raise MediaError(f"{where}: action chunk is not an array ({err})") from None
        if array.dtype.kind not in "iuf":
            raise MediaError(f"{where}: action chunk has dtype {array.dtype}, expected numbers")
        check_media_shape(array, 2, self.dims, where, "action chunk")
        steps = array.shape[0]
        if steps == 0 or steps > self.chunk:
            raise MediaError(f"{where}: action chunk has {steps} steps, expected 1 to {self.chunk}")
        if not np.isfinite(array).all():
            raise MediaError(f"{where}: action chunk has NaN or infinite values")
        chunk = np.zeros((self.chunk, self.dims), dtype=np.float32)
        chunk[:steps] = np.clip(array, -1.0, 1.0)
        return chunk

    def blank(self) -> np.ndarray:
        """Zero actions: the gripper stays where it is."""
        return np.zeros((self.chunk, self.dims), dtype=np.float32)


# ---------------------------------------------------------------- binning (RT-2, OpenVLA)


@register_tokenizer
class BinningActionTokenizer(ActionChunkTokenizer):
    """256 bins per action dimension, uniform over [-1, 1] or at the data's quantiles."""

    name = "action-bins"
    fittable = True  # quantile edges come from data; in uniform mode `fit` only measures
    levels = 1
    max_frames = None

    def __init__(self, chunk: int = CHUNK_STEPS, dims: int = ACTION_DIMS, bins: int = 256, mode: str = "uniform"):
        super().__init__(chunk, dims)
        if mode not in ("uniform", "quantile"):
            raise ConfigError(f"{self.name}: mode must be 'uniform' or 'quantile', got {mode!r}")
        if int(bins) < 2:
            raise ConfigError(f"{self.name}: bins must be at least 2, got {bins}")
        self.mode = mode
        self.codebook_size = int(bins)
        self.grid = (self.chunk, self.dims)
        edges = np.tile(np.linspace(-1.0, 1.0, self.codebook_size + 1), (self.dims, 1))
        # Per dimension: bin k covers [edges[k], edges[k + 1]) and decodes to values[k].
        self.register_buffer("edges", torch.from_numpy(edges).float())
        self.register_buffer("values", torch.from_numpy((edges[:, 1:] + edges[:, :-1]) / 2).float())

    def get_config(self) -> dict[str, Any]:
        return {"chunk": self.chunk, "dims": self.dims, "bins": self.codebook_size, "mode": self.mode}

    def bin_indexes(self, chunks: np.ndarray) -> np.ndarray:
        """Bin of every value of (..., dims) chunks, int64 of the same shape."""
        edges = self.edges.numpy()
        return np.stack(
            [np.searchsorted(edges[d, 1:-1], chunks[..., d], side="right") for d in range(self.dims)], axis=-1
        ).astype(np.int64)

    def _encode(self, items: list[np.ndarray]) -> EncodedBatch:
        codes = torch.from_numpy(self.bin_indexes(np.stack(items))).reshape(len(items), -1, 1)
        return EncodedBatch(codes, torch.full((len(items),), codes.shape[1], dtype=torch.long))

    def _decode(self, codes: list[np.ndarray]) -> list[np.ndarray]:
        values = self.values.numpy()
        return [values[np.arange(self.dims), item.reshape(self.chunk, self.dims)] for item in codes]

    def fit(self, items: list[np.ndarray]) -> dict[str, float]:
        """Quantile mode: per-dimension edges at the data's quantiles and per-bin medians."""
        chunks = np.stack(items)
        if self.mode == "quantile":
            samples = chunks.reshape(-1, self.dims)
            quantiles = np.linspace(0.0, 1.0, self.codebook_size + 1)
            edges = np.quantile(samples, quantiles, axis=0).T  # (dims, bins + 1), non-decreasing
            edges[:, 0], edges[:, -1] = -1.0, 1.0  # prepare clips to [-1, 1]: the outer bins reach the limits
            self.edges.copy_(torch.from_numpy(edges))
            indexes = self.bin_indexes(samples)
            values = (edges[:, 1:] + edges[:, :-1]) / 2
            for d in range(self.dims):
                for k in np.unique(indexes[:, d]):
                    values[d, k] = np.median(samples[indexes[:, d] == k, d])
            self.values.copy_(torch.from_numpy(values))
        indexes = self.bin_indexes(chunks)
        decoded = self.values.numpy()[np.arange(self.dims), indexes]
        used = np.mean([np.unique(indexes[..., d]).size / self.codebook_size for d in range(self.dims)])
        return {"mse": float(np.mean((decoded - chunks) ** 2)), "usage": float(used)}


# ---------------------------------------------------------------- FAST (DCT + BPE)

# Integer DCT coefficients travel through BPE as characters: coefficient v is chr(CHAR_ZERO + v).
# U+F8000 is the middle of Supplementary Private Use Area-A (U+F0000..U+FFFFD): characters no
# normaliser or pre-tokenizer treats as spaces or punctuation, with room for |v| <= MAX_COEFFICIENT.
CHAR_ZERO = 0xF8000
MAX_COEFFICIENT = 0x7FFD
BPE_FILE = "bpe_tokenizer.json"  # not tokenizer.json: the directory must not look like a text tokenizer's


def coefficient_char(value: int) -> str:
    return chr(CHAR_ZERO + value)


def bpe_from_alphabet(low: int, high: int) -> Tokenizer:
    """A BPE without merges: one token per coefficient value in [low, high]."""
    vocab = {coefficient_char(v): i for i, v in enumerate(range(low, high + 1))}
    return Tokenizer(models.BPE(vocab=vocab, merges=[]))


@register_tokenizer
class FastActionTokenizer(ActionChunkTokenizer):
    """FAST: DCT per dimension, scale and round, byte-pair encode the integers (ragged codes)."""

    name = "action-fast"
    fittable = True
    levels = 1
    grid = None

    def __init__(
        self,
        chunk: int = CHUNK_STEPS,
        dims: int = ACTION_DIMS,
        scale: float = 10.0,
        vocab_size: int = 1024,
        min_frequency: int = 2,
    ):
        super().__init__(chunk, dims)
        # With |action| <= 1, a dimension's ortho DCT has norm <= sqrt(chunk), so does every coefficient.
        bound = math.ceil(float(scale) * math.sqrt(self.chunk))
        if not 0 < bound <= MAX_COEFFICIENT:
            raise ConfigError(
                f"{self.name}: scale {scale} gives DCT integers up to {bound}; allowed 1 to {MAX_COEFFICIENT}"
            )
        if int(vocab_size) < 2:
            raise ConfigError(f"{self.name}: vocab_size must be at least 2, got {vocab_size}")
        self.scale = float(scale)
        self.codebook_size = int(vocab_size)
        self.min_frequency = int(min_frequency)
        self.max_frames = self.chunk * self.dims  # BPE never makes more tokens than characters
        # Before `fit`: no merges, and as many coefficient values around 0 as the vocabulary holds.
        half = min(bound, (self.codebook_size - 1) // 2)
        self.register_buffer("coefficient_range", torch.tensor([-half, half], dtype=torch.long))
        self.bpe = bpe_from_alphabet(-half, half)

    def get_config(self) -> dict[str, Any]:
        return {
            "chunk": self.chunk,
            "dims": self.dims,
            "scale": self.scale,
            "vocab_size": self.codebook_size,
            "min_frequency": self.min_frequency,
        }

    def coefficients(self, chunks: np.ndarray) -> np.ndarray:
        """Rounded scaled DCT coefficients of (batch, chunk, dims) chunks, frequency-major: (batch, chunk * dims)."""
        return np.rint(dct(chunks, axis=1, norm="ortho") * self.scale).astype(np.int64).reshape(len(chunks), -1)

    def coefficient_text(self, coefficients: np.ndarray) -> str:
        return "".join(coefficient_char(int(v)) for v in coefficients)

    def _encode(self, items: list[np.ndarray]) -> EncodedBatch:
        low, high = self.coefficient_range.tolist()
        texts = [self.coefficient_text(row) for row in self.coefficients(np.stack(items)).clip(low, high)]
        ids = [encoding.ids for encoding in self.bpe.encode_batch(texts)]
        codes = torch.zeros(len(ids), max(map(len, ids)), 1, dtype=torch.long)
        for i, row in enumerate(ids):
            codes[i, : len(row), 0] = torch.tensor(row, dtype=torch.long)
        return EncodedBatch(codes, torch.tensor([len(row) for row in ids], dtype=torch.long))

    def spell(self, ids: np.ndarray) -> tuple[np.ndarray, str]:
        """The chunk * dims integer coefficients that BPE ids spell, and a note of what was repaired."""
        notes, values = [], []
        unknown = 0
        for token in (self.bpe.id_to_token(int(i)) for i in ids):
            if token is None:
                unknown += 1
            else:
                values.extend(ord(char) - CHAR_ZERO for char in token)
        if unknown:
            notes.append(f"{unknown} ids not in the BPE vocabulary dropped")
        want = self.chunk * self.dims
        coefficients = np.zeros(want, dtype=np.int64)  # a missing coefficient is a missing high frequency: 0
        coefficients[: min(len(values), want)] = values[:want]
        if len(values) != want:
            fix = "high frequencies zero-filled" if len(values) < want else "extra ones dropped"
            notes.append(f"{len(values)} DCT coefficients, expected {want}; {fix}")
        return coefficients, "; ".join(notes)

    def repair(self, item: Any) -> tuple[np.ndarray, str]:
        codes, note = super().repair(item)
        _, spelling_note = self.spell(codes[:, 0])
        return codes, "; ".join(n for n in (note, spelling_note) if n)

    def _decode(self, codes: list[np.ndarray]) -> list[np.ndarray]:
        coefficients = np.stack([self.spell(item[:, 0])[0] for item in codes]).reshape(-1, self.chunk, self.dims)
        chunks = idct(coefficients / self.scale, axis=1, norm="ortho")
        return list(np.clip(chunks, -1.0, 1.0).astype(np.float32))

    def fit(self, items: list[np.ndarray]) -> dict[str, float]:
        """Learn the coefficient range and BPE merges from chunks; the vocabulary holds every value seen."""
        coefficients = self.coefficients(np.stack(items))
        low, high = int(coefficients.min()), int(coefficients.max())
        if high - low + 1 > self.codebook_size:
            raise ConfigError(
                f"{self.name}: {high - low + 1} distinct DCT integers at scale {self.scale} exceed "
                f"vocab_size {self.codebook_size}; lower scale or raise vocab_size"
            )
        bpe = Tokenizer(models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=self.codebook_size,
            min_frequency=self.min_frequency,
            initial_alphabet=[coefficient_char(v) for v in range(low, high + 1)],
            show_progress=False,
        )
        bpe.train_from_iterator((self.coefficient_text(row) for row in coefficients), trainer, length=len(items))
        self.bpe = bpe
        self.coefficient_range.copy_(torch.tensor([low, high]))
        tokens = self.encode(items).lengths.double().mean().item()
        return {"vocab": bpe.get_vocab_size(), "tokens_per_item": tokens, "compression": self.max_frames / tokens}

    def save_extra(self, directory: Path) -> None:
        (directory / BPE_FILE).write_text(self.bpe.to_str(), encoding="utf-8")

    def load_extra(self, directory: Path) -> None:
        path = directory / BPE_FILE
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (the FAST tokenizer's BPE vocabulary)")
        try:
            bpe = Tokenizer.from_str(path.read_text(encoding="utf-8"))
        except Exception as err:  # the tokenizers library raises plain Exception on bad JSON
            raise CheckpointError(f"{path}: unreadable BPE vocabulary ({err})") from None
        if bpe.get_vocab_size() > self.codebook_size:
            raise CheckpointError(f"{path}: {bpe.get_vocab_size()} BPE tokens exceed vocab_size {self.codebook_size}")
        self.bpe = bpe


# ---------------------------------------------------------------- residual VQ (VQ-BeT)


@register_tokenizer
class ResidualVQActionTokenizer(ActionChunkTokenizer):
    """VQ-BeT: MLP encoder per sub-chunk, residual VQ, MLP decoder; grid (chunk // sub_chunk,)."""

    name = "action-vqbet"
    trainable = True
    max_frames = None

    def __init__(
        self,
        chunk: int = CHUNK_STEPS,
        dims: int = ACTION_DIMS,
        sub_chunk: int = 5,
        hidden: int = 128,
        latent_dim: int = 16,
        quantizer: dict[str, Any] | None = None,
    ):
        super().__init__(chunk, dims)
        if int(sub_chunk) < 1 or self.chunk % int(sub_chunk):
            raise ConfigError(f"{self.name}: sub_chunk {sub_chunk} must divide chunk {self.chunk}")
        if int(hidden) < 1 or int(latent_dim) < 1:
            raise ConfigError(f"{self.name}: hidden and latent_dim must be positive, got {hidden}, {latent_dim}")
        self.sub_chunk = int(sub_chunk)
        self.hidden = int(hidden)
        self.latent_dim = int(latent_dim)
        # VQ-BeT's residual VQ; depth 2 x 256 codes per sub-chunk by default.
        self.quantizer_spec = dict(quantizer or {"kind": "rvq", "depth": 2, "codebook_size": 256})
        self.quantizer = build_quantizer(self.latent_dim, self.quantizer_spec)
        self.codebook_size = self.quantizer.codebook_size
        self.levels = self.quantizer.levels
        self.grid = (self.chunk // self.sub_chunk,)
        width = self.sub_chunk * self.dims
        self.encoder = nn.Sequential(
            nn.Linear(width, self.hidden),
            nn.GELU(),
            nn.Linear(self.hidden, self.hidden),
            nn.GELU(),
            nn.Linear(self.hidden, self.latent_dim),
        )
        self.decoder = nn.Sequential(
            nn.Linear(self.latent_dim, self.hidden),
            nn.GELU(),
            nn.Linear(self.hidden, self.hidden),
            nn.GELU(),
            nn.Linear(self.hidden, width),
        )

    def get_config(self) -> dict[str, Any]:
        return {
            "chunk": self.chunk,
            "dims": self.dims,
            "sub_chunk": self.sub_chunk,
            "hidden": self.hidden,
            "latent_dim": self.latent_dim,
            "quantizer": self.quantizer_spec,
        }

    def latents(self, chunks: torch.Tensor) -> torch.Tensor:
        """(batch, chunk, dims) chunks to (batch, chunk // sub_chunk, latent_dim) latents."""
        return self.encoder(chunks.reshape(len(chunks), self.grid[0], -1))

    def reconstruct(self, quantized: torch.Tensor) -> torch.Tensor:
        """(batch, chunk // sub_chunk, latent_dim) quantized latents to (batch, chunk, dims) chunks."""
        return self.decoder(quantized).reshape(len(quantized), self.chunk, self.dims)

    def collate(self, items: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(items))

    def training_loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        quantized = self.quantizer(self.latents(batch))
        mse = nn.functional.mse_loss(self.reconstruct(quantized.quantized), batch)
        logs = {"mse": mse.item(), "quantizer_loss": quantized.loss.item(), **self.quantizer.usage(quantized.codes)}
        return mse + quantized.loss, logs

    def _encode(self, items: list[np.ndarray]) -> EncodedBatch:
        codes = self.quantizer.encode(self.latents(self.collate(items)))
        return EncodedBatch(codes, torch.full((len(items),), codes.shape[1], dtype=torch.long))

    def _decode(self, codes: list[np.ndarray]) -> list[np.ndarray]:
        chunks = self.reconstruct(self.quantizer.decode(torch.from_numpy(np.stack(codes))))
        return list(chunks.clamp(-1.0, 1.0).numpy())
