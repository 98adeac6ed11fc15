"""Media I/O: round trips, documented conversions, one-line MediaErrors on bad files, and the JSONL reader."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from mmllm.data import interleaved, media
from mmllm.data.toyworld import Motion, Shape, render_image, render_video, sample_scene, speak
from mmllm.errors import InputError, MediaError


@pytest.fixture()
def image() -> np.ndarray:
    return render_image(sample_scene(random.Random(0), 2))


@pytest.fixture()
def clip() -> np.ndarray:
    return render_video(Motion(Shape("square", "yellow", "large", 1, 0), "right"))


def truncate(path: Path, fraction: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def assert_one_line_error(err: pytest.ExceptionInfo, path: Path) -> None:
    message = str(err.value)
    assert message.startswith(f"{path}:") and "\n" not in message


# ---------------------------------------------------------------- images


def test_png_round_trip_is_exact(tmp_path, image):
    media.write_image(tmp_path / "a.png", image)
    assert np.array_equal(media.read_image(tmp_path / "a.png"), image)


def test_images_of_other_modes_become_rgb(tmp_path, image):
    Image.fromarray(image[..., 0]).save(tmp_path / "gray.png")
    gray = media.read_image(tmp_path / "gray.png")
    assert gray.shape == (64, 64, 3) and np.array_equal(gray[..., 1], image[..., 0])
    rgba = np.concatenate([image, np.full((64, 64, 1), 255, np.uint8)], axis=2)
    rgba[:32, :, 3] = 0  # top half transparent: composited onto black
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    read = media.read_image(tmp_path / "rgba.png")
    assert not read[:32].any() and np.array_equal(read[32:], image[32:])
    Image.fromarray(image).convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(tmp_path / "palette.png")
    assert np.array_equal(media.read_image(tmp_path / "palette.png"), image)  # a toy image has <= 8 colours
    Image.fromarray(image).save(tmp_path / "a.jpg", quality=95)
    assert np.abs(media.read_image(tmp_path / "a.jpg").astype(int) - image).mean() < 8


def test_corrupt_images_raise_one_line_media_errors(tmp_path, image):
    media.write_image(tmp_path / "a.png", image)
    with pytest.raises(MediaError, match="truncated") as err:
        media.read_image(truncate(tmp_path / "a.png"))
    assert_one_line_error(err, tmp_path / "a.png")
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    with pytest.raises(MediaError) as err:
        media.read_image(tmp_path / "junk.png")
    assert_one_line_error(err, tmp_path / "junk.png")
    with pytest.raises(MediaError, match="no such file"):
        media.read_image(tmp_path / "missing.png")


def test_writers_reject_wrong_channel_counts_and_dtypes(tmp_path, image):
    with pytest.raises(MediaError, match=r"\(H, W, 3\)"):
        media.write_image(tmp_path / "a.png", np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(MediaError, match="uint8"):
        media.write_image(tmp_path / "a.png", image.astype(np.float32))
    with pytest.raises(MediaError, match=r"\(T, H, W, 3\)"):
        media.write_video(tmp_path / "v.npy", np.zeros((9, 8, 8, 1), np.uint8))


def test_resize_image(image):
    assert media.resize_image(image, (64, 64)) is image
    small = media.resize_image(image, (32, 48))
    assert small.shape == (32, 48, 3) and small.dtype == np.uint8
    with pytest.raises(MediaError):
        media.resize_image(np.zeros((8, 8)), (4, 4))


# ---------------------------------------------------------------- audio


def test_wav_and_flac_round_trip_at_16_bit(tmp_path):
    wave = speak("a red circle")
    for name in ("a.wav", "a.flac"):
        media.write_audio(tmp_path / name, wave, 16000)
        read, rate = media.read_audio(tmp_path / name)
        assert rate == 16000 and read.dtype == np.float32
        assert np.abs(read - wave).max() <= 1 / 32768 + 1e-7  # 16-bit PCM quantisation
    assert soundfile.info(tmp_path / "a.wav").subtype == "PCM_16"


def test_stereo_is_averaged_and_audio_is_resampled(tmp_path):
    left, right = np.full(1600, 0.5, np.float32), np.full(1600, -0.1, np.float32)
    soundfile.write(tmp_path / "stereo.wav", np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    mono, _ = media.read_audio(tmp_path / "stereo.wav")
    assert mono.shape == (1600,) and np.allclose(mono, 0.2)
    down, rate = media.read_audio(tmp_path / "stereo.wav", sample_rate=8000)
    assert rate == 8000 and down.shape == (800,)
    tone = np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000).astype(np.float32)
    resampled = media.resample_audio(tone, 16000, 8000)
    spectrum = np.abs(np.fft.rfft(resampled))
    assert resampled.shape == (8000,) and np.argmax(spectrum) == 1000  # 1 Hz bins at 8 kHz over 1 s
    assert media.read_media("audio", tmp_path / "stereo.wav").shape == (1600,)  # 16 kHz by default


def test_truncated_and_corrupt_audio_raise_media_errors(tmp_path):
    media.write_audio(tmp_path / "a.wav", speak("a red circle"), 16000)
    with pytest.raises(MediaError, match="truncated WAV") as err:
        media.read_audio(truncate(tmp_path / "a.wav"))
    assert_one_line_error(err, tmp_path / "a.wav")
    media.write_audio(tmp_path / "b.wav", speak("red"), 16000)
    with pytest.raises(MediaError) as err:
        media.read_audio(truncate(tmp_path / "b.wav", 0.01))  # cut inside the header
    assert_one_line_error(err, tmp_path / "b.wav")
    (tmp_path / "junk.flac").write_bytes(b"fLaC but not really")
    with pytest.raises(MediaError) as err:
        media.read_audio(tmp_path / "junk.flac")
    assert_one_line_error(err, tmp_path / "junk.flac")
    with pytest.raises(MediaError, match="mono"):
        media.write_audio(tmp_path / "c.wav", np.zeros((10, 2)), 16000)


# ---------------------------------------------------------------- video


def test_npy_and_gif_round_trips_are_exact(tmp_path, clip):
    for name in ("v.npy", "v.gif"):
        media.write_video(tmp_path / name, clip)
        assert np.array_equal(media.read_video(tmp_path / name), clip)


def test_mp4_and_webm_via_pyav(tmp_path, clip):
    for name in ("v.mp4", "v.webm"):
        media.write_video(tmp_path / name, clip)
        read = media.read_video(tmp_path / name)
        assert read.shape == clip.shape and read.dtype == np.uint8
        assert np.abs(read.astype(int) - clip).mean() < 3  # lossy, but near-lossless on flat toy frames
    with pytest.raises(MediaError, match="even"):
        media.write_video(tmp_path / "odd.mp4", np.zeros((2, 63, 64, 3), np.uint8))


def test_corrupt_videos_raise_media_errors(tmp_path, clip):
    media.write_video(tmp_path / "v.mp4", clip)
    with pytest.raises(MediaError) as err:
        media.read_video(truncate(tmp_path / "v.mp4"))
    assert_one_line_error(err, tmp_path / "v.mp4")
    bad_arrays = {
        "float.npy": clip.astype(np.float32),
        "rgba.npy": np.zeros((9, 8, 8, 4), np.uint8),
        "image.npy": clip[0],
        "objects.npy": np.array([clip, None], dtype=object),
    }
    for name, array in bad_arrays.items():
        np.save(tmp_path / name, array, allow_pickle=True)
        with pytest.raises(MediaError) as err:
            media.read_video(tmp_path / name)
        assert_one_line_error(err, tmp_path / name)
    np.save(tmp_path / "cut.npy", clip)
    with pytest.raises(MediaError):
        media.read_video(truncate(tmp_path / "cut.npy"))
    (tmp_path / "junk.gif").write_bytes(b"GIF89a junk")
    with pytest.raises(MediaError):
        media.read_video(tmp_path / "junk.gif")


# ---------------------------------------------------------------- actions and dispatch


def test_actions_round_trip_and_bad_actions_raise(tmp_path):
    actions = np.linspace(-1, 1, 20, dtype=np.float32).reshape(10, 2)
    for name in ("a.json", "a.npy"):
        media.write_action(tmp_path / name, actions)
        assert np.allclose(media.read_media("action", tmp_path / name), actions)
    for name, text in {"ragged.json": "[[1, 2], [3]]", "nan.json": "[[NaN, 0]]", "flat.json": "[1, 2]"}.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(MediaError) as err:
            media.read_action(tmp_path / name)
        assert_one_line_error(err, tmp_path / name)
    (tmp_path / "broken.json").write_text("[[1, 2],")
    with pytest.raises(MediaError, match="JSON"):
        media.read_action(tmp_path / "broken.json")


def test_read_media_dispatches_by_modality(tmp_path, image, clip):
    media.write_media("image", tmp_path / "i.png", image)
    media.write_media("video", tmp_path / "v.npy", clip)
    assert np.array_equal(media.read_media("image", tmp_path / "i.png"), image)
    assert np.array_equal(media.read_media("video", tmp_path / "v.npy"), clip)
    with pytest.raises(MediaError, match="unknown modality"):
        media.read_media("smell", tmp_path / "i.png")
    with pytest.raises(MediaError, match="unknown video format"):
        media.read_video(tmp_path / "i.png")


# ---------------------------------------------------------------- interleaved JSONL

GOOD = {
    "id": "r1",
    "task": "demo",
    "messages": [
        {"role": "user", "content": [{"type": "image", "path": "i.png"}, {"type": "text", "text": "what?"}]},
        {"role": "assistant", "content": [{"type": "action", "values": [[0.1, 0.2]]}]},
    ],
    "meta": {"answer": "x"},
}


def write_lines(path: Path, records: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n\n")
    return path


def test_read_jsonl_yields_valid_records_and_loads_parts(tmp_path, image):
    media.write_image(tmp_path / "i.png", image)
    document = {"id": "d1", "task": "doc", "messages": [{"role": "document", "content": "plain text"}]}
    coded = {**GOOD, "id": "r2", "messages": [{"role": "user", "content": [{"type": "image", "codes": [[1], [2]]}]}]}
    path = write_lines(tmp_path / "data.jsonl", [GOOD, document, coded])
    records = list(interleaved.read_jsonl(path, check_media=True))
    assert [r["id"] for r in records] == ["r1", "d1", "r2"]
    parts = records[0]["messages"][0]["content"] + records[0]["messages"][1]["content"]
    assert np.array_equal(interleaved.load_part(parts[0], tmp_path), image)
    assert interleaved.load_part(parts[2], tmp_path).shape == (1, 2)
    assert interleaved.load_part(records[2]["messages"][0]["content"][0], tmp_path).dtype == np.int64


BAD = {
    "not JSON": "{nope",
    "must be a JSON object": "[1, 2]",
    "'id' must be": {**GOOD, "id": ""},
    "'messages' must be": {**GOOD, "messages": []},
    "needs a 'role'": {**GOOD, "messages": [{"role": "robot", "content": "hi"}]},
    "only message": {**GOOD, "messages": [{"role": "document", "content": "a"}, {"role": "user", "content": "b"}]},
    "unknown part type": {**GOOD, "messages": [{"role": "user", "content": [{"type": "img", "path": "i.png"}]}]},
    "exactly one of": {**GOOD, "messages": [{"role": "user", "content": [{"type": "image"}]}]},
    "inline 'values' are for action": {
        **GOOD,
        "messages": [{"role": "user", "content": [{"type": "image", "values": [[1]]}]}],
    },
    "must stay inside": {**GOOD, "messages": [{"role": "user", "content": [{"type": "audio", "path": "../x.wav"}]}]},
    "NaN": {**GOOD, "messages": [{"role": "user", "content": [{"type": "action", "values": [[float("nan")]]}]}]},
    "integers": {**GOOD, "messages": [{"role": "user", "content": [{"type": "video", "codes": [[0.5]]}]}]},
    "does not exist": {**GOOD, "id": "r9"},
}


@pytest.mark.parametrize("problem", list(BAD))
def test_read_jsonl_names_file_and_line_of_a_malformed_record(tmp_path, problem, image):
    media.write_image(tmp_path / "present.png", image)
    good = {**GOOD, "messages": [{"role": "user", "content": [{"type": "image", "path": "present.png"}]}]}
    path = write_lines(tmp_path / "data.jsonl", [good, "", BAD[problem]])  # the bad record sits on line 3
    with pytest.raises(InputError, match=problem) as err:
        list(interleaved.read_jsonl(path, check_media=True))
    assert str(err.value).startswith(f"{path}:3: ") and "\n" not in str(err.value)


def test_read_jsonl_rejects_duplicate_ids(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [GOOD, GOOD])
    with pytest.raises(InputError, match=r":2: duplicate id"):
        list(interleaved.read_jsonl(path))
