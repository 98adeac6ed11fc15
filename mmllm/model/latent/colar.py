"""Compressed latent reasoning: CoLaR (Tan et al. 2025, "Think Silently, Think Fast: Dynamic Latent
Compression of LLM Reasoning Chains").

The chain of thought is compressed c-fold: every c consecutive chain-of-thought tokens become one
*compressed embedding*, the sum of their input embeddings scaled by 1/sqrt(group size) (so a merge
of c roughly independent embeddings keeps an embedding's norm; the last group may be shorter). A
latent span `<|bolt|> <|latent|> x ceil(len/c) <|eolt|>` holds one slot per compressed embedding.

The head is an MLP on the last hidden state that predicts a Gaussian over the next compressed
embedding (its mean and log standard deviation, as CoLaR's latent head predicts a distribution).

- Training (`colar` objective) is teacher-forced, as the paper's SFT: one forward with the gold
  compressed embeddings at the slots, the next-token loss on the text and answer after the span,
  and a latent loss on every slot, predicted from the position before it. c is drawn per batch
  from `compression_factors`.
- Decoding (`colar_generate`) feeds the predicted mean at each slot: `FeedbackLatent`'s feedback
  through the head (`projection`), batched and KV-cached by `latent_generate`.

The factor c conditions the model through a learned embedding added at `<|bolt|>` (CoLaR says c in
the prompt instead); it starts at zero, so an untrained head leaves the plain model unchanged.

Knobs (`ColarHead` arguments, saved with the head):

    compression_factors  the factors c drawn in training and allowed at inference
                         (default 1..5: the paper's training range)
    latent_loss          "nll": the Gaussian negative log-likelihood of the gold compressed
                         embedding (the paper's); "mse": squared error of the predicted mean
    max_latent_steps     the most latent slots a sequence may hold (base.py)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmllm.errors import ConfigError, InputError
from mmllm.generation.generator import GenerationConfig, Generator
from mmllm.model.hooks import TokenState
from mmllm.model.latent.base import DEFAULT_MAX_LATENT_STEPS, LatentHead, base_model, register_head, require_head_kind
from mmllm.model.latent.curriculum import align_latent_spans, unpack_documents
from mmllm.model.latent.generate import LatentOutput, latent_generate
from mmllm.model.loss import IGNORE_INDEX
from mmllm.training.objectives import ObjectiveOutput, register_objective, score_targets
from mmllm.vocab import VocabLayout

LatentLoss = Literal["nll", "mse"]
LATENT_LOSSES = ("nll", "mse")
DEFAULT_FACTORS = (1, 2, 3, 4, 5)  # CoLaR's training range of compression factors


class CompressedPredictor(nn.Module):
    """hidden -> (mean, log std) of the next compressed embedding: a two-layer MLP, as wide as the state."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.up = nn.Linear(hidden_size, hidden_size)
        self.down = nn.Linear(hidden_size, 2 * hidden_size)

    def distribution(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        mean, log_std = self.down(F.gelu(self.up(hidden))).chunk(2, dim=-1)
        return mean, log_std

    def forward(self, hidden: Tensor) -> Tensor:
        """The embedding fed at the next slot: the predicted mean."""
        return self.distribution(hidden)[0]


@register_head
class ColarHead(LatentHead):
    name = "colar"
    objective = "colar"

    def __init__(
        self,
        layout: VocabLayout,
        hidden_size: int,
        max_latent_steps: int = DEFAULT_MAX_LATENT_STEPS,
        compression_factors: Sequence[int] = DEFAULT_FACTORS,
        latent_loss: LatentLoss = "nll",
    ) -> None:
        factors = list(compression_factors)
        if not factors or any(not isinstance(c, int) or c < 1 for c in factors):
            raise ConfigError(f"latent head colar: compression_factors must be integers >= 1, got {factors}")
        if latent_loss not in LATENT_LOSSES:
            raise ConfigError(
                f"latent head colar: latent_loss must be one of {', '.join(LATENT_LOSSES)}, got {latent_loss!r}"
            )
        super().__init__(layout, hidden_size, max_latent_steps, CompressedPredictor(hidden_size))
        self.compression_factors = sorted(set(factors))
        self.latent_loss = latent_loss
        self.factor_embedding = nn.Embedding(max(factors) + 1, hidden_size)
        nn.init.zeros_(self.factor_embedding.weight)
        self.compression = self.compression_factors[0]  # the factor the next forwards run with (`use`)
        self.teacher: Tensor | None = None  # training: gold compressed embeddings (B, T, H) at the slots

    def options(self) -> dict[str, Any]:
        return {**super().options(), "compression_factors": self.compression_factors, "latent_loss": self.latent_loss}

    def use(self, compression: int) -> None:
        """Run the next forwards with compression factor `compression`; one of the head's factors."""
        if compression not in self.compression_factors:
            raise ConfigError(f"compression factor {compression}: the colar head takes {self.compression_factors}")
        self.compression = compression

    def on_embed(self, state: TokenState, cache) -> TokenState:
        begins = state.token_ids == self.begin_id
        if bool(begins.any()):
            factor = self.factor_embedding.weight[self.compression].to(state.hidden.dtype)
            state.hidden = state.hidden + begins[..., None].to(state.hidden.dtype) * factor
        if self.teacher is None:
            return super().on_embed(state, cache)
        slots = (state.token_ids == self.latent_id)[..., None]
        state.hidden = torch.where(slots, self.teacher.to(state.hidden.dtype), state.hidden)
        return state

    def slot_loss(self, hidden: Tensor, target: Tensor) -> Tensor:
        """Per-slot latent loss (N,) of states (N, H) predicting compressed embeddings (N, H), mean over H."""
        mean, log_std = self.projection.distribution(hidden)
        if self.latent_loss == "mse":
            return (mean - target).pow(2).mean(dim=-1)
        z = (target - mean) * torch.exp(-log_std)
        return (0.5 * z.pow(2) + log_std + 0.5 * math.log(2 * math.pi)).mean(dim=-1)


# ---------------------------------------------------------------- compression


def compress_span(ids: Tensor, begin_id: int, end_id: int, latent_id: int, compression: int) -> tuple[Tensor, list]:
    """`ids` (T,) with the tokens between its `<|bolt|>` and `<|eolt|>` replaced by ceil(n/c) latent
    slots, and for each slot the ids it merges (a document without a span comes back as it is)."""
    begins, ends = (ids == begin_id).nonzero().flatten(), (ids == end_id).nonzero().flatten()
    if len(begins) == 0 and len(ends) == 0:
        return ids, []
    if len(begins) != 1 or len(ends) != 1 or int(ends[0]) < int(begins[0]):
        raise InputError("a colar document needs one <|bolt|> ... <|eolt|> span holding its chain of thought")
    start, stop = int(begins[0]) + 1, int(ends[0])
    inside = ids[start:stop]
    if bool((inside == latent_id).any()):
        raise InputError("a colar span holds the chain-of-thought tokens (the objective compresses them), not slots")
    groups = list(inside.split(compression))
    slots = torch.full((len(groups),), latent_id, dtype=ids.dtype, device=ids.device)
    return torch.cat([ids[:start], slots, ids[stop:]]), groups


def compressed_embeddings(embed: nn.Embedding, groups: Sequence[Tensor]) -> Tensor:
    """One compressed embedding per group of ids: their embeddings' sum / sqrt(group size); (N, H)."""
    return torch.stack([embed(g).sum(dim=0) / math.sqrt(len(g)) for g in groups])


def require_colar_head(model) -> ColarHead:
    return require_head_kind(model, ColarHead)


@register_objective("colar")
def colar(model, batch: dict[str, Tensor], modality_names: tuple[str, ...]) -> ObjectiveOutput:
    """Next-token loss on the text around the spans plus CoLaR's latent loss on every slot, the
    spans compressed with a factor drawn for the batch and teacher-forced in one forward."""
    head = require_colar_head(model)
    compression = head.compression_factors[int(torch.randint(len(head.compression_factors), ()))]
    return colar_loss(model, head, batch, modality_names, compression)


def colar_loss(
    model, head: ColarHead, batch: dict[str, Tensor], modality_names: tuple[str, ...], compression: int
) -> ObjectiveOutput:
    """The `colar` objective at a given compression factor (what the objective draws)."""
    documents = unpack_documents(batch)
    if not documents:  # nothing to score: a zero that still reaches every trainable weight's hooks
        zero = model(input_ids=batch["input_ids"][:, :1]).logits.sum() * 0.0
        return ObjectiveOutput(zero, torch.zeros((), device=zero.device))
    embed = base_model(model).model.embed_tokens
    targets: list[Tensor] = []
    for document in documents:
        ids, groups = compress_span(document["input_ids"], head.begin_id, head.end_id, head.latent_id, compression)
        outside = _outside(document, head)
        for name in ("labels", "loss_weights", "modality"):  # the span's tokens leave; its slots carry no label
            fill = IGNORE_INDEX if name == "labels" else 0
            document[name] = _place(document[name][outside], ids, head.latent_id, fill)
        document["input_ids"] = ids
        if groups:
            with torch.no_grad():
                targets.append(compressed_embeddings(embed, groups))
    rows = align_latent_spans(documents, head.latent_id, base_model(model).layout.pad_id)
    head.check_steps(rows.latent_steps)
    slots = rows.input_ids == head.latent_id
    teacher = torch.zeros(*rows.input_ids.shape, head.hidden_size, device=rows.input_ids.device)
    if targets:
        teacher[slots] = torch.cat(targets).to(teacher.dtype)
    head.use(compression)
    head.teacher = teacher
    try:
        out = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask)
    finally:
        head.teacher = None
    labels = rows.labels.masked_fill(slots, IGNORE_INDEX)
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    z_loss = getattr(base_model(model).config, "z_loss", 0.0)
    text = score_targets(out.logits, shifted, rows.loss_weights, rows.modality, modality_names, z_loss)
    before = F.pad(slots[:, 1:], (0, 1), value=False)  # each slot is predicted from the position before it
    latent = head.slot_loss(out.state.hidden[before], teacher[slots].to(out.state.hidden.dtype))
    count = latent.new_tensor(float(latent.numel()))
    sums = {**text.sums, "loss/latent": latent.sum().detach(), "loss/latent_tokens": count}
    return ObjectiveOutput(text.loss_sum + latent.sum(), text.tokens + count, sums)


