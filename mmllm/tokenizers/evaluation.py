"""Score a modality tokenizer: reconstruction quality, codebook usage, and oracle agreement.

    python tokenizers/evaluate.py --tokenizer DIR [--data toyworld|FOLDER] [--n 500] [--out report.json]
    mmllm tokenizer evaluate ...

Reconstruction is measured against the prepared input (what the tokenizer actually sees):
PSNR and SSIM for images and video, SI-SNR and log-mel distance for audio, MSE for actions.
Codebook usage is the fraction of each level's codes used over the evaluation set, with the
code perplexity.

Oracle agreement asks whether a round trip keeps the meaning: the toy-world oracles read the
original and the reconstruction, and an item agrees when both readings exist and are equal
(the same shapes, words, or motion; for actions, final gripper positions within
`ACTION_AGREEMENT_TOLERANCE` of the image width). It needs toy-world media, so on a user's
folder it is reported only where the oracle can read the originals.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

from mmllm.tokenizers.base import ModalityTokenizer

# Held-out toy items are generated from this seed offset, so they differ from training items
# (which use data.seed, 0 by default) yet are the same in every evaluation.
HELD_OUT_SEED = 10_000
# Final gripper positions closer than this fraction of the image width read as the same reach
# (one 64-pixel image: about 3 pixels).
ACTION_AGREEMENT_TOLERANCE = 0.05


@dataclass
class TokenizerReport:
    name: str
    modality: str
    items: int
    tokens_per_item: float
    metrics: dict[str, float] = field(default_factory=dict)
    flagged: int = 0  # decodes that needed repair (should be 0 for the tokenizer's own codes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokenizer": self.name,
            "modality": self.modality,
            "items": self.items,
            "tokens_per_item": round(self.tokens_per_item, 2),
            "flagged": self.flagged,
            **{k: round(v, 4) for k, v in self.metrics.items()},
        }


# ---------------------------------------------------------------- reconstruction metrics


def psnr(reference: np.ndarray, reconstruction: np.ndarray) -> float:
    """Peak signal-to-noise ratio of uint8 media, in dB (capped at 100 for identical inputs)."""
    mse = np.mean((reference.astype(np.float64) - reconstruction.astype(np.float64)) ** 2)
    return 100.0 if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ssim(reference: np.ndarray, reconstruction: np.ndarray) -> float:
    """Structural similarity (Wang et al. 2004) of uint8 images (H, W, C) or videos (T, H, W, C).

    Gaussian window sigma 1.5 and K1=0.01, K2=0.03 as in the paper; computed per channel (and
    frame) and averaged.
    """
    x = reference.astype(np.float64)
    y = reconstruction.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    sigma = [0.0] * (x.ndim - 3) + [1.5, 1.5, 0.0]  # blur space only, not time or channels

    def blur(a: np.ndarray) -> np.ndarray:
        return gaussian_filter(a, sigma=sigma, truncate=3.5)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(index.mean())


def si_snr(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Scale-invariant signal-to-noise ratio in dB over the common length (Le Roux et al. 2019)."""
    n = min(len(reference), len(estimate))
    s = reference[:n].astype(np.float64) - reference[:n].mean()
    e = estimate[:n].astype(np.float64) - estimate[:n].mean()
    target = (e @ s) / max(s @ s, 1e-12) * s
    noise = e - target
    return float(10 * np.log10(max(target @ target, 1e-12) / max(noise @ noise, 1e-12)))


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Triangular filters on the HTK mel scale, (n_mels, n_fft // 2 + 1)."""

    def to_mel(hz: np.ndarray) -> np.ndarray:
        return 2595 * np.log10(1 + hz / 700)

    def to_hz(mel: np.ndarray) -> np.ndarray:
        return 700 * (10 ** (mel / 2595) - 1)

    edges = to_hz(np.linspace(0, to_mel(np.array(sample_rate / 2)), n_mels + 2))
    bins = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins - lower) / np.maximum(centre - lower, 1e-9)
    falling = (upper - bins) / np.maximum(upper - centre, 1e-9)
    return np.clip(np.minimum(rising, falling), 0, None)


def mel_distance(reference: np.ndarray, estimate: np.ndarray, sample_rate: int) -> float:
    """Mean absolute difference of log-mel spectrograms (64 mels, 32 ms windows, 8 ms hop)."""
    n = min(len(reference), len(estimate))
    n_fft = 1 << max(6, round(math.log2(0.032 * sample_rate)))
    hop = n_fft // 4
    bank = mel_filterbank(sample_rate, n_fft, 64)
    window = np.hanning(n_fft)

    def log_mel(wave: np.ndarray) -> np.ndarray:
        padded = np.pad(wave[:n].astype(np.float64), (0, max(0, n_fft - n)))
        frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop] * window
        power = np.abs(np.fft.rfft(frames, axis=-1)) ** 2
        return np.log(power @ bank.T + 1e-5)

    return float(np.abs(log_mel(reference) - log_mel(estimate)).mean())


