"""Reading and writing media files in the conventions every modality tokenizer takes.

    image   uint8 (H, W, 3)        PNG, JPEG, ... via Pillow
    audio   float32 (samples,)     WAV, FLAC, OGG via soundfile, mono, with its sample rate
    video   uint8 (T, H, W, 3)     .npy (lossless, the toy world's format), .gif via Pillow,
                                   .mp4 / .webm / .mov / .mkv via PyAV
    action  float32 (steps, dims)  .json (a list of steps, each a list of numbers) or .npy

Conversions are part of the convention, not errors: grayscale, palette and 16-bit images become
RGB; an alpha channel is composited onto black (the toy world's background), so a transparent
pixel reads as background; multi-channel audio is averaged to mono; audio is resampled with
`scipy.signal.resample_poly` when a rate is asked for. Anything that cannot be read, is
truncated, or has the wrong shape or dtype raises `MediaError("<path>: <problem>")`, one line,
so a batch job can log it and go on.

`decode_media` reads the same formats from an encoded file's bytes held in memory (a parquet cell,
a tar member), with the same checks; its errors name the item instead of a path.
"""

from __future__ import annotations

import io
import json
import math
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile
from PIL import Image, ImageSequence, UnidentifiedImageError
from scipy.signal import resample_poly

from mmllm.errors import MediaError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
VIDEO_SUFFIXES = (".npy", ".gif", ".mp4", ".webm", ".mov", ".mkv")
ACTION_SUFFIXES = (".json", ".npy")
MEDIA_SUFFIXES = {"image": IMAGE_SUFFIXES, "audio": AUDIO_SUFFIXES, "video": VIDEO_SUFFIXES, "action": ACTION_SUFFIXES}
DEFAULT_AUDIO_RATE = 16000  # what `read_media("audio", ...)` returns: the toy speech rate
GIF_FRAME_MS = 100  # GIF frame duration: 10 frames/s, slow enough to follow a toy motion by eye
MP4_FPS = 10  # frame rate written into MP4/WebM files
MP4_CRF = 10  # x264 constant-rate factor: near-lossless for flat toy frames (0 is lossless, 23 the default)
PIL_ERRORS = (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError)


def _fail(path: str | Path, problem: str) -> MediaError:
    return MediaError(f"{path}: {problem.splitlines()[0] if problem else 'unreadable'}")


def _open(path: str | Path) -> BinaryIO:
    """The file for reading, or MediaError when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "no such file")
    return path.open("rb")


def check_frames(array: np.ndarray, where: str | Path, ndim: int) -> np.ndarray:
    """`array` as uint8 with `ndim` dims and 3 channels last ((H, W, 3) or (T, H, W, 3)), else MediaError."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise _fail(where, f"expected uint8 pixels, got {array.dtype}")
    if array.ndim != ndim or array.shape[-1] != 3 or 0 in array.shape:
        layout = "(H, W, 3)" if ndim == 3 else "(T, H, W, 3)"
        raise _fail(where, f"expected {layout} RGB, got shape {array.shape}")
    return array


# ---------------------------------------------------------------- images


def to_rgb(image: Image.Image) -> np.ndarray:
    """A Pillow image as uint8 (H, W, 3): alpha composited onto black, other modes converted."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint16)
        return (rgba[..., :3] * rgba[..., 3:] // 255).astype(np.uint8)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: keep the top 8 bits
        wide = np.asarray(image, dtype=np.int64)
        gray = (np.clip(wide, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def read_image(path: str | Path) -> np.ndarray:
    """uint8 (H, W, 3) from any format Pillow reads."""
    with _open(path) as file:
        return _decode_image(file, path)


def _decode_image(file: BinaryIO, where: str | Path) -> np.ndarray:
    try:
        with Image.open(file) as image:
            image.load()
            return to_rgb(image)
    except PIL_ERRORS as err:
        raise _fail(where, f"not a readable image ({err})") from err


def write_image(path: str | Path, array: np.ndarray) -> None:
    """Save uint8 (H, W, 3) in the format the suffix names (PNG is lossless)."""
    array = check_frames(array, path, ndim=3)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def resize_image(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (h, w, 3) resampled to `size` = (h, w): bicubic, or a no-op when the size already fits."""
    array = check_frames(array, "image", ndim=3)
    height, width = size
    if array.shape[:2] == (height, width):
        return array
    return np.asarray(Image.fromarray(array).resize((width, height), Image.Resampling.BICUBIC), dtype=np.uint8)


# ---------------------------------------------------------------- audio


