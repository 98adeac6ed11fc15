"""Latent visual tokens: Mirage (Yang et al. 2025, "Machine Mental Imagery: Empower Multimodal
Reasoning with Latent Visual Tokens").

Inside a latent span `<|bolt|> <|latent|> x k <|eolt|>`, each of the k slots is fed the last hidden
state of the position before it through a small projection (Coconut's feedback, coconut.py): the
model "thinks visually" in k latent visual tokens without emitting an image. Training has two stages
(the head's `stage` knob, read by the `mirage` objective):

- stage 1: the next-token loss on the text after the span, plus a distillation loss pulling the
  embedding fed at each slot (the projected state) toward a visual target: the codes of a helper
  image, cut into k consecutive groups, each group's code embeddings mean-pooled (`visual_targets`).
- stage 2: the next-token loss alone; the latent slots are free.

The helper image is the question's own images: the image-modality codes of the document before its
span (what the model's image tokenizer wrote into the prompt). A rendering that marks the counted
shapes of `toy-visual-count` would be a stronger target, but it needs a new record field and data
format; the question's codes are already in every batch.

Both stages run the slots as Coconut's objective does (`latent_forward`: n + 1 forwards with the KV
cache); decoding is `latent_generate`, the projection feeding each next slot.

Knobs (`MirageHead` arguments, saved with the head):

    stage              1: text loss + distillation; 2: text loss only (the paper's first two stages)
    projection         "mlp" (default): a residual two-layer MLP; "linear"; "none". The learned maps
                       start as the identity, so an untrained head is Coconut's.
    distill_loss       "cosine" (default): 1 - cosine similarity per slot (the paper's); "mse":
                       squared error averaged over the hidden size
    max_latent_steps   the most latent slots a sequence may hold (base.py)
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmllm.errors import ConfigError, InputError
from mmllm.model.hooks import TokenState
from mmllm.model.latent.base import (
    DEFAULT_MAX_LATENT_STEPS,
    LatentHead,
    base_model,
    latent_forward,
    register_head,
    require_head_kind,
)
from mmllm.model.latent.coconut import PROJECTIONS, Projection, ResidualMLP, identity_linear
from mmllm.model.latent.curriculum import align_latent_spans, unpack_documents
from mmllm.model.loss import IGNORE_INDEX
from mmllm.training.objectives import ObjectiveOutput, register_objective, score_targets
from mmllm.vocab import VocabLayout

DistillLoss = Literal["cosine", "mse"]
DISTILL_LOSSES = ("cosine", "mse")
STAGES = (1, 2)
IMAGE_MODALITY = "image"  # the helper image's codes: the layout's image range


@register_head
class MirageHead(LatentHead):
    name = "mirage"
    objective = "mirage"

    def __init__(
        self,
        layout: VocabLayout,
        hidden_size: int,
        max_latent_steps: int = DEFAULT_MAX_LATENT_STEPS,
        projection: Projection = "mlp",
        stage: int = 1,
        distill_loss: DistillLoss = "cosine",
    ) -> None:
        if projection not in PROJECTIONS:
            raise ConfigError(
                f"latent head mirage: projection must be one of {', '.join(PROJECTIONS)}, got {projection!r}"
            )
        if stage not in STAGES or isinstance(stage, bool):
            raise ConfigError(f"latent head mirage: stage must be 1 or 2, got {stage!r}")
        if distill_loss not in DISTILL_LOSSES:
            raise ConfigError(
                f"latent head mirage: distill_loss must be one of {', '.join(DISTILL_LOSSES)}, got {distill_loss!r}"
            )
        module = {"none": None, "linear": identity_linear, "mlp": ResidualMLP}[projection]
        super().__init__(layout, hidden_size, max_latent_steps, module(hidden_size) if module else None)
        self.projection_kind, self.stage, self.distill_loss = projection, stage, distill_loss
        self.fed: list[tuple[Tensor, Tensor]] | None = None  # training: (is_slot (B,), embedding (B, H)) per forward

    def options(self) -> dict[str, Any]:
        return {
            **super().options(),
            "projection": self.projection_kind,
            "stage": self.stage,
            "distill_loss": self.distill_loss,
        }

    def architecture(self) -> dict[str, Any]:
        return {key: value for key, value in self.options().items() if key != "stage"}  # stage 2 continues stage 1

    def on_embed(self, state: TokenState, cache) -> TokenState:
        state = super().on_embed(state, cache)
        if self.fed is not None:
            is_slot = state.token_ids[:, 0] == self.latent_id
            if bool(is_slot.any()):
                self.fed.append((is_slot, state.hidden[:, 0]))
        return state

    def slot_loss(self, fed: Tensor, target: Tensor) -> Tensor:
        """Per-slot distillation loss (N,) of fed embeddings (N, H) against visual targets (N, H)."""
        if self.distill_loss == "mse":
            return (fed - target).pow(2).mean(dim=-1)
        return 1.0 - F.cosine_similarity(fed, target, dim=-1)


def visual_targets(embed: nn.Embedding, codes: Tensor, k: int) -> Tensor:
    """The k distillation targets (k, H) of a helper image's codes (N,): the codes cut into k
    consecutive groups as equal as can be (the first N mod k one longer), each group's embeddings
    averaged."""
    if k < 1:
        raise InputError(f"visual targets: need k >= 1 latent visual tokens, got {k}")
    if codes.numel() < k:
        raise InputError(f"visual targets: {codes.numel()} image codes cannot fill {k} latent visual tokens")
    return torch.stack([embed(group).mean(dim=0) for group in codes.tensor_split(k)])


def helper_codes(ids: Tensor, layout: VocabLayout, latent_id: int) -> Tensor:
    """The helper image's codes of a document: its image-modality ids before its first latent slot."""
    image = layout.modality(IMAGE_MODALITY)
    slots = (ids == latent_id).nonzero().flatten()
    before = ids[: int(slots[0])] if len(slots) else ids
    return before[(before >= image.start) & (before < image.end)]


