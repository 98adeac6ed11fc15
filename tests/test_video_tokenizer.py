"""Video tokenizers: the causal 3D conv tokenizer and the per-frame wrapper around an image tokenizer.

Models are tiny and untrained (toy-quality training is measured by `mmllm bench tokenizers`):
these tests pin the contract (shapes, causality, determinism, batch-vs-single and save/load
equality, malformed decode, input conventions) and that training lowers the loss.
"""

from __future__ import annotations

import random
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import yaml

from mmllm.data import media
from mmllm.data.toyworld import render_video, sample_motion, toy_media
from mmllm.errors import ConfigError, MediaError
from mmllm.tokenizers import load_tokenizer
from mmllm.tokenizers.training import DataConfig, OptimConfig, TokenizerTrainConfig, load_train_config, train_tokenizer
from mmllm.tokenizers.video import CausalVideoTokenizer, PerFrameVideoTokenizer

ROOT = Path(__file__).resolve().parents[1]
# small widths GroupNorm's 8 groups allow
TINY = {"channels": [8, 8, 16], "strides": [2, 2, 2], "encoder_blocks": 1, "decoder_blocks": 1}
TINY_IMAGE = {"channels": [8], "strides": [8]}


@pytest.fixture(scope="module")
def tokenizer() -> CausalVideoTokenizer:
    torch.manual_seed(0)
    return load_tokenizer("video-causal3d", **TINY).eval()


@pytest.fixture(scope="module")
def videos() -> list[np.ndarray]:
    return toy_media("video", 3, seed=0)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("image") / "image_tokenizer"
    load_tokenizer("image-conv", **TINY_IMAGE).save_pretrained(path)
    return path


def test_layout_matches_the_toy_vocabulary(tokenizer):
    toy = yaml.safe_load((ROOT / "configs/vocab/toy.yaml").read_text())["modalities"]["video"]
    assert tokenizer.grid == tuple(toy["grid"]) == (3, 8, 8)
    assert tokenizer.codebook_size == toy["codebook_size"] == 512
    assert tokenizer.levels == 1 and tokenizer.tokens_per_item == 192
    config = load_train_config(ROOT / "configs/tokenizer/video_toy.yaml")
    built = load_tokenizer(config.tokenizer, **config.config)
    assert (built.grid, built.codebook_size, built.modality) == ((3, 8, 8), 512, "video")


def test_round_trip_shapes(tokenizer, videos):
    encoded = tokenizer.encode(videos)
    assert encoded.codes.shape == (3, 192, 1) and encoded.lengths.tolist() == [192] * 3
    assert int(encoded.codes.min()) >= 0 and int(encoded.codes.max()) < 512
    decoded = tokenizer.decode(encoded)
    assert decoded.flags == ["", "", ""]
    assert all(video.shape == (9, 64, 64, 3) and video.dtype == np.uint8 for video in decoded.media)


def codes_by_latent_frame(tokenizer, video: np.ndarray) -> np.ndarray:
    return tokenizer.encode([video]).codes[0, :, 0].reshape(3, 64).numpy()


def test_encoder_is_causal(tokenizer, videos):
    """Latent frame 0 sees frame 0 only; latent frame 1 sees frames 0-4; later frames change only later codes."""
    video = videos[0]
    original = codes_by_latent_frame(tokenizer, video)
    noise = np.random.default_rng(0).integers(0, 256, video.shape, dtype=np.uint8)
    after_first, after_fourth = video.copy(), video.copy()
    after_first[1:] = noise[1:]
    after_fourth[5:] = noise[5:]
    changed_late = codes_by_latent_frame(tokenizer, after_first)
    changed_last = codes_by_latent_frame(tokenizer, after_fourth)
    assert np.array_equal(changed_late[0], original[0])
    assert not np.array_equal(changed_late[1:], original[1:])  # the test can fail: later codes do see the change
    assert np.array_equal(changed_last[:2], original[:2])
    assert not np.array_equal(changed_last[2], original[2])


def test_decoder_is_causal(tokenizer):
    """Output frame 0 depends on latent frame 0 only; frames 0-4 on latent frames 0-1."""
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 512, (192, 1))
    later = codes.copy()
    later[64:] = rng.integers(0, 512, (128, 1))
    last = codes.copy()
    last[128:] = rng.integers(0, 512, (64, 1))
    base, changed_late, changed_last = tokenizer.decode([codes, later, last]).media
    assert np.array_equal(changed_late[0], base[0]) and not np.array_equal(changed_late[1:], base[1:])
    assert np.array_equal(changed_last[:5], base[:5]) and not np.array_equal(changed_last[5:], base[5:])


