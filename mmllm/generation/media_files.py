"""Saving a reply's media as files people open: PNG, WAV, GIF and action JSON."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mmllm.data import media as media_io
from mmllm.generation.prompts import OutputPart

MEDIA_SUFFIX = {"image": ".png", "audio": ".wav", "video": ".gif", "action": ".json"}


def save_reply_media(parts: Sequence[OutputPart], directory: Path, stem: str) -> list[Path]:
    """Write each decoded medium of a reply as `directory/<stem>-<k><suffix>`; returns the paths."""
    paths = []
    media = [p for p in parts if p.kind != "text" and p.media is not None]
    for k, part in enumerate(media):
        path = Path(directory) / f"{stem}-{k}{MEDIA_SUFFIX.get(part.kind, '.npy')}"
        media_io.write_media(part.kind, path, part.media, part.sample_rate or media_io.DEFAULT_AUDIO_RATE)
        paths.append(path)
    return paths
