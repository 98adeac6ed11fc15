"""The oracles read clean toy media back exactly (>= 99% on 500 items each) and refuse noise."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from mmllm.data import oracles
from mmllm.data.media import resample_audio
from mmllm.data.toyworld import (
    SPEECH_SAMPLE_RATE,
    SPEECH_VOCAB,
    Motion,
    Shape,
    canonical,
    render_image,
    render_video,
    sample_motion,
    sample_reach,
    sample_scene,
    sample_sentence,
    speak,
    target_xy,
    words,
)
from mmllm.errors import MediaError

N = 500  # items per accuracy test: a point of accuracy is then 5 items


def accuracy(hits: list[bool]) -> float:
    return sum(hits) / len(hits)


def test_image_oracle_is_exact_on_one_to_three_shape_scenes():
    rng = random.Random(11)
    scenes = [sample_scene(rng, 1 + i % 3) for i in range(N)]  # a third each of 1, 2 and 3 shapes
    hits = [oracles.read_image(render_image(scene)) == canonical(scene) for scene in scenes]
    assert accuracy(hits) >= 0.99
    assert accuracy(hits[1::3]) >= 0.99  # the two-shape scenes on their own


def test_image_oracle_tells_every_shape_size_and_colour_apart_in_every_cell():
    rng = random.Random(3)
    for shape in ("circle", "square", "triangle", "star"):
        for size in ("small", "large"):
            for color in ("red", "green", "blue", "yellow", "purple", "white"):
                cell = divmod(rng.randrange(9), 3)
                scene = (Shape(shape, color, size, *cell),)
                assert oracles.read_image(render_image(scene)) == scene


def test_image_oracle_survives_a_mild_blur_like_a_reconstruction():
    rng = random.Random(5)
    scenes = [sample_scene(rng, rng.choice((1, 2))) for _ in range(100)]
    blurred = [np.asarray(Image.fromarray(render_image(s)).filter(ImageFilter.GaussianBlur(1.0))) for s in scenes]
    hits = [oracles.read_image(image) == canonical(scene) for image, scene in zip(blurred, scenes, strict=True)]
    assert accuracy(hits) >= 0.95


def test_image_oracle_calls_noise_and_blank_unreadable():
    noise = np.random.default_rng(0)
    for _ in range(50):
        assert oracles.read_image(noise.integers(0, 256, (64, 64, 3), dtype=np.uint8)) is None
    speckle = (noise.random((64, 64)) < 0.3)[..., None] * np.array([255, 0, 0], dtype=np.uint8)  # one colour, sparse
    assert oracles.read_image(speckle) is None
    assert oracles.read_image(np.zeros((64, 64, 3), dtype=np.uint8)) is None
    assert oracles.read_image(np.zeros((32, 32, 3), dtype=np.uint8)) is None  # not a toy image's size


def test_speech_oracle_is_exact_on_sentences():
    rng = random.Random(12)
    sentences = [sample_sentence(rng) for _ in range(N)]
    hits = [oracles.read_speech(speak(s), SPEECH_SAMPLE_RATE) == tuple(words(s)) for s in sentences]
    assert accuracy(hits) >= 0.99


def test_speech_oracle_reads_every_word_and_8khz_speech():
    vocabulary = " ".join(SPEECH_VOCAB)
    assert oracles.read_speech(speak(vocabulary), SPEECH_SAMPLE_RATE) == SPEECH_VOCAB
    assert oracles.read_speech(speak(vocabulary, 8000), 8000) == SPEECH_VOCAB
    resampled = resample_audio(resample_audio(speak(vocabulary), 16000, 8000), 8000, 16000)  # an 8 kHz codec's path
    assert oracles.read_speech(resampled, SPEECH_SAMPLE_RATE) == SPEECH_VOCAB


def test_speech_oracle_tolerates_mild_noise():
    noise = np.random.default_rng(1)
    rng = random.Random(4)
    sentences = [sample_sentence(rng) for _ in range(50)]
    noisy = [speak(s) + noise.normal(0, 0.01, len(speak(s))).astype(np.float32) for s in sentences]  # ~30 dB SNR
    readings = [oracles.read_speech(wave, SPEECH_SAMPLE_RATE) for wave in noisy]
    assert readings == [tuple(words(s)) for s in sentences]


def test_speech_oracle_calls_noise_silence_and_low_rates_unreadable():
    noise = np.random.default_rng(2)
    for _ in range(50):
        wave = noise.normal(0, 0.3, noise.integers(1000, 40000)).astype(np.float32)
        assert oracles.read_speech(wave, SPEECH_SAMPLE_RATE) is None
    assert oracles.read_speech(np.zeros(16000, dtype=np.float32), SPEECH_SAMPLE_RATE) is None
    assert oracles.read_speech(speak("red"), 6000) is None  # under Nyquist for the top tone
    stretched = np.repeat(speak("a red circle"), 2)  # every word twice as long: not toy speech
    assert oracles.read_speech(stretched, SPEECH_SAMPLE_RATE) is None


def test_video_oracle_is_exact_on_motions():
    rng = random.Random(13)
    motions = [sample_motion(rng) for _ in range(N)]
    expected = [oracles.VideoReading(m.shape.shape, m.shape.color, m.direction) for m in motions]
    hits = [oracles.read_video(render_video(m)) == e for m, e in zip(motions, expected, strict=True)]
    assert accuracy(hits) >= 0.99


def test_video_oracle_reads_every_direction_from_every_start():
    for direction, start in (("left", 2), ("right", 0), ("up", 2), ("down", 0), ("still", 1)):
        motion = Motion(Shape("star", "purple", "small", start, start), direction)
        assert oracles.read_video(render_video(motion)) == oracles.VideoReading("star", "purple", direction)


def test_video_oracle_calls_noise_unreadable():
    noise = np.random.default_rng(3)
    for _ in range(20):
        assert oracles.read_video(noise.integers(0, 256, (9, 64, 64, 3), dtype=np.uint8)) is None
    assert oracles.read_video(np.zeros((9, 64, 64, 3), dtype=np.uint8)) is None
    two_colours = render_video(Motion(Shape("circle", "red", "large", 1, 1), "still"))
    two_colours[4:] = render_video(Motion(Shape("circle", "blue", "large", 1, 1), "still"))[4:]
    assert oracles.read_video(two_colours) is None


def test_action_oracle_lands_on_the_target():
    rng = random.Random(14)
    reaches = [sample_reach(rng) for _ in range(N)]
    errors = [oracles.reach_error(r.actions, target_xy(r.scene[r.target])) for r in reaches]
    assert accuracy([e < 0.01 for e in errors]) >= 0.99  # within 1% of the image width
    far = oracles.reach_error(np.zeros((10, 2), np.float32), (1.0, 0.0))
    assert far == pytest.approx(0.5)  # from the centre to the right edge: half the width


def test_read_action_sums_scaled_steps_and_rejects_wrong_shapes():
    steps = np.full((10, 2), 0.2, dtype=np.float32)
    assert oracles.read_action(steps) == pytest.approx((0.5, 0.5), abs=1e-6)  # 10 x 0.2 x MAX_STEP 0.25
    assert oracles.read_action(steps, start=(-0.5, 0.0)) == pytest.approx((0.0, 0.5), abs=1e-6)
    with pytest.raises(MediaError, match="expected"):
        oracles.read_action(np.zeros((10, 3)))
