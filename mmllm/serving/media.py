"""Media in requests and replies: data: URIs to arrays and back, and what a URL may point at.

Requests carry media inline, as OpenAI's clients send them: `data:<type>;base64,<payload>` URIs
in `image_url` (and our `video_url`) parts, raw base64 in `input_audio`. The server never
fetches a URL or reads a file on a request's behalf: an `http(s)://` URL is always refused
(there is no network at run time), and `file://` URLs and bare paths are refused unless the
server was started with `--allow-local-media`, which lets it read files of the machine it runs
on. Sizes are checked from headers before decoding, so a small compressed file cannot expand
into gigabytes.

Replies carry media as PNG (images), WAV (audio, 16-bit PCM), GIF (video) data URIs or base64.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image

from mmllm.data.media import GIF_FRAME_MS, PIL_ERRORS, check_frames, decode_media
from mmllm.errors import MediaError

# data: URI media types each modality accepts, and the file format each names.
MEDIA_TYPES: dict[str, dict[str, str]] = {
    "image": {
        "image/png": "png",
        "image/jpeg": "jpg",
        "image/jpg": "jpg",
        "image/webp": "webp",
        "image/bmp": "bmp",
        "image/gif": "gif",  # an image input reads the first frame
    },
    "audio": {
        "audio/wav": "wav",
        "audio/x-wav": "wav",
        "audio/wave": "wav",
        "audio/vnd.wave": "wav",
        "audio/flac": "flac",
        "audio/x-flac": "flac",
        "audio/ogg": "ogg",
        "audio/mpeg": "mp3",
        "audio/mp3": "mp3",
    },
    # MP4/WebM are not taken: their decoded size cannot be bounded from a header before decoding.
    "video": {"image/gif": "gif", "application/x-npy": "npy"},
    "action": {"application/json": "json", "application/x-npy": "npy"},
}
AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")  # `input_audio.format` values (OpenAI's are wav and mp3)
# Decoded-size caps, checked from headers before decoding: far above what any tokenizer takes
# (the toy world's images are 64x64, its clips 9 frames, its speech 2 s), far below what would
# strain a server's memory.
MAX_IMAGE_PIXELS = 4096 * 4096  # 48 MiB as RGB
MAX_VIDEO_PIXELS = 64 * 1024 * 1024  # frames x height x width: 192 MiB as RGB
MAX_AUDIO_SECONDS = 600.0  # 10 minutes: 110 MiB as float32 at 48 kHz


class MediaURLError(MediaError):
    """A media URL the server will not open (remote, or local while local media are off)."""

    code = "invalid_url"


@dataclass(frozen=True)
class MediaPolicy:
    """Where request media may come from: inline data always, local files only when allowed."""

    allow_local: bool = False
    max_bytes: int = 16 * 1024 * 1024  # a local file may be as large as a request body may be


def parse_data_uri(uri: str, where: str) -> tuple[str, bytes]:
    """(media type, payload bytes) of a `data:` URI; base64 payloads are decoded strictly."""
    if not uri[:5].lower() == "data:":
        raise MediaError(f"{where}: not a data: URI")
    header, sep, payload = uri[5:].partition(",")
    if not sep:
        raise MediaError(f"{where}: malformed data: URI (no ',' before the payload)")
    params = [p.strip().lower() for p in header.split(";")]
    mime = params[0] or "text/plain"
    if "base64" in params[1:]:
        return mime, decode_base64(payload, where)
    return mime, urllib.parse.unquote_to_bytes(payload)


def decode_base64(payload: str, where: str) -> bytes:
    """Bytes of standard base64 (padding required, no stray characters), else MediaError."""
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise MediaError(f"{where}: invalid base64 ({err})") from None


def load_url(url: str, modality: str, policy: MediaPolicy, where: str, sample_rate: int) -> np.ndarray:
    """The medium a request's URL names, decoded in its modality's convention (see mmllm.data.media)."""
    scheme = urllib.parse.urlsplit(url).scheme.lower() if ":" in url else ""
    if len(scheme) == 1:  # a Windows drive letter, C:\..., is a path
        scheme = ""
    if scheme == "data":
        mime, data = parse_data_uri(url, where)
        formats = MEDIA_TYPES[modality]
        if mime not in formats:
            raise MediaError(f"{where}: a {modality} must be one of {', '.join(formats)}, got {mime}")
        return decode_bytes(modality, data, formats[mime], where, sample_rate)
    if scheme in ("http", "https"):
        raise MediaURLError(f"{where}: the server does not fetch URLs; send the {modality} inline as a data: URI")
    if scheme not in ("", "file"):
        raise MediaURLError(f"{where}: unsupported URL scheme {scheme!r}; send the {modality} as a data: URI")
    if not policy.allow_local:
        raise MediaURLError(
            f"{where}: local files are not read unless the server runs with --allow-local-media; "
            "send the media inline as a data: URI"
        )
    path = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path) if scheme == "file" else url)
    try:
        if path.stat().st_size > policy.max_bytes:
            raise MediaError(f"{where}: {path} is larger than {policy.max_bytes} bytes")
        data = path.read_bytes()
    except OSError as err:  # missing, a folder, unreadable
        raise MediaError(f"{where}: cannot read {path} ({err.strerror or err})") from None
    return decode_bytes(modality, data, path.suffix.lstrip(".").lower(), where, sample_rate)


def decode_bytes(modality: str, data: bytes, format: str, where: str, sample_rate: int) -> np.ndarray:
    """One medium from an encoded file's bytes, after checking its decoded size from its header."""
    if modality in ("image", "video") and format != "npy":
        _check_pixels(data, where, MAX_IMAGE_PIXELS if modality == "image" else MAX_VIDEO_PIXELS, modality == "video")
    if modality == "audio":
        _check_duration(data, where)
    return decode_media(modality, data, format, where, sample_rate)


