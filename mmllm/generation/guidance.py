"""Classifier-free guidance (Ho & Salimans 2022) for generated image, audio and video spans.

Training replaced a generation sample's conditioning text by one `<|null|>` token now and then
(`packing.drop_condition`), so the model knows both p(x | prompt) and p(x). At inference each
guided row gets a twin whose prompt has the same substitution; inside a guided span the next-
token logits are

    guided = cond + (scale - 1) * (cond - uncond)

which is LlamaGen's and Emu3's `uncond + scale * (cond - uncond)` written so that scale 1
returns the conditional logits bit for bit. Outside guided spans (text), the twin's logits are
ignored, and it is fed the same tokens as its row so both stay in step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mmllm.errors import ConfigError

GUIDED_MODALITIES = ("image", "audio", "video")  # what guidance steers; text and actions are never guided


@dataclass(frozen=True)
class Guidance:
    """Guidance scale per modality; a modality not listed is not guided.

    `mode` "batched" runs conditional and unconditional rows in one forward per step;
    "sequential" runs them as two forwards (the reference the benchmark compares against).
    """

    scales: Mapping[str, float] = field(default_factory=dict)
    mode: str = "batched"

    def __post_init__(self) -> None:
        for name, scale in self.scales.items():
            if name not in GUIDED_MODALITIES:
                raise ConfigError(f"guidance applies to {', '.join(GUIDED_MODALITIES)}, not {name!r}")
            if scale < 0:
                raise ConfigError(f"guidance scale for {name} must be >= 0, got {scale}")
        if self.mode not in ("batched", "sequential"):
            raise ConfigError(f"guidance mode must be 'batched' or 'sequential', got {self.mode!r}")

    @property
    def active(self) -> bool:
        return bool(self.scales)


def unconditional_prompt(ids: Sequence[int], condition: Sequence[bool], null_id: int) -> list[int]:
    """`ids` with each run of conditioning tokens replaced by one `null_id`, as training does."""
    out: list[int] = []
    previous = False
    for token, is_condition in zip(ids, condition, strict=True):
        if not is_condition:
            out.append(token)
        elif not previous:
            out.append(null_id)
        previous = is_condition
    return out


def guide(cond: Tensor, uncond: Tensor, scale: Tensor, guided: Tensor) -> Tensor:
    """Guided logits (B, V): rows with `guided` True get `cond + (scale - 1) (cond - uncond)`."""
    mixed = cond + (scale[:, None] - 1.0) * (cond - uncond)
    return torch.where(guided[:, None], mixed, cond)
