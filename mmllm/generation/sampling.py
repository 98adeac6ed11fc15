"""Per-modality sampling settings and the batched sampler that applies them.

Each row of a batch may sit in a different modality (one row writing text while another draws
an image), so the settings are gathered per row from a small table indexed by the row's
modality: text usually wants a low temperature, image codes a higher one with top-k (LlamaGen
and Emu3 sample image tokens at temperature 1 with top-k), speech codes something between.

Order of operations, as in transformers' logits processors: repetition penalty, temperature,
top-k, top-p, then a categorical draw; a temperature of 0 means greedy (argmax), which is
deterministic whatever the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmllm.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """How one modality's tokens are drawn. `temperature=0` is greedy decoding."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut
    repetition_penalty: float = 1.0  # CTRL's penalty (Keskar et al. 2019): >1 discourages repeats

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def parse_sampling(spec: str, base: SamplingParams | None = None) -> SamplingParams:
    """`temperature=0.7,top_k=50` (the CLI's syntax) over `base`."""
    values = {
        "temperature": (base or SamplingParams()).temperature,
        "top_k": (base or SamplingParams()).top_k,
        "top_p": (base or SamplingParams()).top_p,
        "repetition_penalty": (base or SamplingParams()).repetition_penalty,
    }
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in values:
            raise ConfigError(f"sampling option {item!r}: expected one of {', '.join(values)} as key=value")
        try:
            values[key] = int(value) if key == "top_k" else float(value)
        except ValueError:
            raise ConfigError(f"sampling option {item!r}: {value!r} is not a number") from None
    return SamplingParams(**values)


class BatchSampler:
    """Draws the next token of every row with the settings of the row's current modality.

    `params[i]` are the settings of modality index i (0 is text; see `ModalityStates`).
    `seen` (B, V) marks the ids each row has produced or been prompted with, for the
    repetition penalty; the caller keeps it up to date with `mark`.
    """

    def __init__(self, params: list[SamplingParams], device: torch.device, seed: int | None) -> None:
        self.params = params
        self.temperature = torch.tensor([p.temperature for p in params], device=device)
        self.top_k = torch.tensor([p.top_k for p in params], device=device)
        self.top_p = torch.tensor([p.top_p for p in params], device=device)
        self.penalty = torch.tensor([p.repetition_penalty for p in params], device=device)
        self.any_penalty = any(p.repetition_penalty != 1.0 for p in params)
        self.all_greedy = all(p.greedy for p in params)
        self.generator = torch.Generator(device=device)
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()

    def sample(self, logits: Tensor, modality: Tensor, seen: Tensor | None) -> Tensor:
        """Next ids (B,) from masked logits (B, V) (disallowed ids already at -inf)."""
        logits = logits.float()
        if self.any_penalty and seen is not None:
            penalty = self.penalty[modality][:, None]
            penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits = torch.where(seen & (penalty != 1.0), penalised, logits)
        greedy_ids = logits.argmax(dim=-1)
        if self.all_greedy:
            return greedy_ids
        temperature = self.temperature[modality]
        greedy = temperature == 0
        scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
        scaled = self._cut(scaled, self.top_k[modality], self.top_p[modality])
        probs = torch.softmax(scaled, dim=-1)
        drawn = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
        return torch.where(greedy, greedy_ids, drawn)

    @staticmethod
    def _cut(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
        """Per-row top-k then top-p (nucleus) filtering; the best id always survives."""
        if not bool((top_k > 0).any() or (top_p < 1).any()):
            return logits
        ordered, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(logits.shape[-1], device=logits.device)[None]
        drop = (top_k[:, None] > 0) & (rank >= top_k[:, None])
        probs = torch.softmax(ordered.masked_fill(drop, float("-inf")), dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the better-ranked ids
        drop |= mass_before >= top_p[:, None]
        drop[:, 0] = False
        return logits.scatter(1, order, ordered.masked_fill(drop, float("-inf")))
