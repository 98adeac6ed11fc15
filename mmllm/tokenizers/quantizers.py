"""Quantizers shared by every learned tokenizer: latent vectors in, integer codes out.

All quantizers are channels-last: `z` is (..., dim) with any leading dims, and they share one
surface (`Quantizer`): `forward` gives the quantized latent (straight-through gradient to `z`),
the codes (..., levels) and an auxiliary loss; `encode`/`decode` map latents to codes and back;
`usage` reports codebook usage and perplexity. `levels` is the number of codes per position (1,
or the depth / group count of residual and factorised quantizers); every level has its own
codebook of `codebook_size` entries.

Kinds, built from a JSON-able spec by `build_quantizer(dim, spec)`:

    vq          VectorQuantizer         VQ-VAE with an EMA codebook, k-means init, dead-code restart
    fsq         FiniteScalarQuantizer   Mentzer et al. 2023: bounded channels rounded to L_i values
    lfq         LookupFreeQuantizer     MAGVIT-v2: one bit per channel by sign, entropy penalty
    rvq, rfsq   ResidualQuantizer       SoundStream residual VQ; residual FSQ with per-level scales
    factorized  FactorizedQuantizer     UniTok / FQGAN multi-codebook VQ: one codebook per group

A spec is JSON, e.g. {"kind": "fsq", "bins": [8, 8, 8]} (512 codes), {"kind": "rfsq", "bins":
[4, 4, 4, 4], "depth": 2} (2 levels of 256) or {"kind": "vq", "codebook_size": 512,
"codebook_dim": 16}, so tokenizer configs that hold one stay JSON.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmllm.errors import ConfigError


@dataclass
class QuantizerOutput:
    """What a quantizer's forward pass gives."""

    quantized: Tensor  # (..., dim), straight-through gradient to z
    codes: Tensor  # (..., levels) int64
    loss: Tensor  # scalar: commitment / codebook / entropy terms (0 for FSQ)


class Quantizer(nn.Module, ABC):
    """Base class: channels-last latents (..., dim) to codes (..., levels) in [0, codebook_size)."""

    dim: int
    codebook_size: int
    levels: int = 1

    @abstractmethod
    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize latents (..., dim); in training mode a learned codebook also updates."""

    @abstractmethod
    def encode(self, z: Tensor) -> Tensor:
        """Codes (..., levels) int64 of latents (..., dim); never updates the codebook."""

    @abstractmethod
    def decode(self, codes: Tensor) -> Tensor:
        """Quantized latents (..., dim) of codes (..., levels); codes are assumed in range."""

    @torch.no_grad()
    def usage(self, codes: Tensor) -> dict[str, float]:
        """Codebook usage (fraction of entries used) and perplexity (exp of the code entropy).

        Both are averaged over levels, each level counted against its own codebook; negative
        codes (levels dropped by quantizer dropout) are not counted.
        """
        flat = codes.reshape(-1, codes.shape[-1])
        used, perplexity = [], []
        for level in flat.unbind(-1):
            level = level[level >= 0]
            counts = torch.bincount(level, minlength=self.codebook_size).double()
            probs = counts / counts.sum().clamp(min=1)
            entropy = -(probs * probs.clamp(min=1e-30).log()).sum()  # 1e-30: log(0) guard, 0*log 0 = 0
            used.append((counts > 0).double().mean())
            perplexity.append(entropy.exp())
        return {"usage": float(torch.stack(used).mean()), "perplexity": float(torch.stack(perplexity).mean())}


def round_straight_through(x: Tensor) -> Tensor:
    """Round to integers in the forward pass, identity gradient in the backward pass."""
    return x + (x.round() - x).detach()


def check_bins(bins: Any) -> None:
    """FSQ's L_i per channel must be a non-empty list of integers >= 2."""
    if not isinstance(bins, list | tuple) or not bins or not all(isinstance(b, int) and b >= 2 for b in bins):
        raise ConfigError(f"fsq quantizer: bins must be a non-empty list of integers >= 2, got {bins!r}")