def codebook_usage(codes: Sequence[np.ndarray], codebook_size: int) -> dict[str, float]:
    """Fraction of codes used and code perplexity, averaged over levels."""
    flat = np.concatenate([c.reshape(-1, c.shape[-1]) for c in codes])
    usages, perplexities = [], []
    for level in range(flat.shape[1]):
        counts = np.bincount(flat[:, level], minlength=codebook_size).astype(np.float64)
        probs = counts / counts.sum()
        nonzero = probs[probs > 0]
        usages.append((counts > 0).mean())
        perplexities.append(float(np.exp(-(nonzero * np.log(nonzero)).sum())))
    return {"codebook_usage": float(np.mean(usages)), "perplexity": float(np.mean(perplexities))}


# ---------------------------------------------------------------- oracle agreement


def _oracle_reader(modality: str) -> Callable[[np.ndarray, int | None], Any]:
    from mmllm.data import oracles

    if modality == "image":
        return lambda item, rate: oracles.read_image(item)
    if modality == "audio":
        return lambda item, rate: oracles.read_speech(item, rate)
    if modality == "video":
        return lambda item, rate: oracles.read_video(item)
    return lambda item, rate: oracles.read_action(item)


def _agrees(modality: str, original: Any, reconstruction: Any) -> bool:
    if original is None or reconstruction is None:
        return False
    if modality == "action":
        # Positions are in [-1, 1] image coordinates: the width spans 2 units.
        return math.dist(original, reconstruction) / 2 <= ACTION_AGREEMENT_TOLERANCE
    return original == reconstruction


# ---------------------------------------------------------------- the evaluation


def evaluate_tokenizer(
    tokenizer: ModalityTokenizer,
    items: Sequence[np.ndarray],
    batch_size: int = 32,
    show_progress: bool = True,
) -> TokenizerReport:
    """Round-trip `items` (raw media; audio may be (samples, rate) pairs) through `tokenizer`
    and score the reconstructions."""
    modality = tokenizer.modality
    read = _oracle_reader(modality)
    rate = getattr(tokenizer, "sample_rate", None)
    sums: dict[str, float] = {}
    all_codes: list[np.ndarray] = []
    readable = agreed = flagged = 0
    encode_seconds = decode_seconds = 0.0
    tokens = 0
    batches = range(0, len(items), batch_size)
    for lo in tqdm(batches, desc=f"evaluate {tokenizer.name}", unit="batch", disable=not show_progress):
        raw = list(items[lo : lo + batch_size])
        prepared = [tokenizer.prepare(item, f"item {lo + i}") for i, item in enumerate(raw)]
        started = time.perf_counter()
        encoded = tokenizer.encode(prepared)
        encode_seconds += time.perf_counter() - started
        codes = encoded.items()
        started = time.perf_counter()
        decoded = tokenizer.decode(codes)
        decode_seconds += time.perf_counter() - started
        flagged += decoded.num_flagged
        all_codes += codes
        tokens += sum(c.size for c in codes)
        for original, source, reconstruction in zip(prepared, raw, decoded.media, strict=True):
            for key, value in _reconstruction_metrics(modality, original, reconstruction, rate).items():
                sums[key] = sums.get(key, 0.0) + value
            source, source_rate = source if isinstance(source, tuple) else (source, rate)
            reading = read(source, source_rate)
            if reading is not None:
                readable += 1
                agreed += _agrees(modality, reading, read(reconstruction, rate))
    n = len(items)
    metrics = {key: total / n for key, total in sums.items()}
    metrics.update(codebook_usage(all_codes, tokenizer.codebook_size))
    if readable:
        metrics["oracle_agreement"] = agreed / readable
    metrics["encode_items_per_s"] = n / max(encode_seconds, 1e-9)
    metrics["decode_items_per_s"] = n / max(decode_seconds, 1e-9)
    return TokenizerReport(tokenizer.name, modality, n, tokens / max(n, 1), metrics, flagged)


def _reconstruction_metrics(
    modality: str, original: np.ndarray, reconstruction: np.ndarray, rate: int | None
) -> dict[str, float]:
    if modality in ("image", "video"):
        if original.shape != reconstruction.shape:
            return {"shape_mismatch": 1.0}
        return {"psnr": psnr(original, reconstruction), "ssim": ssim(original, reconstruction)}
    if modality == "audio":
        return {
            "si_snr": si_snr(original, reconstruction),
            "mel_distance": mel_distance(original, reconstruction, rate),
        }
    n = min(len(original), len(reconstruction))
    return {"mse": float(np.mean((original[:n] - reconstruction[:n]) ** 2))}


def held_out_items(modality: str, n: int) -> list:
    """`n` toy-world items that no toy training run sees."""
    from mmllm.tokenizers.training import toy_items

    return toy_items(modality, n, HELD_OUT_SEED)