def test_deterministic_and_batch_equals_single(tokenizer, videos):
    batch = tokenizer.encode(videos)
    assert torch.equal(batch.codes, tokenizer.encode(videos).codes)
    for i, video in enumerate(videos):
        assert torch.equal(tokenizer.encode([video]).codes[0], batch.codes[i])
    decoded = tokenizer.decode(batch).media
    for i, codes in enumerate(batch.items()):
        assert np.array_equal(tokenizer.decode([codes]).media[0], decoded[i])


def test_save_load_equality(tokenizer, videos, tmp_path):
    tokenizer.save_pretrained(tmp_path / "video")
    loaded = load_tokenizer(tmp_path / "video")
    assert isinstance(loaded, CausalVideoTokenizer) and loaded.get_config() == tokenizer.get_config()
    encoded = tokenizer.encode(videos)
    assert torch.equal(loaded.encode(videos).codes, encoded.codes)
    for ours, theirs in zip(tokenizer.decode(encoded).media, loaded.decode(encoded).media, strict=True):
        assert np.array_equal(ours, theirs)


@pytest.mark.parametrize(
    "codes",
    [
        np.full((192, 1), 9999),  # out of range
        np.arange(-5, 187).reshape(192, 1),  # negative ids
        np.zeros((100, 1), dtype=np.int64),  # too short
        np.zeros((500,), dtype=np.int64),  # too long, flat
        np.zeros((192, 3), dtype=np.int64),  # extra levels
        np.zeros((0,), dtype=np.int64),  # empty
        np.full((192, 1), np.nan),  # not numbers
        np.array(["a", "b"]),  # not numbers at all
    ],
)
def test_malformed_codes_decode_to_video_with_a_flag(tokenizer, codes):
    decoded = tokenizer.decode([codes])
    assert decoded.media[0].shape == (9, 64, 64, 3) and decoded.media[0].dtype == np.uint8
    assert decoded.flags[0]


def test_prepare_resamples_frames_and_resizes(tokenizer):
    """17 frames of 32x48 -> 9 frames at uniform times (first and last kept) of 64x64."""
    clip = np.zeros((17, 32, 48, 3), dtype=np.uint8)
    clip[:, :, :, 0] = np.arange(17, dtype=np.uint8)[:, None, None] * 10  # frame t is red level 10 t
    prepared = tokenizer.prepare(clip)
    assert prepared.shape == (9, 64, 64, 3)
    assert prepared[:, 32, 32, 0].tolist() == [0, 20, 40, 60, 80, 100, 120, 140, 160]
    short = tokenizer.prepare(np.zeros((2, 64, 64, 3), dtype=np.uint8))
    assert short.shape == (9, 64, 64, 3)
    assert tokenizer.encode([clip]).codes.shape == (1, 192, 1)