def _check_pixels(data: bytes, where: str, limit: int, all_frames: bool) -> None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = image.width * image.height * (getattr(image, "n_frames", 1) if all_frames else 1)
    except PIL_ERRORS as err:
        raise MediaError(f"{where}: not a readable image ({err})") from None
    if pixels > limit:
        raise MediaError(f"{where}: {pixels} pixels is more than the {limit} this server decodes")


def _check_duration(data: bytes, where: str) -> None:
    try:
        info = soundfile.info(io.BytesIO(data))
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise MediaError(f"{where}: not a readable audio file ({err})") from None
    if info.duration > MAX_AUDIO_SECONDS:
        raise MediaError(f"{where}: {info.duration:.0f} s of audio is more than the {MAX_AUDIO_SECONDS:.0f} s allowed")


# ---------------------------------------------------------------- replies


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(check_frames(image, "image", ndim=3)).save(buffer, format="PNG")
    return buffer.getvalue()


def wav_bytes(wave: np.ndarray, sample_rate: int) -> bytes:
    """Mono float samples as a 16-bit PCM WAV file."""
    buffer = io.BytesIO()
    soundfile.write(buffer, np.clip(np.asarray(wave, dtype=np.float32), -1.0, 1.0), sample_rate, "PCM_16", format="WAV")
    return buffer.getvalue()


def gif_bytes(frames: np.ndarray) -> bytes:
    """uint8 (T, H, W, 3) frames as a looping GIF, at mmllm.data.media's frame duration."""
    # Fast-octree palettes: ~10x faster than Pillow's default median cut on a reply's frames, and
    # exact for the toy world's flat colours.
    frames = check_frames(frames, "video", ndim=4)
    images = [Image.fromarray(frame).quantize(256, method=Image.Quantize.FASTOCTREE) for frame in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=GIF_FRAME_MS, loop=0)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{b64(data)}"
