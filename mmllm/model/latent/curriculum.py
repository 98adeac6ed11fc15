"""Training continuous thought: Coconut's multi-stage curriculum, its objective, and the loop's hooks.

Coconut (Hao et al. 2024) teaches latent reasoning gradually, from a chain-of-thought model: at
stage k the first k steps of each trace are replaced by k x c latent thoughts, and the loss falls on
the remaining text steps and the answer, never on the latent slots or the span's delimiters. Past
`max_latent_stage` every step is replaced, and the thoughts stay at `max_latent_stage` x c
(`pad_latent_to_max`, as Coconut's ProsQA run). The formats themselves are built in formats.py.

Knobs (`CoconutCurriculum`):

    c_thought          latent thoughts per replaced step (1: Coconut's ProsQA and ProntoQA; GSM8K uses 2)
    max_latent_stage   the last stage that replaces steps one by one (6: Coconut's ProsQA)
    pad_latent_to_max  past it, every trace gets max_latent_stage x c thoughts (True) or
                       min(its steps, max_latent_stage) x c (False)

Stage k is one run of the finetuning loop on stage-k data (`write_puzzle_shards` with
`PuzzleFormat("coconut", stage=k)`), starting from the previous stage's model: a fresh optimizer
per stage, as Coconut's `reset_optimizer`; `mmllm latent-train` (train.py) runs them all. The
run's YAML sets `finetune.latent_head: {kind: coconut, ...}` and lists `objectives: [coconut]`, and
`finetune_hooks` wraps the method's hooks in `LatentHeadHooks`, which attach the head. Its
checkpoints save the head beside the model dir or the LoRA adapter, and the next stage's run
continues from it. The head is read at a hook point, outside any forward of its own, so (as the
learned reducers) it trains with ZeRO-0/1/2, not ZeRO-3; and activation checkpointing does not
apply to forwards over a KV cache.

The `coconut` objective runs the continuous feedback exactly: every packed document becomes a row
of its own (the KV cache cannot hold packed rows' document masks), rows are left-padded so their
first latent slots share a column (Coconut's collator), and `latent_forward` runs n + 1 forwards
for n thoughts, each over the new position with the prefix's KV cache and its gradients reused.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from mmllm.errors import ConfigError
from mmllm.model.latent.base import (
    LATENT_HEAD_FILE,
    attach_latent_head,
    base_model,
    build_head,
    find_latent_head,
    latent_forward,
    read_latent_head,
)
from mmllm.model.loss import IGNORE_INDEX
from mmllm.training.objectives import ObjectiveOutput, register_objective, score_targets

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoconutCurriculum:
    c_thought: int = 1  # thoughts per replaced step: Coconut's ProsQA / ProntoQA value (GSM8K: 2)
    max_latent_stage: int = 6  # Coconut's ProsQA: stages past it replace every step
    pad_latent_to_max: bool = True  # Coconut's ProsQA: the same number of thoughts for every question

    def __post_init__(self) -> None:
        if self.c_thought < 1:
            raise ConfigError(f"coconut curriculum: c_thought must be >= 1, got {self.c_thought}")
        if self.max_latent_stage < 0:
            raise ConfigError(f"coconut curriculum: max_latent_stage must be >= 0, got {self.max_latent_stage}")

    @property
    def final_stage(self) -> int:
        """The first stage with no text step left: the curriculum's last."""
        return self.max_latent_stage + 1

    def split(self, stage: int, num_steps: int) -> tuple[int, int]:
        """(steps replaced, latent thoughts) of a trace of `num_steps` steps at `stage`."""
        if stage < 0:
            raise ConfigError(f"coconut curriculum: stage must be >= 0, got {stage}")
        if stage > self.max_latent_stage:
            stages = self.max_latent_stage if self.pad_latent_to_max else min(num_steps, self.max_latent_stage)
            return num_steps, stages * self.c_thought
        return min(stage, num_steps), stage * self.c_thought

    def inference_steps(self, stage: int) -> int:
        """Latent steps to generate with, for a model trained through `stage` (the trace is unknown there)."""
        return min(stage, self.max_latent_stage) * self.c_thought


# ---------------------------------------------------------------- the objective