def _outside(document: dict[str, Tensor], head: ColarHead) -> Tensor:
    """Which tokens of the document lie outside its span's interior."""
    ids = document["input_ids"]
    inside = torch.zeros_like(ids, dtype=torch.bool)
    begins, ends = (ids == head.begin_id).nonzero().flatten(), (ids == head.end_id).nonzero().flatten()
    if len(begins) and len(ends):
        inside[int(begins[0]) + 1 : int(ends[0])] = True
    return ~inside


def _place(column: Tensor, ids: Tensor, latent_id: int, fill) -> Tensor:
    """`column` (the values outside the span) spread over `ids`, `fill` at the latent slots."""
    out = torch.full(ids.shape, fill, dtype=column.dtype, device=column.device)
    out[ids != latent_id] = column
    return out


# ---------------------------------------------------------------- decoding


def colar_generate(
    model,
    prompts: Sequence[Sequence[int]],
    latent_steps: int | Sequence[int],
    compression: int,
    config: GenerationConfig | None = None,
    generator: Generator | None = None,
) -> list[LatentOutput]:
    """`latent_generate` with a colar head at compression factor `compression`: each slot is fed
    the head's predicted compressed embedding."""
    require_colar_head(model).use(compression)
    return latent_generate(model, prompts, latent_steps, config, generator)