def _check_wav_length(f: BinaryIO, where: str | Path) -> None:
    """A WAV whose data chunk claims more bytes than the file holds is truncated (libsndfile would
    silently read the part that is there)."""
    file_size = f.seek(0, io.SEEK_END)
    f.seek(0)
    header = f.read(12)
    if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
        return  # not RIFF/WAVE: leave it to libsndfile to accept or reject
    offset = 12
    while offset + 8 <= file_size:
        f.seek(offset)
        chunk_id, chunk_size = struct.unpack("<4sI", f.read(8))
        if chunk_id == b"data":
            if offset + 8 + chunk_size > file_size and chunk_size != 0xFFFFFFFF:  # 0xFFFFFFFF: streamed, unknown
                raise _fail(where, f"truncated WAV: data chunk holds {file_size - offset - 8} of {chunk_size} bytes")
            return
        offset += 8 + chunk_size + (chunk_size & 1)  # chunks are padded to even sizes
    raise _fail(where, "truncated WAV: no data chunk")


def read_audio(path: str | Path, sample_rate: int | None = None) -> tuple[np.ndarray, int]:
    """float32 mono samples and their rate; channels are averaged, and resampled when `sample_rate` is given."""
    with _open(path) as file:
        return _decode_audio(file, Path(path).suffix.lower(), path, sample_rate)


