"""The `TokenReducer` protocol: visual-token reduction plug-ins at the backbone's hook points.

A reducer is a `BackboneHook` that removes (or merges) image and video tokens of a prompt:
before the LLM (`on_embed`), after a chosen layer (`on_layer_end`), so every later layer, its
KV cache and decoding see fewer tokens. Kept tokens keep their rotary positions, so decoding
continues at the position after the prompt whatever was removed. Rows of a batch may keep
different numbers of tokens: the shorter rows are padded with invalid slots, which attention
and the KV cache skip.

Reduction happens in the forward that holds the visual tokens (the prefill); decode steps,
whose one new token is never visual, pass through. A prompt without visual tokens is left as
it is, with one log line.

Every reduction is recorded as a `Stage` (where it acted, and which slots it kept), so the
benchmark can replay exactly the same cut with zero scoring cost (`IdealSlice`): the honest
lower bound on what the method's wall-clock could be.

One spec string selects a method everywhere: `NAME[:key=val,...]`, e.g. `fastv:layer=2,ratio=0.5`
(`parse_spec`, `build_reducer`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from mmllm.errors import ConfigError
from mmllm.model.backbone import BackboneHook, KVCache, TokenState
from mmllm.vocab import VocabLayout

logger = logging.getLogger(__name__)

Scorer = Callable[[TokenState, Tensor], Tensor]  # (state, visual mask) -> (B, T) scores, higher kept first
VISUAL_MODALITIES = ("image", "video")  # the modalities whose code tokens reducers remove


@dataclass
class Stage:
    """One reduction of a forward: before decoder layer `layer` (0: on the embeddings), the
    state's slots `keep` (B, T) survived; a merged token survives in its representative's slot."""

    layer: int
    keep: Tensor


class TokenReducer(BackboneHook):
    """Base class: subclasses set `name`, implement `keep_count` and call `reduce` from their
    hook point (`before_llm` for the embeddings, `on_layer_end` for a layer)."""

    name: ClassVar[str] = ""

    def __init__(self, layout: VocabLayout, num_layers: int) -> None:
        super().__init__()
        self.num_layers = num_layers
        ranges = [layout.modalities[m] for m in VISUAL_MODALITIES if m in layout.modalities]
        if not ranges:
            raise ConfigError(f"reducer {self.name}: the layout has no image or video range to reduce")
        self.ranges = [(m.start, m.end) for m in ranges]
        self.kept_counts: list[int] | None = None  # visual tokens each row kept, after the last reduction
        self.stages: list[Stage] = []  # the reductions of the last prefill, in order

    def on_embed(self, state: TokenState, cache: KVCache | None) -> TokenState:
        if state.hidden.shape[1] > 1:  # a prefill: a new prompt, a new record
            self.stages = []
        return self.before_llm(state, cache)

    def before_llm(self, state: TokenState, cache: KVCache | None) -> TokenState:
        """The embeddings hook point of a reducer (`on_embed` keeps the stage record)."""
        return state

    def record(self, layer: int, keep: Tensor) -> None:
        self.stages.append(Stage(layer, keep.detach().clone()))

    def ideal_slice(self, stages: list[Stage] | None = None) -> BackboneHook:
        """A hook that cuts exactly what `stages` (default: the last prefill's) cut, where they
        cut it, computing nothing."""
        return IdealSlice(self.stages if stages is None else stages)

    def visual_id(self, token: int) -> bool:
        """Whether one id is a visual code token."""
        return any(start <= token < end for start, end in self.ranges)

    def visual(self, state: TokenState) -> Tensor:
        """(B, T) bool: the visual code tokens of the state (padding excluded)."""
        ids = state.token_ids
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for start, end in self.ranges:
            mask |= (ids >= start) & (ids < end)
        return mask if state.valid is None else mask & state.valid

    def reduce(
        self, state: TokenState, cache: KVCache | None, score: Callable[[TokenState, Tensor], Tensor], layer: int
    ) -> TokenState:
        """Before decoder layer `layer`, keep per row the visual tokens with the highest `score`
        (a `keep_count` of them) and every other token."""
        visual = self.visual(state)
        if state.hidden.shape[1] == 1 or not bool(visual.any()):
            if state.hidden.shape[1] > 1:
                logger.info("reducer %s: the prompt has no image or video tokens; nothing to reduce", self.name)
            return state
        scores = score(state, visual).masked_fill(~visual, float("-inf"))
        counts = visual.sum(dim=1)
        keep_counts = self.keep_count(counts)
        order = scores.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        keep = ~visual | (rank < keep_counts[:, None])
        if state.valid is not None:
            keep &= state.valid
        self.kept_counts = keep_counts.tolist()
        self.record(layer, keep)
        return keep_tokens(state, keep)

    def keep_count(self, counts: Tensor) -> Tensor:
        raise NotImplementedError


def keep_tokens(state: TokenState, keep: Tensor) -> TokenState:
    """The state with only the `keep` (B, T) tokens, in order; rows keeping fewer are right-padded
    with invalid slots (their positions repeat the row's last kept one, never attended to)."""
    if bool(keep.all()):
        return state
    counts = keep.sum(dim=1)
    width = int(counts.max())
    slots = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
    sort_key = torch.where(keep, slots, slots + keep.shape[1])  # kept first, in time order
    index = sort_key.argsort(dim=1)[:, :width]
    last = index.gather(1, (counts - 1).clamp(min=0)[:, None])
    padded = torch.arange(width, device=keep.device)[None, :] >= counts[:, None]
    index = torch.where(padded, last, index)
    reduced = state.select(index)
    valid = ~padded if reduced.valid is None else reduced.valid & ~padded
    reduced.valid = None if bool(valid.all()) else valid
    return reduced


class IdealSlice(BackboneHook):
    """Replays recorded stages on the same prompts: the same slots go, at the same layers, with
    no scoring, similarity or merging computed (the benchmark's honesty row)."""

    def __init__(self, stages: list[Stage]) -> None:
        super().__init__()
        self.cuts = {stage.layer: stage.keep for stage in stages}

    def on_embed(self, state: TokenState, cache: KVCache | None) -> TokenState:
        return self._cut(0, state)

    def on_layer_end(self, layer_idx: int, state: TokenState, cache: KVCache | None) -> TokenState:
        return self._cut(layer_idx + 1, state)

    def _cut(self, layer: int, state: TokenState) -> TokenState:
        keep = self.cuts.get(layer)
        if keep is None or state.hidden.shape[1] == 1:
            return state
        if keep.shape != state.hidden.shape[:2]:
            raise ValueError(f"ideal slice: recorded keep {tuple(keep.shape)} does not fit this prompt's state")
        return keep_tokens(state, keep)


# ---------------------------------------------------------------- registry and spec strings

REDUCERS: dict[str, type[TokenReducer]] = {}


def register_reducer(cls: type[TokenReducer]) -> type[TokenReducer]:
    REDUCERS[cls.name] = cls
    return cls


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """`fastv:layer=2,ratio=0.5` -> ("fastv", {"layer": 2, "ratio": 0.5})."""
    name, _, rest = spec.strip().partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"reducer spec {spec!r}: option {item!r} is not key=value")
        try:
            options[key] = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            options[key] = value
    return name, options


def registry() -> dict[str, type[TokenReducer]]:
    """Every registered reducer, the built-in ones included."""
    from mmllm.model.reducers import learned, merging, methods  # noqa: F401  (register the built-in methods)

    return REDUCERS


def build_reducer(spec: str, model) -> TokenReducer:
    """The reducer a spec names, configured for `model` (its layout and depth); not attached."""
    name, options = parse_spec(spec)
    if name not in registry():
        raise ConfigError(f"unknown reducer {name!r} (reducers: {', '.join(sorted(REDUCERS))})")
    if model.layout is None:
        raise ConfigError("reducers need a model with a vocab layout")
    try:
        return REDUCERS[name](model.layout, model.config.num_hidden_layers, **options)
    except TypeError as err:
        raise ConfigError(f"reducer {name}: {err}") from None


def check_ratio(name: str, ratio: float) -> float:
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"reducer {name}: ratio must be in [0, 1), got {ratio}")
    return float(ratio)


def check_layer(name: str, layer: int, num_layers: int) -> int:
    if not 0 <= layer < num_layers:
        raise ConfigError(f"reducer {name}: layer must be in [0, {num_layers}), got {layer}")
    return int(layer)