def write_mp4_with_pyav(path: Path, frames: np.ndarray) -> None:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=10, options={"crf": "10"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def test_user_mp4_is_read_and_encoded(tokenizer, tmp_path):
    """An MP4 of another length and size: read with PyAV, then resampled and resized by `prepare`."""
    clip = render_video(sample_motion(random.Random(3)), num_frames=12, size=48)
    write_mp4_with_pyav(tmp_path / "clip.mp4", clip)
    frames = media.read_video(tmp_path / "clip.mp4")
    assert frames.shape == (12, 48, 48, 3)
    assert np.abs(frames.astype(int) - clip).mean() < 8  # lossy, but the same clip
    encoded = tokenizer.encode([frames])
    assert encoded.codes.shape == (1, 192, 1)
    assert tokenizer.decode(encoded).media[0].shape == (9, 64, 64, 3)


@pytest.mark.parametrize(
    ("item", "problem"),
    [
        (np.zeros((64, 64, 3), dtype=np.uint8), "shape"),  # an image, not a video
        (np.zeros((9, 64, 64, 4), dtype=np.uint8), "channels"),
        (np.zeros((9, 64, 64, 3), dtype=np.float32), "dtype"),
        (np.zeros((0, 64, 64, 3), dtype=np.uint8), "no frames"),
    ],
)
def test_bad_input_raises_media_error_naming_the_item(tokenizer, item, problem):
    with pytest.raises(MediaError, match=rf"item 1: .*{problem}"):
        tokenizer.encode([np.zeros((9, 64, 64, 3), dtype=np.uint8), item])


def test_bad_config_raises_config_error():
    with pytest.raises(ConfigError, match="num_frames"):
        CausalVideoTokenizer(num_frames=8, **TINY)
    with pytest.raises(ConfigError, match="channels"):
        CausalVideoTokenizer(channels=[8, 12, 16])  # 12 is not a multiple of GroupNorm's 8 groups


def test_a_few_training_steps_reduce_the_loss():
    config = TokenizerTrainConfig(
        tokenizer="video-causal3d",
        config=TINY,
        data=DataConfig(num_items=16, seed=0),
        train=OptimConfig(steps=15, batch_size=4, lr=1e-2, warmup_steps=1, log_every=100),
    )
    batch_items = [toy_media("video", 4, seed=5)[i] for i in range(4)]
    torch.manual_seed(config.seed)  # train_tokenizer seeds the same way, so it starts from this model
    untrained = load_tokenizer("video-causal3d", **TINY)
    trained = train_tokenizer(config, show_progress=False).tokenizer
    with torch.no_grad():
        before = untrained.training_loss(untrained.collate(batch_items))[0]
        after = trained.training_loss(trained.collate(batch_items))[0]
    assert float(after) < 0.75 * float(before)


# ---------------------------------------------------------------- per-frame


def test_per_frame_codes_each_frame_with_the_image_tokenizer(image_dir, videos):
    per_frame = load_tokenizer("video-per-frame", image_tokenizer=str(image_dir))
    image = load_tokenizer(image_dir)
    assert per_frame.grid == (9, 8, 8) and per_frame.codebook_size == image.codebook_size
    assert per_frame.tokens_per_item == 9 * 64
    encoded = per_frame.encode(videos[:2])
    assert encoded.codes.shape == (2, 9 * 64, 1)
    frame_codes = image.encode(list(videos[1])).codes  # (9, 64, 1)
    assert torch.equal(encoded.codes[1], frame_codes.reshape(-1, 1))
    decoded = per_frame.decode(encoded)
    assert decoded.flags == ["", ""] and decoded.media[1].shape == (9, 64, 64, 3)
    assert np.array_equal(decoded.media[1][4], image.decode([frame_codes[4].numpy()]).media[0])
    single = per_frame.encode([videos[1]]).codes[0]
    assert torch.equal(single, encoded.codes[1])


def test_per_frame_saved_tokenizer_is_self_contained(image_dir, videos, tmp_path):
    per_frame = load_tokenizer("video-per-frame", image_tokenizer=str(image_dir), num_frames=5)
    per_frame.save_pretrained(tmp_path / "per_frame")
    moved = tmp_path / "moved_image"
    image_dir.rename(moved)  # the original image tokenizer is gone from its path
    try:
        loaded = load_tokenizer(tmp_path / "per_frame")
    finally:
        moved.rename(image_dir)
    assert isinstance(loaded, PerFrameVideoTokenizer) and loaded.grid == (5, 8, 8)
    encoded = per_frame.encode(videos)
    assert encoded.codes.shape == (3, 5 * 64, 1)  # 9 frames resampled to 5
    assert torch.equal(loaded.encode(videos).codes, encoded.codes)
    for ours, theirs in zip(per_frame.decode(encoded).media, loaded.decode(encoded).media, strict=True):
        assert np.array_equal(ours, theirs)


def test_per_frame_from_a_registry_name_and_its_errors(videos):
    torch.manual_seed(2)
    per_frame = PerFrameVideoTokenizer("image-conv", TINY_IMAGE, num_frames=3)
    decoded = per_frame.decode([np.full((10,), 7777)])
    assert decoded.media[0].shape == (3, 64, 64, 3) and decoded.flags[0]
    assert per_frame.prepare(np.zeros((7, 32, 32, 3), dtype=np.uint8)).shape == (3, 64, 64, 3)
    with pytest.raises(MediaError, match="item 0"):
        per_frame.encode([np.zeros((64, 64, 3), dtype=np.uint8)])
    with pytest.raises(ConfigError, match="not an image"):
        PerFrameVideoTokenizer("video-causal3d", TINY)
    with pytest.raises(ConfigError, match="nothing to train"):
        train_tokenizer(TokenizerTrainConfig(tokenizer="video-per-frame", config={"image_config": TINY_IMAGE}))