@dataclass
class LatentRows:
    """Documents of a batch, one per row, left-padded so their first latent slots share a column."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    loss_weights: Tensor
    modality: Tensor
    latent_steps: list[int]


def unpack_documents(batch: dict[str, Tensor]) -> list[dict[str, Tensor]]:
    """The documents of packed rows that hold a target (the row's padding holds none), in order."""
    fields = ("input_ids", "labels", "loss_weights", "modality")
    documents = []
    for row in range(batch["input_ids"].shape[0]):
        ids = batch["document_ids"][row]
        starts = [0, *((ids[1:] != ids[:-1]).nonzero().flatten() + 1).tolist(), ids.shape[0]]
        for start, stop in itertools.pairwise(starts):
            if bool((batch["labels"][row, start:stop] != IGNORE_INDEX).any()):
                documents.append({name: batch[name][row, start:stop] for name in fields})
    return documents


def align_latent_spans(documents: list[dict[str, Tensor]], latent_id: int, pad_id: int) -> LatentRows:
    """One row per document, left-padded so that every first latent slot falls in one column.

    A document without slots is placed so it ends by that column when it can (its tail beyond it
    then shares the forwards of the others' tails), so the rows stay as short as alignment allows.
    """
    firsts = [_first(d["input_ids"] == latent_id) for d in documents]
    anchor = max((f for f in firsts if f is not None), default=None)
    cuts = [f if f is not None else len(d["input_ids"]) for f, d in zip(firsts, documents, strict=True)]
    if anchor is not None:
        cuts = [c if f is not None else min(c, anchor) for c, f in zip(cuts, firsts, strict=True)]
    column = max(cuts)
    pads = [column - c for c in cuts]
    width = max(p + len(d["input_ids"]) for p, d in zip(pads, documents, strict=True))
    device = documents[0]["input_ids"].device
    rows = len(documents)
    ids = torch.full((rows, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(rows, width, dtype=torch.long, device=device)
    labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long, device=device)
    weights = torch.zeros(rows, width, dtype=documents[0]["loss_weights"].dtype, device=device)
    modality = torch.zeros(rows, width, dtype=torch.long, device=device)
    for row, (pad, document) in enumerate(zip(pads, documents, strict=True)):
        span = slice(pad, pad + len(document["input_ids"]))
        ids[row, span] = document["input_ids"]
        mask[row, span] = 1
        labels[row, span] = document["labels"]
        weights[row, span] = document["loss_weights"]
        modality[row, span] = document["modality"]
    steps = [int((d["input_ids"] == latent_id).sum()) for d in documents]
    return LatentRows(ids, mask, labels, weights, modality, steps)


def _first(hits: Tensor) -> int | None:
    found = hits.nonzero()
    return int(found[0, 0]) if len(found) else None


@register_objective("coconut")
def coconut(model, batch: dict[str, Tensor], modality_names: tuple[str, ...]) -> ObjectiveOutput:
    """The next-token loss of the text after (and around) latent spans, the spans run as continuous
    thought; weighted and reported per modality as the `next_token` objective is."""
    head = find_latent_head(model)
    if head is None:
        raise ConfigError("objective coconut: the model has no latent head attached (train with LatentHeadHooks)")
    documents = unpack_documents(batch)
    if not documents:  # nothing to score: a zero that still reaches every trainable weight's hooks
        zero = model(input_ids=batch["input_ids"][:, :1]).logits.sum() * 0.0
        return ObjectiveOutput(zero, torch.zeros((), device=zero.device))
    rows = align_latent_spans(documents, head.latent_id, base_model(model).layout.pad_id)
    head.check_steps(rows.latent_steps)
    logits = latent_forward(model, rows.input_ids, rows.attention_mask)
    # Predict token t+1 from position t; each row is one document, so nothing crosses a boundary.
    # A latent slot is never a target, whatever the data's labels say: its id is only a placeholder.
    labels = rows.labels.masked_fill(rows.input_ids == head.latent_id, IGNORE_INDEX)
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    z_loss = getattr(base_model(model).config, "z_loss", 0.0)
    return score_targets(logits, targets, rows.loss_weights, rows.modality, modality_names, z_loss)


# ---------------------------------------------------------------- the loop's hooks


class LatentHeadHooks:
    """A finetuning method's `ModelHooks` (`finetune_hooks(config.finetune)`) plus a latent head, with
    the same interface: attached after the method prepared the model (so LoRA leaves it trainable),
    and saved beside what the method saves (`finetune_hooks` wraps with it for `finetune.latent_head`).

    The head continues from the base checkpoint's `latent_head.safetensors` when that holds the same
    head with the same knobs (the next curriculum stage), else it starts fresh.
    """

    def __init__(self, method, head: str = "coconut", **options) -> None:
        self.method = method
        self.output = method.output
        self.name, self.options = head, options
        self.head = None

    def prepare(self, model, config):
        model = self.method.prepare(model, config)
        base = base_model(model)
        head = build_head(self.name, base, **self.options)
        saved = Path(base.name_or_path) / LATENT_HEAD_FILE if base.name_or_path else None
        if saved is not None and saved.is_file():
            previous = read_latent_head(saved, base.layout, head.hidden_size)
            if previous.name == head.name and previous.architecture() == head.architecture():
                head.load_state_dict(previous.state_dict())  # the saved weights, this run's training knobs
                logger.info("latent head %s: training continues from %s", head.name, saved)
        self.head = attach_latent_head(model, head)
        return model

    def saved(self, model):
        from mmllm.training.finetune import PluginCheckpoint  # the method's save, then the head's file

        return PluginCheckpoint(self.method.saved(model), self.head, self.output)
