"""Reconstruction metrics of `mmllm tokenizer evaluate`, against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from mmllm.tokenizers.evaluation import codebook_usage, mel_distance, mel_filterbank, psnr, si_snr, ssim


def test_psnr_matches_the_formula():
    a = np.zeros((4, 4, 3), dtype=np.uint8)
    b = a.copy()
    b[0, 0, 0] = 48  # mse = 48^2 / 48 = 48
    assert psnr(a, b) == pytest.approx(10 * np.log10(255**2 / 48))
    assert psnr(a, a) == 100.0


def test_ssim_is_one_for_identical_and_drops_with_noise():
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 32)
    image = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], 128.0 + 0 * ramp[:, None]), -1).astype(np.uint8)
    assert ssim(image, image) == pytest.approx(1.0)
    noisy = np.clip(image.astype(int) + rng.integers(-60, 61, size=image.shape), 0, 255).astype(np.uint8)
    assert 0 < ssim(image, noisy) < 0.5
    video = np.stack([image, noisy])
    assert ssim(video, video) == pytest.approx(1.0)
    # Only space is blurred: a frame-swapped video scores like its worst frames, not like a blend.
    assert ssim(video, video[::-1]) == pytest.approx(ssim(image, noisy), abs=1e-9)


def test_si_snr_ignores_scale_and_measures_noise():
    rng = np.random.default_rng(1)
    signal = rng.standard_normal(8000)
    noise = rng.standard_normal(8000) * 0.1
    assert si_snr(signal, 3.0 * signal) > 100  # scale invariant: no noise at all
    expected = 10 * np.log10(np.sum(signal**2) / np.sum(noise**2))
    assert si_snr(signal, signal + noise) == pytest.approx(expected, abs=0.2)


def test_mel_filterbank_and_distance():
    bank = mel_filterbank(8000, 256, 64)
    assert bank.shape == (64, 129) and bank.min() >= 0 and (bank.max(axis=1) > 0).all()
    t = np.arange(8000) / 8000
    tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    other = np.sin(2 * np.pi * 1760 * t).astype(np.float32)
    assert mel_distance(tone, tone, 8000) == 0
    assert mel_distance(tone, other, 8000) > 1.0


def test_codebook_usage_counts_each_level():
    codes = [np.array([[0, 1], [1, 1]]), np.array([[2, 1]])]
    usage = codebook_usage(codes, codebook_size=4)
    # level 0 uses 3 of 4 codes uniformly (perplexity 3); level 1 uses 1 code (perplexity 1)
    assert usage["codebook_usage"] == pytest.approx((3 / 4 + 1 / 4) / 2)
    assert usage["perplexity"] == pytest.approx((3 + 1) / 2)