def require_mirage_head(model) -> MirageHead:
    return require_head_kind(model, MirageHead)


@register_objective("mirage")
def mirage(model, batch: dict[str, Tensor], modality_names: tuple[str, ...]) -> ObjectiveOutput:
    """Next-token loss on the text after the latent spans, the slots fed back through the head; in
    stage 1 (the head's `stage`) plus the distillation of each slot toward its visual target."""
    head = require_mirage_head(model)
    return mirage_loss(model, head, batch, modality_names, head.stage)


def mirage_loss(
    model, head: MirageHead, batch: dict[str, Tensor], modality_names: tuple[str, ...], stage: int
) -> ObjectiveOutput:
    """The `mirage` objective at a given stage (1: with distillation, 2: text only)."""
    if stage not in STAGES:
        raise ConfigError(f"mirage: stage must be 1 or 2, got {stage!r}")
    documents = unpack_documents(batch)
    if not documents:  # nothing to score: a zero that still reaches every trainable weight's hooks
        zero = model(input_ids=batch["input_ids"][:, :1]).logits.sum() * 0.0
        return ObjectiveOutput(zero, torch.zeros((), device=zero.device))
    base = base_model(model)
    rows = align_latent_spans(documents, head.latent_id, base.layout.pad_id)
    head.check_steps(rows.latent_steps)
    targets: list[Tensor] = []
    if stage == 1:
        with torch.no_grad():
            for document, steps in zip(documents, rows.latent_steps, strict=True):
                if steps:
                    codes = helper_codes(document["input_ids"], base.layout, head.latent_id)
                    targets.append(visual_targets(base.model.embed_tokens, codes, steps))
    head.fed = [] if targets else None
    try:
        logits = latent_forward(model, rows.input_ids, rows.attention_mask)
        fed = head.fed
    finally:
        head.fed = None
    labels = rows.labels.masked_fill(rows.input_ids == head.latent_id, IGNORE_INDEX)
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    z_loss = getattr(base.config, "z_loss", 0.0)
    text = score_targets(logits, shifted, rows.loss_weights, rows.modality, modality_names, z_loss)
    if not targets:
        return text
    is_slot = torch.stack([slot for slot, _ in fed])  # (S, B): forward s fed row b's next slot
    embeddings = torch.stack([embedding for _, embedding in fed])  # (S, B, H)
    predicted = torch.cat([embeddings[is_slot[:, row], row] for row in range(is_slot.shape[1])])
    distill = head.slot_loss(predicted, torch.cat(targets).to(predicted.dtype))
    count = distill.new_tensor(float(distill.numel()))
    sums = {**text.sums, "loss/distill": distill.sum().detach(), "loss/distill_tokens": count}
    return ObjectiveOutput(text.loss_sum + distill.sum(), text.tokens + count, sums)