def _decode_audio(file: BinaryIO, suffix: str, where: str | Path, sample_rate: int | None) -> tuple[np.ndarray, int]:
    if suffix == ".wav":
        _check_wav_length(file, where)
        file.seek(0)
    try:
        data, rate = soundfile.read(file, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise _fail(where, f"not a readable audio file ({err})") from err
    if data.shape[0] == 0:
        raise _fail(where, "no audio samples")
    wave = data.mean(axis=1, dtype=np.float32)
    if not np.isfinite(wave).all():
        raise _fail(where, "audio holds NaN or infinite samples")
    if sample_rate is not None and sample_rate != rate:
        wave, rate = resample_audio(wave, rate, sample_rate), sample_rate
    return wave, int(rate)


def write_audio(path: str | Path, wave: np.ndarray, sample_rate: int) -> None:
    """Save mono float samples in [-1, 1] as 16-bit PCM (WAV) or FLAC, by the suffix."""
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1 or wave.size == 0:
        raise _fail(path, f"expected mono samples (n,), got shape {wave.shape}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    subtype = "PCM_16" if Path(path).suffix.lower() in (".wav", ".flac") else None
    soundfile.write(path, np.clip(wave, -1.0, 1.0), sample_rate, subtype=subtype)


def resample_audio(wave: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """float32 samples at `to_rate`, by polyphase filtering with the smallest up/down ratio."""
    wave = np.asarray(wave, dtype=np.float32)
    if from_rate <= 0 or to_rate <= 0:
        raise MediaError(f"resample {from_rate} Hz -> {to_rate} Hz: rates must be positive")
    if from_rate == to_rate:
        return wave
    common = math.gcd(int(from_rate), int(to_rate))
    return resample_poly(wave, int(to_rate) // common, int(from_rate) // common).astype(np.float32)


# ---------------------------------------------------------------- video


def _read_npy(file: BinaryIO, where: str | Path) -> np.ndarray:
    try:
        return np.load(file, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise _fail(where, f"not a readable .npy array ({err})") from err


def _read_gif(file: BinaryIO, where: str | Path) -> np.ndarray:
    try:
        with Image.open(file) as image:
            frames = [to_rgb(frame.copy()) for frame in ImageSequence.Iterator(image)]
    except PIL_ERRORS as err:
        raise _fail(where, f"not a readable GIF ({err})") from err
    return np.stack(frames)


def _read_av(file: BinaryIO, where: str | Path) -> np.ndarray:
    import av  # PyAV loads FFmpeg's libraries: import it only when a container file is read

    try:
        with av.open(file) as container:
            if not container.streams.video:
                raise _fail(where, "no video stream")
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except av.FFmpegError as err:
        raise _fail(where, f"not a readable video ({err})") from err
    if not frames:
        raise _fail(where, "no decodable video frames (truncated?)")
    if len({frame.shape for frame in frames}) > 1:
        raise _fail(where, "frames of different sizes")
    return np.stack(frames)


def read_video(path: str | Path) -> np.ndarray:
    """uint8 (T, H, W, 3) from .npy (validated, no pickle), .gif, or an FFmpeg container (.mp4, .webm, ...)."""
    with _open(path) as file:
        return _decode_video(file, Path(path).suffix.lower(), path)


def _decode_video(file: BinaryIO, suffix: str, where: str | Path) -> np.ndarray:
    if suffix == ".npy":
        frames = _read_npy(file, where)
    elif suffix == ".gif":
        frames = _read_gif(file, where)
    elif suffix in VIDEO_SUFFIXES:
        frames = _read_av(file, where)
    else:
        raise _fail(where, f"unknown video format {suffix!r} ({', '.join(VIDEO_SUFFIXES)})")
    return check_frames(frames, where, ndim=4)


def write_video(path: str | Path, frames: np.ndarray) -> None:
    """Save uint8 (T, H, W, 3) as .npy (lossless), .gif (palette) or .mp4 / .webm (lossy, via PyAV)."""
    frames = check_frames(frames, path, ndim=4)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        np.save(path, frames, allow_pickle=False)
    elif suffix == ".gif":
        images = [Image.fromarray(frame) for frame in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=GIF_FRAME_MS, loop=0)
    elif suffix in (".mp4", ".webm", ".mov", ".mkv"):
        _write_av(path, frames)
    else:
        raise _fail(path, f"cannot write video as {suffix!r} (.npy, .gif, .mp4, .webm)")


def _write_av(path: Path, frames: np.ndarray) -> None:
    import av

    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise _fail(path, f"{frames.shape[2]}x{frames.shape[1]}: MP4/WebM (yuv420p) needs even width and height")
    if path.suffix.lower() == ".webm":
        codec, options = "libvpx-vp9", {"crf": str(MP4_CRF), "b": "0"}  # b=0: constant quality, as x264's crf
    else:
        codec, options = "libx264", {"crf": str(MP4_CRF)}
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=MP4_FPS, options=options)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


# ---------------------------------------------------------------- actions


def read_action(path: str | Path) -> np.ndarray:
    """float32 (steps, dims) from .json (list of steps) or .npy; values are returned as stored."""
    with _open(path) as file:
        return _decode_action(file, Path(path).suffix.lower(), path)


def _decode_action(file: BinaryIO, suffix: str, where: str | Path) -> np.ndarray:
    if suffix == ".npy":
        raw = _read_npy(file, where)
    elif suffix == ".json":
        try:
            raw = json.loads(file.read().decode("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise _fail(where, f"not readable JSON ({err})") from err
    else:
        raise _fail(where, f"unknown action format {suffix!r} (.json, .npy)")
    return check_actions(raw, where)


def check_actions(raw: object, where: str | Path) -> np.ndarray:
    """`raw` as float32 (steps, dims) of finite numbers, else MediaError."""
    try:
        actions = np.asarray(raw, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise _fail(where, f"actions must be a (steps, dims) array of numbers ({err})") from err
    if actions.ndim != 2 or 0 in actions.shape:
        raise _fail(where, f"expected actions (steps, dims), got shape {actions.shape}")
    if not np.isfinite(actions).all():
        raise _fail(where, "actions hold NaN or infinite values")
    return actions


def write_action(path: str | Path, actions: np.ndarray) -> None:
    """Save (steps, dims) actions as .json (nested lists) or .npy."""
    actions = check_actions(actions, path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(actions.tolist()) + "\n", encoding="utf-8")
    elif path.suffix.lower() == ".npy":
        np.save(path, actions, allow_pickle=False)
    else:
        raise _fail(path, f"cannot write actions as {path.suffix!r} (.json, .npy)")


# ---------------------------------------------------------------- dispatch


def read_media(modality: str, path: str | Path, sample_rate: int = DEFAULT_AUDIO_RATE) -> np.ndarray:
    """One medium in its modality's convention; audio is resampled to `sample_rate` (16 kHz by default)."""
    if modality not in MEDIA_SUFFIXES:
        raise MediaError(f"{path}: unknown modality {modality!r} (image, audio, video, action)")
    with _open(path) as file:
        return _decode(modality, file, Path(path).suffix.lower(), path, sample_rate)


def decode_media(
    modality: str, data: bytes, format: str, where: str, sample_rate: int = DEFAULT_AUDIO_RATE
) -> np.ndarray:
    """One medium from an encoded file's bytes held in memory, as `read_media` reads the file: `format`
    is the extension the file would have ("png", "wav", ...), and errors start with `where`."""
    if modality not in MEDIA_SUFFIXES:
        raise MediaError(f"{where}: unknown modality {modality!r} (image, audio, video, action)")
    return _decode(modality, io.BytesIO(data), f".{format.lower()}", where, sample_rate)


def _decode(modality: str, file: BinaryIO, suffix: str, where: str | Path, sample_rate: int) -> np.ndarray:
    if modality == "image":
        return _decode_image(file, where)
    if modality == "audio":
        return _decode_audio(file, suffix, where, sample_rate)[0]
    if modality == "video":
        return _decode_video(file, suffix, where)
    return _decode_action(file, suffix, where)


def write_media(modality: str, path: str | Path, item: np.ndarray, sample_rate: int = DEFAULT_AUDIO_RATE) -> None:
    """Save one medium by modality (audio at `sample_rate`)."""
    writers = {"image": write_image, "video": write_video, "action": write_action}
    if modality == "audio":
        write_audio(path, item, sample_rate)
    elif modality in writers:
        writers[modality](path, item)
    else:
        raise MediaError(f"{path}: unknown modality {modality!r} (image, audio, video, action)")