class FiniteScalarQuantizer(Quantizer):
    """FSQ (Mentzer et al. 2023): bound each channel to L_i values, round, code = mixed-radix index.

    Channel i is bounded by tanh scaled to half_l = (L_i - 1) / 2, so rounding gives the L_i
    integers -(L_i - 1) / 2 .. (L_i - 1) / 2; for even L_i a half-step shift (output offset 0.5,
    input shift atanh(offset / half_l), which keeps 0 at 0) gives -L_i / 2 .. L_i / 2 - 1 instead.
    Rounding has a straight-through gradient; the integers are normalised to [-1, 1] by L_i // 2.
    There is no codebook to learn and no auxiliary loss. Linear projections in and out exist only
    when `dim != len(bins)`.
    """

    def __init__(self, dim: int, bins: list[int] | tuple[int, ...]):
        super().__init__()
        check_bins(bins)
        self.dim = dim
        self.bins = list(bins)
        self.codebook_size = math.prod(self.bins)
        levels_per_channel = torch.tensor(self.bins, dtype=torch.float64)
        half_l = (levels_per_channel - 1) * (1 - 1e-3) / 2  # 1e-3: the paper's margin inside the outer cells
        offset = torch.where(levels_per_channel % 2 == 0, 0.5, 0.0)
        self.register_buffer("half_l", half_l.float(), persistent=False)
        self.register_buffer("offset", offset.float(), persistent=False)
        self.register_buffer("shift", torch.atanh(offset / half_l).float(), persistent=False)
        self.register_buffer("half_width", (levels_per_channel // 2).float(), persistent=False)
        radix = torch.cumprod(torch.tensor([1, *self.bins[:-1]], dtype=torch.int64), dim=0)
        self.register_buffer("radix", radix, persistent=False)
        self.register_buffer("bins_tensor", torch.tensor(self.bins, dtype=torch.int64), persistent=False)
        needs_projection = dim != len(self.bins)
        self.project_in = nn.Linear(dim, len(self.bins)) if needs_projection else nn.Identity()
        self.project_out = nn.Linear(len(self.bins), dim) if needs_projection else nn.Identity()

    def bound(self, z: Tensor) -> Tensor:
        """Squash each channel into the range whose rounding gives exactly L_i integers."""
        return torch.tanh(z + self.shift) * self.half_l - self.offset

    def normalised_values(self, z: Tensor) -> Tensor:
        """Projected latents (..., len(bins)) to quantized values in [-1, 1], straight-through."""
        return round_straight_through(self.bound(z)) / self.half_width

    def values_to_codes(self, values: Tensor) -> Tensor:
        """Quantized values in [-1, 1] (..., len(bins)) to mixed-radix code indexes (...)."""
        digits = (values * self.half_width + self.half_width).round().long()
        return (digits * self.radix).sum(-1)

    def codes_to_values(self, codes: Tensor) -> Tensor:
        """Mixed-radix code indexes (...) to quantized values in [-1, 1] (..., len(bins))."""
        digits = (codes.long().unsqueeze(-1) // self.radix) % self.bins_tensor
        return (digits.float() - self.half_width) / self.half_width

    def forward(self, z: Tensor) -> QuantizerOutput:
        values = self.normalised_values(self.project_in(z))
        codes = self.values_to_codes(values.detach()).unsqueeze(-1)
        return QuantizerOutput(self.project_out(values).to(z.dtype), codes, z.new_zeros(()))

    @torch.no_grad()
    def encode(self, z: Tensor) -> Tensor:
        return self.values_to_codes(self.normalised_values(self.project_in(z))).unsqueeze(-1)

    def decode(self, codes: Tensor) -> Tensor:
        return self.project_out(self.codes_to_values(codes.squeeze(-1)))


class VectorQuantizer(Quantizer):
    """VQ-VAE nearest-neighbour quantizer with an EMA codebook (van den Oord et al. 2017, Razavi et al. 2019).

    The codebook is a buffer moved by exponential moving averages, not by gradients: each training
    step, a code's EMA assignment count (`cluster_size`) and EMA sum of assigned latents decay by
    `decay`; the code is the sum over the Laplace-smoothed count (`epsilon` per code), so rarely
    used codes never divide by zero. The encoder learns through the straight-through estimator and
    the commitment loss `commitment_weight * |z - sg(code)|^2` (beta in the paper).

    Knobs against codebook collapse:
      kmeans_init          the codebook is set by `kmeans_iters` Lloyd iterations on the first
                           training batch (otherwise it starts as standard normal vectors);
      dead_code_threshold  after each update, codes whose EMA count of assignments per batch is
                           below this are re-seeded from random latents of the current batch
                           (Jukebox / SoundStream restart); 0 turns restarts off;
      codebook_dim         factorised codes (ViT-VQGAN, Yu et al. 2021): latents are projected to
                           this width and l2-normalised, the codebook is unit vectors, and the code
                           is projected back to `dim`; lookup is by cosine similarity.

    Nothing changes in eval mode, so eval is deterministic.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int = 512,
        codebook_dim: int | None = None,
        commitment_weight: float = 0.25,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        dead_code_threshold: float = 1.0,
    ):
        super().__init__()
        if codebook_size < 2 or (codebook_dim is not None and codebook_dim < 1):
            raise ConfigError(
                f"vq quantizer: need codebook_size >= 2 and codebook_dim >= 1, got {codebook_size}, {codebook_dim}"
            )
        if not 0.0 <= decay < 1.0 or epsilon <= 0 or dead_code_threshold < 0 or kmeans_iters < 0:
            raise ConfigError(
                "vq quantizer: need 0 <= decay < 1, epsilon > 0, dead_code_threshold >= 0, kmeans_iters >= 0"
            )
        self.dim = dim
        self.codebook_size = codebook_size
        self.normalized = codebook_dim is not None
        self.lookup_dim = dim if codebook_dim is None else codebook_dim
        self.commitment_weight = commitment_weight
        self.decay = decay
        self.epsilon = epsilon
        self.kmeans_iters = kmeans_iters
        self.dead_code_threshold = dead_code_threshold
        needs_projection = self.lookup_dim != dim
        self.project_in = nn.Linear(dim, self.lookup_dim) if needs_projection else nn.Identity()
        self.project_out = nn.Linear(self.lookup_dim, dim) if needs_projection else nn.Identity()
        embed = self._unit(torch.randn(codebook_size, self.lookup_dim))
        self.register_buffer("embed", embed)
        # One assignment per code, so embed = embed_sum / cluster_size holds before any update.
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("embed_sum", embed.clone())
        self.register_buffer("initialized", torch.tensor(not kmeans_init))

    def _unit(self, vectors: Tensor) -> Tensor:
        return F.normalize(vectors, dim=-1) if self.normalized else vectors

    def _lookup_space(self, z: Tensor) -> Tensor:
        return self._unit(self.project_in(z))

    @staticmethod
    def _nearest(flat: Tensor, codebook: Tensor) -> Tensor:
        distances = codebook.pow(2).sum(1) - 2 * flat @ codebook.t()  # |x|^2 is the same for every code
        return distances.argmin(1)

    def _statistics(self, flat: Tensor, codes: Tensor) -> tuple[Tensor, Tensor]:
        counts = torch.bincount(codes, minlength=self.codebook_size).to(flat.dtype)
        sums = torch.zeros(self.codebook_size, flat.shape[1], dtype=flat.dtype, device=flat.device)
        return counts, sums.index_add_(0, codes, flat)

    @torch.no_grad()
    def _initialize(self, flat: Tensor) -> None:
        """Lloyd's k-means on the first training batch; empty clusters keep their seed point."""
        picks = torch.randint(len(flat), (self.codebook_size,), device=flat.device)
        if len(flat) >= self.codebook_size:
            picks = torch.randperm(len(flat), device=flat.device)[: self.codebook_size]
        centres = flat[picks].clone()
        for _ in range(self.kmeans_iters):
            counts, sums = self._statistics(flat, self._nearest(flat, centres))
            means = sums / counts.clamp(min=1).unsqueeze(1)
            centres = self._unit(torch.where(counts.unsqueeze(1) > 0, means, centres))
        counts, _ = self._statistics(flat, self._nearest(flat, centres))
        self.embed.copy_(centres)
        self.cluster_size.copy_(counts)
        self.embed_sum.copy_(centres * counts.unsqueeze(1))
        self.initialized.fill_(True)

    @torch.no_grad()
    def _update(self, flat: Tensor, codes: Tensor) -> None:
        """EMA step on counts and sums, Laplace-smoothed division, then dead-code restart."""
        counts, sums = self._statistics(flat, codes)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.epsilon) / (total + self.codebook_size * self.epsilon) * total
        self.embed.copy_(self._unit(self.embed_sum / smoothed.unsqueeze(1)))
        if self.dead_code_threshold <= 0:
            return
        dead = self.cluster_size < self.dead_code_threshold
        num_dead = int(dead.sum())
        if num_dead:
            seeds = flat[torch.randint(len(flat), (num_dead,), device=flat.device)]
            self.embed[dead] = seeds
            self.cluster_size[dead] = self.dead_code_threshold
            self.embed_sum[dead] = seeds * self.dead_code_threshold

    def forward(self, z: Tensor) -> QuantizerOutput:
        x = self._lookup_space(z)
        flat = x.reshape(-1, self.lookup_dim).detach().to(self.embed.dtype)
        if self.training and not bool(self.initialized):
            self._initialize(flat)
        codes = self._nearest(flat, self.embed)
        chosen = self.embed[codes].view(x.shape).to(x.dtype)  # indexing copies, so the update below keeps it
        if self.training:
            self._update(flat, codes)
        loss = self.commitment_weight * F.mse_loss(x, chosen)
        quantized = x + (chosen - x).detach()
        return QuantizerOutput(self.project_out(quantized), codes.view(*x.shape[:-1], 1), loss)

    @torch.no_grad()
    def encode(self, z: Tensor) -> Tensor:
        x = self._lookup_space(z)
        codes = self._nearest(x.reshape(-1, self.lookup_dim).to(self.embed.dtype), self.embed)
        return codes.view(*x.shape[:-1], 1)

    def decode(self, codes: Tensor) -> Tensor:
        return self.project_out(self.embed[codes.squeeze(-1).long()])


class LookupFreeQuantizer(Quantizer):
    """LFQ (MAGVIT-v2, Yu et al. 2023): one bit per channel by sign, code = binary index.

    Each of the `bits` channels becomes -scale or +scale (straight-through), and the code is
    sum_i [z_i > 0] 2^i, so the codebook has 2^bits entries and nothing to learn. The auxiliary
    loss is MAGVIT-v2's entropy penalty, `entropy_weight * (H_sample - diversity_weight * H_batch)`:
    with code probabilities softmax(2 z.c / temperature) over the whole implicit codebook, low
    per-sample entropy makes assignments confident and high entropy of the batch-averaged
    distribution spreads them over the codebook; plus `commitment_weight * |z - sg(q)|^2`.
    There are no parameters at all when `dim == bits`; otherwise linear projections in and out.
    """

    def __init__(
        self,
        dim: int,
        bits: int,
        scale: float = 1.0,
        entropy_weight: float = 0.1,
        diversity_weight: float = 1.0,
        commitment_weight: float = 0.25,
        temperature: float = 0.01,
    ):
        super().__init__()
        if not 1 <= bits <= 16 or scale <= 0 or temperature <= 0:  # 16: the penalty enumerates all 2^bits codes
            raise ConfigError(f"lfq quantizer: need 1 <= bits <= 16, scale > 0, temperature > 0, got bits={bits}")
        self.dim = dim
        self.bits = bits
        self.codebook_size = 2**bits
        self.scale = scale
        self.entropy_weight = entropy_weight
        self.diversity_weight = diversity_weight
        self.commitment_weight = commitment_weight
        self.temperature = temperature
        self.register_buffer("powers", 2 ** torch.arange(bits), persistent=False)
        self.register_buffer("codebook", self._code_values(torch.arange(self.codebook_size)), persistent=False)
        needs_projection = dim != bits
        self.project_in = nn.Linear(dim, bits) if needs_projection else nn.Identity()
        self.project_out = nn.Linear(bits, dim) if needs_projection else nn.Identity()

    def _code_values(self, codes: Tensor) -> Tensor:
        set_bits = (codes.long().unsqueeze(-1) // self.powers) % 2
        return (set_bits.float() * 2 - 1) * self.scale

    def _codes(self, x: Tensor) -> Tensor:
        return ((x > 0).long() * self.powers).sum(-1, keepdim=True)

    def entropy_penalty(self, x: Tensor) -> Tensor:
        """Mean per-sample code entropy minus `diversity_weight` times the batch-averaged code entropy."""
        logits = 2 * x.reshape(-1, self.bits).float() @ self.codebook.t() / self.temperature
        log_probs = logits.log_softmax(-1)
        probs = log_probs.exp()
        sample_entropy = -(probs * log_probs).sum(-1).mean()
        mean_probs = probs.mean(0)
        batch_entropy = -(mean_probs * mean_probs.clamp(min=1e-30).log()).sum()  # 1e-30: log(0) guard
        return sample_entropy - self.diversity_weight * batch_entropy

    def forward(self, z: Tensor) -> QuantizerOutput:
        x = self.project_in(z)
        signs = torch.where(x > 0, self.scale, -self.scale).to(x.dtype)
        loss = self.entropy_weight * self.entropy_penalty(x) + self.commitment_weight * F.mse_loss(x, signs)
        quantized = x + (signs - x).detach()
        return QuantizerOutput(self.project_out(quantized), self._codes(x.detach()), loss)

    @torch.no_grad()
    def encode(self, z: Tensor) -> Tensor:
        return self._codes(self.project_in(z))

    def decode(self, codes: Tensor) -> Tensor:
        return self.project_out(self._code_values(codes.squeeze(-1)))


class ResidualQuantizer(Quantizer):
    """Residual quantization over `depth` levels: each level codes what the previous ones missed.

    kind "rvq": SoundStream / EnCodec residual VQ; every level is a `VectorQuantizer(dim, ...)`
    built from the remaining keywords (codebook_size, commitment_weight, decay, ...).
    kind "rfsq": residual FSQ (as in lucidrains' ResidualFSQ); every level is an FSQ with `bins`.
    Level 0 is plain FSQ of the latent; the levels' sum approximates the FSQ-bounded latent
    (`residual_target`), and level l quantizes the remaining residual divided by its scale
    (L_i - 1)^-l per channel: half a rounding step is 1 / (L_i - 1) of a level's half-range, so
    the scaled residual fills the next level's range. Projections in/out only when `dim != len(bins)`.

    Codes are (..., depth); `decode` sums the levels and accepts the first k <= depth levels
    (coarser reconstruction). `quantizer_dropout` (SoundStream): during training, with this
    probability a batch uses only the first n ~ Uniform{1..depth} levels, so the model also
    reconstructs from prefixes; dropped levels get code -1 and no loss.
    """

    def __init__(self, dim: int, kind: str, depth: int = 2, quantizer_dropout: float = 0.0, **level_keywords: Any):
        super().__init__()
        if kind not in ("rvq", "rfsq") or depth < 1 or not 0.0 <= quantizer_dropout <= 1.0:
            raise ConfigError(f"{kind} quantizer: need kind rvq|rfsq, depth >= 1, 0 <= quantizer_dropout <= 1")
        self.dim = dim
        self.kind = kind
        self.levels = depth
        self.quantizer_dropout = quantizer_dropout
        if kind == "rvq":
            width = dim
            quantizers = [VectorQuantizer(dim, **level_keywords) for _ in range(depth)]
            scales = torch.ones(depth, 1)
        else:
            check_bins(level_keywords.get("bins"))
            width = len(level_keywords["bins"])
            quantizers = [FiniteScalarQuantizer(width, **level_keywords) for _ in range(depth)]
            steps = torch.tensor(quantizers[0].bins, dtype=torch.float64) - 1
            scales = (steps ** -torch.arange(depth, dtype=torch.float64).unsqueeze(1)).float()
        self.quantizers = nn.ModuleList(quantizers)
        self.codebook_size = quantizers[0].codebook_size
        self.register_buffer("scales", scales, persistent=False)
        self.project_in = nn.Linear(dim, width) if width != dim else nn.Identity()
        self.project_out = nn.Linear(width, dim) if width != dim else nn.Identity()

    def _levels_used(self) -> int:
        if self.training and self.quantizer_dropout > 0 and float(torch.rand(())) < self.quantizer_dropout:
            return int(torch.randint(1, self.levels + 1, ()))
        return self.levels

    def residual_target(self, x: Tensor) -> Tensor:
        """What the sum of the levels approximates: the projected latent for rvq; for rfsq the
        latent as bounded by FSQ, normalised to the code range (finite, so later levels converge)."""
        if self.kind == "rvq":
            return x
        first = self.quantizers[0]
        return first.bound(x) / first.half_width

    def forward(self, z: Tensor) -> QuantizerOutput:
        x = self.project_in(z)
        target = self.residual_target(x)
        residual, total = x, torch.zeros_like(x)
        codes, losses = [], []
        for quantizer, scale in zip(self.quantizers[: self._levels_used()], self.scales, strict=False):
            out = quantizer(residual / scale)
            total = total + out.quantized * scale
            residual = target - total  # no detach: the sum's gradient to x is then exactly the target's
            codes.append(out.codes)
            losses.append(out.loss)
        dropped = z.new_full((*z.shape[:-1], self.levels - len(codes)), -1, dtype=torch.long)
        return QuantizerOutput(self.project_out(total), torch.cat([*codes, dropped], -1), torch.stack(losses).sum())

    @torch.no_grad()
    def encode(self, z: Tensor) -> Tensor:
        x = self.project_in(z)
        target = self.residual_target(x)
        residual, total = x, torch.zeros_like(x)
        codes = []
        for quantizer, scale in zip(self.quantizers, self.scales, strict=True):
            level_codes = quantizer.encode(residual / scale)
            total = total + quantizer.decode(level_codes) * scale
            residual = target - total
            codes.append(level_codes)
        return torch.cat(codes, -1)

    def decode(self, codes: Tensor) -> Tensor:
        """Sum of the levels' codes; `codes` may hold only the first k <= depth levels."""
        levels = zip(self.quantizers, self.scales, codes.unbind(-1), strict=False)
        total = sum(quantizer.decode(level_codes.unsqueeze(-1)) * scale for quantizer, scale, level_codes in levels)
        return self.project_out(total)


class FactorizedQuantizer(Quantizer):
    """Multi-codebook / factorised VQ (UniTok, FQGAN): `groups` sub-vectors, one codebook each.

    The channels are split into `groups` equal chunks and each chunk is quantized by its own
    `VectorQuantizer(dim // groups, ...)` built from the remaining keywords, so a position gets
    `groups` codes of `codebook_size` each (an effective codebook of codebook_size^groups) while
    every sub-codebook stays small enough to be used well. The loss is the mean over groups.
    """

    def __init__(self, dim: int, groups: int = 2, **level_keywords: Any):
        super().__init__()
        if groups < 1 or dim % groups:
            raise ConfigError(f"factorized quantizer: groups={groups} must divide dim={dim}")
        self.dim = dim
        self.levels = groups
        self.quantizers = nn.ModuleList(VectorQuantizer(dim // groups, **level_keywords) for _ in range(groups))
        self.codebook_size = self.quantizers[0].codebook_size

    def forward(self, z: Tensor) -> QuantizerOutput:
        outs = [quantizer(chunk) for quantizer, chunk in zip(self.quantizers, z.chunk(self.levels, -1), strict=True)]
        return QuantizerOutput(
            torch.cat([out.quantized for out in outs], -1),
            torch.cat([out.codes for out in outs], -1),
            torch.stack([out.loss for out in outs]).mean(),
        )

    @torch.no_grad()
    def encode(self, z: Tensor) -> Tensor:
        chunks = z.chunk(self.levels, -1)
        return torch.cat(
            [quantizer.encode(chunk) for quantizer, chunk in zip(self.quantizers, chunks, strict=True)], -1
        )

    def decode(self, codes: Tensor) -> Tensor:
        return torch.cat([quantizer.decode(codes[..., i : i + 1]) for i, quantizer in enumerate(self.quantizers)], -1)


QUANTIZERS: dict[str, type[Quantizer]] = {
    "vq": VectorQuantizer,
    "fsq": FiniteScalarQuantizer,
    "lfq": LookupFreeQuantizer,
    "rvq": ResidualQuantizer,
    "rfsq": ResidualQuantizer,
    "factorized": FactorizedQuantizer,
}
LEVEL_QUANTIZERS: dict[str, type[Quantizer]] = {  # kinds built from per-level quantizers, and the level class
    "rvq": VectorQuantizer,
    "rfsq": FiniteScalarQuantizer,
    "factorized": VectorQuantizer,
}


def _keyword_parameters(cls: type[Quantizer]) -> dict[str, inspect.Parameter]:
    return {
        name: parameter
        for name, parameter in inspect.signature(cls).parameters.items()
        if name not in ("dim", "kind") and parameter.kind is not parameter.VAR_KEYWORD
    }


def build_quantizer(dim: int, spec: dict[str, Any]) -> Quantizer:
    """A quantizer from a JSON-able spec: {"kind": <one of QUANTIZERS>, **that class's keywords}.

    Residual and factorised kinds also take their level quantizer's keywords. An unknown kind, an
    unknown or missing keyword or a bad value raises a one-line ConfigError.
    """
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ConfigError(f"quantizer spec must be a mapping with a 'kind' key, got {spec!r}")
    kind = spec["kind"]
    if kind not in QUANTIZERS:
        raise ConfigError(f"unknown quantizer kind {kind!r}; expected one of {sorted(QUANTIZERS)}")
    keywords = {key: value for key, value in spec.items() if key != "kind"}
    parameters = _keyword_parameters(QUANTIZERS[kind])
    if kind in LEVEL_QUANTIZERS:
        parameters |= _keyword_parameters(LEVEL_QUANTIZERS[kind])
    unknown = sorted(set(keywords) - set(parameters))
    if unknown:
        raise ConfigError(f"{kind} quantizer: unknown keyword(s) {unknown}; accepted: {sorted(parameters)}")
    missing = sorted(name for name, parameter in parameters.items() if parameter.default is parameter.empty)
    missing = [name for name in missing if name not in keywords]
    if missing:
        raise ConfigError(f"{kind} quantizer: missing keyword(s) {missing}")
    if kind in ("rvq", "rfsq"):
        keywords["kind"] = kind
    return QUANTIZERS[kind](dim, **keywords)
