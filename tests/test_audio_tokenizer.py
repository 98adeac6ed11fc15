"""The STFT-domain audio codec ("audio-codec").

The model is tiny and untrained (toy-quality training is measured by `mmllm bench tokenizers`):
these tests pin the contract (round-trip shapes and lengths, determinism, batch-vs-single and
save/load equality, malformed and coarse-only decode, the layout's flattenings, input
conventions) and that training lowers the loss.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mmllm.data.toyworld import SPEECH_SAMPLE_RATE, speak
from mmllm.errors import MediaError
from mmllm.tokenizers import load_tokenizer
from mmllm.tokenizers.audio import SpectrogramCodec
from mmllm.tokenizers.training import DataConfig, OptimConfig, TokenizerTrainConfig, load_train_config, train_tokenizer
from mmllm.vocab import VocabLayout

ROOT = Path(__file__).resolve().parents[1]
TINY = {"channels": [8, 8, 16]}
FRAME = SPEECH_SAMPLE_RATE // 25  # samples per code frame at 16 kHz


@pytest.fixture(scope="module")
def codec() -> SpectrogramCodec:
    torch.manual_seed(0)
    return load_tokenizer("audio-codec", **TINY).eval()


@pytest.fixture(scope="module")
def waves() -> list[np.ndarray]:
    return [speak("a red circle"), speak("the blue star is left of the green square"), speak("yes")]


def test_round_trip_shapes_dtypes_and_lengths(codec: SpectrogramCodec, waves: list[np.ndarray]) -> None:
    encoded = codec.encode(waves)
    frames = [-(-len(w) // FRAME) for w in waves]
    assert encoded.lengths.tolist() == frames
    assert encoded.codes.shape == (3, max(frames), 2) and encoded.codes.dtype == torch.long
    assert int(encoded.codes.min()) >= 0 and int(encoded.codes.max()) < 256
    assert codec.tokens_per_item == 100 and codec.grid is None
    decoded = codec.decode(encoded)
    assert decoded.flags == ["", "", ""]
    for wave, n in zip(decoded.media, frames, strict=True):
        assert wave.dtype == np.float32 and wave.shape == (n * FRAME,) and np.isfinite(wave).all()


def test_encode_and_decode_are_deterministic(codec: SpectrogramCodec, waves: list[np.ndarray]) -> None:
    first, second = codec.encode(waves), codec.encode(waves)
    assert torch.equal(first.codes, second.codes)
    for a, b in zip(codec.decode(first).media, codec.decode(second).media, strict=True):
        np.testing.assert_array_equal(a, b)


def test_batching_never_changes_an_items_codes(codec: SpectrogramCodec, waves: list[np.ndarray]) -> None:
    batch = codec.encode(waves).items()
    for wave, codes in zip(waves, batch, strict=True):
        np.testing.assert_array_equal(codec.encode([wave]).items()[0], codes)


def test_save_load_gives_equal_codes_and_audio(
    codec: SpectrogramCodec, waves: list[np.ndarray], tmp_path: Path
) -> None:
    codec.save_pretrained(tmp_path / "codec")
    loaded = load_tokenizer(tmp_path / "codec")
    assert isinstance(loaded, SpectrogramCodec) and loaded.get_config() == codec.get_config()
    codes = codec.encode(waves)
    assert torch.equal(loaded.encode(waves).codes, codes.codes)
    for a, b in zip(codec.decode(codes).media, loaded.decode(codes).media, strict=True):
        np.testing.assert_array_equal(a, b)


def test_malformed_codes_decode_to_flagged_audio(codec: SpectrogramCodec) -> None:
    rng = np.random.default_rng(0)
    malformed = [
        rng.integers(-500, 500, size=(7, 2)),  # out of range
        rng.integers(0, 256, size=(80, 2)),  # past max_frames
        np.zeros((0, 2), dtype=np.int64),  # empty
        rng.integers(0, 256, size=(5, 3)),  # an extra level
        np.full((4, 2), np.nan),  # not integers
        "not codes",
    ]
    decoded = codec.decode(malformed)
    assert len(decoded.media) == len(malformed) and decoded.num_flagged == len(malformed)
    for wave in decoded.media:
        assert wave.dtype == np.float32 and wave.ndim == 1 and 0 < wave.size <= 50 * FRAME
        assert wave.size % FRAME == 0 and np.isfinite(wave).all()
    assert decoded.media[1].size == 50 * FRAME
    np.testing.assert_array_equal(codec.blank(), np.zeros(FRAME, dtype=np.float32))


def test_coarse_codes_decode_with_zero_residual_fine_level(codec: SpectrogramCodec, waves: list[np.ndarray]) -> None:
    centre = codec.zero_residual_codes()
    # Residual FSQ with bins [4, 4, 4, 4]: digit 2 of each channel is value 0, so 2 * (1 + 4 + 16 + 64).
    assert centre.tolist() == [170, 170]
    fine_level = codec.quantizer.decode(torch.tensor([[0, 170]])) - codec.quantizer.decode(torch.tensor([[0]]))
    assert torch.equal(fine_level, torch.zeros_like(fine_level))
    codes = codec.encode(waves[:1]).items()[0]
    coarse = codec.decode([codes[:, :1]])
    assert "zero-residual" in coarse.flags[0]
    filled = codes.copy()
    filled[:, 1] = centre[1]
    np.testing.assert_array_equal(coarse.media[0], codec.decode([filled]).media[0])


@pytest.mark.parametrize(("flattening", "options"), [("frame_major", {}), ("first_k", {"first_k": 1})])
def test_codes_map_through_the_vocab_layout(
    codec: SpectrogramCodec, waves: list[np.ndarray], flattening: str, options: dict
) -> None:
    layout = VocabLayout.build(100, [codec.modality_range(flattening=flattening, **options)])
    encoded = codec.encode(waves)
    for codes in encoded.items():
        ids = layout.codes_to_ids("audio", codes)
        stream_levels = options.get("first_k", 2)
        assert len(ids) == len(codes) * stream_levels
        back = layout.ids_to_codes("audio", ids).codes
        np.testing.assert_array_equal(back, codes[:, :stream_levels])
        wave = codec.decode([back]).media[0]
        assert wave.shape == (len(codes) * FRAME,)


def test_input_is_resampled_and_downmixed(codec: SpectrogramCodec) -> None:
    native = speak("a red circle")
    np.testing.assert_array_equal(codec.prepare(native), native)
    np.testing.assert_array_equal(codec.prepare((native, SPEECH_SAMPLE_RATE)), native)
    at_8k = codec.prepare((speak("a red circle", 8000), 8000))
    assert at_8k.dtype == np.float32 and at_8k.shape == native.shape
    assert np.corrcoef(at_8k, native)[0, 1] > 0.98  # the tones lie under 4 kHz: 8 kHz holds them
    stereo = np.stack([native, np.zeros_like(native)], axis=1)
    np.testing.assert_allclose(codec.prepare(stereo), native / 2)
    assert codec.prepare(codec.prepare(native)).shape == native.shape  # idempotent: encode prepares again


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (np.array([0.1, np.nan, 0.2], dtype=np.float32), "NaN"),
        (np.array([0.1, np.inf], dtype=np.float32), "NaN or infinite"),
        (np.zeros(100, dtype=np.int16), "dtype int16"),
        (np.zeros((4, 100, 2), dtype=np.float32), "shape"),
        (np.zeros((2, 16000), dtype=np.float32), "shape"),
        (np.zeros(0, dtype=np.float32), "no samples"),
        (np.zeros(51 * FRAME, dtype=np.float32), "longer than"),
        ((np.zeros(100, dtype=np.float32), 0), "not positive"),
    ],
)
def test_bad_input_raises_a_one_line_media_error(codec: SpectrogramCodec, item: object, message: str) -> None:
    with pytest.raises(MediaError, match=message) as caught:
        codec.encode([item])
    assert "item 0" in str(caught.value) and "\n" not in str(caught.value)


def test_training_lowers_the_loss() -> None:
    torch.manual_seed(0)
    codec = SpectrogramCodec(**TINY)
    batch = codec.collate([speak("a large red circle"), speak("yes")])
    optimizer = torch.optim.Adam(codec.parameters(), lr=1e-2)
    first, logs = codec.training_loss(batch)
    assert {"spectral_convergence", "log_magnitude", "usage", "perplexity"} <= set(logs)
    for _ in range(30):
        loss, _ = codec.training_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(codec.training_loss(batch)[0].detach()) < 0.9 * float(first.detach())


def test_trainer_runs_the_toy_config(tmp_path: Path) -> None:
    config = load_train_config(ROOT / "configs/tokenizer/audio_toy.yaml")
    assert config.tokenizer == "audio-codec" and config.train.threads == 2
    small = TokenizerTrainConfig(
        tokenizer="audio-codec",
        config={**config.config, **TINY},
        data=DataConfig(num_items=8),
        train=OptimConfig(steps=3, batch_size=4, warmup_steps=1),
        out=str(tmp_path / "run"),
    )
    result = train_tokenizer(small, show_progress=False)
    assert result.steps == 3 and np.isfinite(result.final_logs["loss"])
    reloaded = load_tokenizer(tmp_path / "run")
    assert reloaded.get_config() == result.tokenizer.get_config()
    assert yaml.safe_load((ROOT / "configs/tokenizer/audio_toy.yaml").read_text())["config"]["max_frames"] == 50
