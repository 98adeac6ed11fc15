"""Training objectives: what a step's loss is, pluggable so later heads add theirs without forking the loop.

An objective maps the model and one micro-batch of packed rows to an `ObjectiveOutput`: the
*sum* of its weighted per-token losses (differentiable) and how many tokens it scored. The
loop divides by the token count of the whole step (all ranks, all micro-batches), so the
gradient is that of the global token mean, whatever the number of ranks or micro-batches.

Register one with `@register_objective("name")`; a run's YAML lists them under `objectives:`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from mmllm.errors import ConfigError
from mmllm.model.backbone import TokenState
from mmllm.model.loss import IGNORE_INDEX, weighted_cross_entropy


@dataclass
class ObjectiveOutput:
    loss_sum: Tensor  # differentiable: sum over scored tokens of weight x loss
    tokens: Tensor  # scalar: tokens scored (the normaliser)
    # Detached sums the loop reduces over ranks and reports as sums[k] / sums[k + "_tokens"]:
    sums: dict[str, Tensor] = field(default_factory=dict)


Objective = Callable[..., ObjectiveOutput]
OBJECTIVES: dict[str, Objective] = {}


def register_objective(name: str) -> Callable[[Objective], Objective]:
    def add(fn: Objective) -> Objective:
        OBJECTIVES[name] = fn
        return fn

    return add


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        import mmllm.model.latent  # noqa: F401  (registers the latent heads' objectives, e.g. coconut)
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; known: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]


@register_objective("next_token")
def next_token(model, batch: dict[str, Tensor], modality_names: tuple[str, ...]) -> ObjectiveOutput:
    """Cross-entropy of every target token given the tokens before it in its document, weighted
    per modality, with the loss also summed per modality of the predicted token."""
    out = model(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        document_ids=batch["document_ids"],
    )
    labels, loss_weights, modalities, documents = _through_hooks(batch, out.state)
    # Predict token t+1 from position t, never across a document boundary.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    crosses = F.pad(documents[:, 1:] != documents[:, :-1], (0, 1), value=True)
    targets = targets.masked_fill(crosses, IGNORE_INDEX)
    z_loss = getattr(getattr(model, "config", None), "z_loss", 0.0)
    return score_targets(out.logits, targets, loss_weights, modalities, modality_names, z_loss)


def score_targets(
    logits: Tensor,
    targets: Tensor,
    loss_weights: Tensor,
    modalities: Tensor,
    modality_names: tuple[str, ...],
    z_loss: float,
) -> ObjectiveOutput:
    """The objective output of next-token `targets` (B, T), already shifted (IGNORE_INDEX where
    nothing is scored); `loss_weights` and `modalities` are input-aligned and shifted here."""
    weights = F.pad(loss_weights[:, 1:], (0, 1))
    target_modality = F.pad(modalities[:, 1:], (0, 1))
    loss_sum_mean, nll = weighted_cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), weights.reshape(-1), z_loss
    )
    scored = targets.reshape(-1) != IGNORE_INDEX
    tokens = scored.sum()
    sums: dict[str, Tensor] = {}
    modality = target_modality.reshape(-1)
    for index, name in enumerate(("text", *modality_names)):
        here = scored & (modality == index)
        sums[f"loss/{name}"] = nll[here].sum().detach()
        sums[f"loss/{name}_tokens"] = here.sum().to(nll.dtype)
    # weighted_cross_entropy returns the mean over scored tokens; the loop wants the sum.
    return ObjectiveOutput(loss_sum_mean * tokens.clamp(min=1), tokens.to(torch.float32), sums)


def _through_hooks(batch: dict[str, Tensor], state: TokenState) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Labels, loss weights, modalities and documents of the tokens the model's hooks left (a hook
    may insert tokens, which have no label, or drop some), in the order the logits come."""
    columns = (batch["labels"], batch["loss_weights"], batch["modality"], batch["document_ids"])
    source = state.source_index
    if source.shape == columns[0].shape and bool((source == torch.arange(source.shape[1], device=source.device)).all()):
        return columns
    inserted = source < 0
    labels, weights, modality = (column.gather(1, source.clamp(min=0)) for column in columns[:3])
    return labels.masked_fill(inserted, IGNORE_INDEX), weights.masked_fill(inserted, 0.0), modality, state.document_ids
