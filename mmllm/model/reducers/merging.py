"""Token-merging reducers, each registered under its spec name. Both merge inside one image at a
time (a run of consecutive visual slots), never across images or with text; a merged token takes
the slot, and so the rotary position, of one of its members, so the KV cache stays right.

tome    ToMe (Bolya et al. 2023, "Token Merging: Your ViT But Faster") in the LLM: before each
        layer of `layers` (0: on the embeddings; default: at 1/4, 1/2 and 3/4 of the depth),
        bipartite soft matching inside each image: its tokens alternate between sets A and B,
        each A token is matched to its most similar B token, and the most similar pairs merge
        into the B token's slot as size-weighted means, until `ratio` of the image's tokens are
        gone after the last of `layers` (an equal share at each). One matching merges at most
        every A token, so a layer whose share is larger matches again on what is left. The
        similarity (`by`) is the cosine of the entering layer's keys before the rotary embedding,
        averaged over the key heads (`key`, ToMe's choice), or of the hidden states (`hidden`).
        Proportional attention: a merged token of size s adds log s to the attention logit of
        every query that attends to it, in every later layer and decode step (the state's and
        the KV cache's `key_bias`).
prellm  VisionZip (Yang et al. 2024, "Longer is Better but Not Necessary in Vision Language
        Models") before the LLM, on the embeddings: each image keeps `1 - ratio` of its tokens,
        a `contextual` share of them contextual and the rest dominant. VisionZip's dominant tokens
        receive the most attention in the vision encoder; this model has none, so they are the
        tokens that receive the most attention from their own image in layer 0 (the image's
        tokens as queries and keys, with no causal mask, as an encoder sees them; averaged over
        heads and queries, as VisionZip does for encoders without a [CLS] token). The selection
        reads no text, so it serves every question about the image, as VisionZip's does. Of the
        other tokens, evenly spaced ones are the contextual targets; each remaining token joins
        its most similar target (cosine of layer 0's keys before the rotary embedding, averaged
        over the key heads, as VisionZip's key metric) and each target becomes its group's mean.
        (VisionZip's code adds the target to its group's mean; the mean keeps the contextual
        token on the embeddings' scale.)
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from mmllm.errors import ConfigError
from mmllm.model.backbone import KVCache, TokenState, apply_rope
from mmllm.model.reducers.base import TokenReducer, check_ratio, keep_tokens, register_reducer
from mmllm.model.reducers.methods import parse_layers, quarters

logger = logging.getLogger(__name__)

CONTEXTUAL_SHARE = 10 / 64  # VisionZip's 54 dominant + 10 contextual of 64 kept tokens


class _MergingReducer(TokenReducer):
    """A merging reducer: it reads the model's layers (`attach_reducer` binds them) and works image by image."""

    def __init__(self, layout, num_layers: int, ratio: float) -> None:
        super().__init__(layout, num_layers)
        self.ratio = check_ratio(self.name, ratio)
        self._model: list = []  # the backbone, kept outside the module tree (its weights are the model's)

    def bind(self, backbone) -> None:
        self._model = [backbone]

    def backbone(self):
        if not self._model:
            raise ConfigError(
                f"reducer {self.name}: attach it with attach_reducer(model, spec) so it can read the layer"
            )
        return self._model[0]

    def visual_prefill(self, state: TokenState) -> Tensor | None:
        """The (B, T) visual mask when this forward is a prefill with visual tokens; else None
        (a prompt without any is logged)."""
        if state.hidden.shape[1] == 1:
            return None
        visual = self.visual(state)
        if not bool(visual.any()):
            logger.info("reducer %s: the prompt has no image or video tokens; nothing to reduce", self.name)
            return None
        return visual

    def finish(self, state: TokenState, layer: int, keep: Tensor, visual: Tensor, **changed: Tensor) -> TokenState:
        """Record the cut, then return the state with `changed` fields and only the `keep` slots."""
        if state.valid is not None:
            keep &= state.valid
        self.kept_counts = (keep & visual).sum(dim=1).tolist()
        self.record(layer, keep)
        return keep_tokens(replace(state, **changed), keep)


def visual_spans(visual: Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) of each run of consecutive visual slots: one image (or video) each."""
    edge = torch.zeros_like(visual[:, :1], dtype=torch.long)
    steps = torch.diff(visual.long(), dim=1, prepend=edge, append=edge)
    starts = (steps == 1).nonzero().tolist()
    ends = (steps == -1).nonzero().tolist()
    return [(row, start, end) for (row, start), (_, end) in zip(starts, ends, strict=True)]


def head_mean_keys(backbone, layer_index: int, hidden: Tensor) -> Tensor:
    """(..., T, D) fp32: layer `layer_index`'s keys of `hidden` before the rotary embedding,
    averaged over the key heads (ToMe's and VisionZip's similarity metric)."""
    layer = backbone.layers[layer_index]
    attention = layer.self_attn
    keys = attention.k_proj(layer.input_layernorm(hidden))
    keys = keys.view(*keys.shape[:-1], attention.num_kv_heads, attention.head_dim)
    if attention.qk_norm:
        keys = attention.k_norm(keys)
    return keys.float().mean(dim=-2)


@register_reducer
class ToMe(_MergingReducer):
    name = "tome"

    def __init__(self, layout, num_layers: int, layers: str | int = "", ratio: float = 0.5, by: str = "key") -> None:
        super().__init__(layout, num_layers, ratio)
        self.boundaries = parse_layers(self.name, layers, num_layers, quarters(num_layers))
        if by not in ("key", "hidden"):
            raise ConfigError(f"reducer tome: by must be 'key' or 'hidden', got {by!r}")
        self.by = by

    def before_llm(self, state: TokenState, cache: KVCache | None) -> TokenState:
        return self._merge(state, 0) if 0 in self.boundaries else state

    def on_layer_end(self, layer_idx: int, state: TokenState, cache: KVCache | None) -> TokenState:
        return self._merge(state, layer_idx + 1) if layer_idx + 1 in self.boundaries else state

    def span_target(self, original: int, layer: int) -> int:
        """The tokens an image of `original` tokens keeps after the merge before `layer`."""
        share = (self.boundaries.index(layer) + 1) / len(self.boundaries)
        return original - math.floor(original * self.ratio * share)

    def _merge(self, state: TokenState, layer: int) -> TokenState:
        visual = None if self.ratio == 0.0 else self.visual_prefill(state)
        if visual is None:
            return state
        hidden = state.hidden.clone()
        sizes = torch.ones_like(visual, dtype=torch.float32) if state.key_bias is None else state.key_bias.exp().round()
        keep = torch.ones_like(visual)
        # one key projection for the whole batch: spans never overlap, so each span's keys are those of its tokens
        keys = head_mean_keys(self.backbone(), layer, state.hidden) if self.by == "key" else None
        # images of the same length and size merge the same number of tokens: one batched matching each
        groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for row, start, end in visual_spans(visual):
            target = self.span_target(round(float(sizes[row, start:end].sum())), layer)
            groups.setdefault((end - start, end - start - target), []).append((row, start))
        for (length, excess), spans in groups.items():
            rows = torch.tensor([row for row, _ in spans], device=visual.device)[:, None]
            slots = torch.tensor([start for _, start in spans], device=visual.device)[:, None] + torch.arange(
                length, device=visual.device
            )
            images = hidden[rows, slots].float()
            metric = keys[rows, slots] if keys is not None else images
            merged, sizes[rows, slots], gone = bipartite_merge(images, metric, sizes[rows, slots], excess)
            hidden[rows, slots] = merged.to(hidden.dtype)
            keep[rows, slots] = ~gone
        key_bias = sizes.log() if state.key_bias is not None or bool((sizes > 1).any()) else None
        return self.finish(state, layer, keep, visual, hidden=hidden, key_bias=key_bias)


def bipartite_merge(hidden: Tensor, metric: Tensor, sizes: Tensor, excess: int) -> tuple[Tensor, Tensor, Tensor]:
    """ToMe's bipartite soft matching on N images at once: (N, n, C) fp32 `hidden`, (N, n, D)
    `metric` and (N, n) `sizes`, until `excess` tokens of each are gone. Returns the merged hidden
    states and sizes, and the (N, n) mask of the tokens that went. Each round alternates every
    image's remaining tokens into A and B, matches each A to its most cosine-similar B, and merges
    the most similar A tokens into their matches as size-weighted means (of the metric too, for
    the next round)."""
    hidden, metric, sizes = hidden.clone(), metric.clone(), sizes.clone()
    count, n = sizes.shape
    alive = torch.arange(n, device=hidden.device).expand(count, n)
    while excess > 0 and alive.shape[1] > 1:
        side_a, side_b = alive[:, 0::2], alive[:, 1::2]
        unit = F.normalize(metric, dim=-1)
        best, match = (_take(unit, side_a) @ _take(unit, side_b).transpose(1, 2)).max(dim=-1)
        chosen = best.argsort(dim=1, descending=True, stable=True)[:, : min(excess, side_a.shape[1])]
        source, destination = side_a.gather(1, chosen), side_b.gather(1, match.gather(1, chosen))
        totals = sizes.scatter_add(1, destination, sizes.gather(1, source))
        for values in (hidden, metric):
            weighted = (values * sizes[..., None]).scatter_add(
                1, _expand(destination, values), _take(values, source) * sizes.gather(1, source)[..., None]
            )
            merged = weighted.gather(1, _expand(destination, values)) / totals.gather(1, destination)[..., None]
            values.scatter_(1, _expand(destination, values), merged)
        sizes = totals
        went = torch.zeros_like(sizes, dtype=torch.bool).scatter_(1, source, True)
        alive = alive[~went.gather(1, alive)].view(count, -1)
        excess -= source.shape[1]
    gone = torch.ones_like(sizes, dtype=torch.bool).scatter_(1, alive, False)
    return hidden, sizes, gone


def _expand(index: Tensor, values: Tensor) -> Tensor:
    return index[..., None].expand(-1, -1, values.shape[-1])


def _take(values: Tensor, index: Tensor) -> Tensor:
    """(N, k, C): the rows `index` (N, k) of each of the N (n, C) blocks of `values`."""
    return values.gather(1, _expand(index, values))


@register_reducer
class PreLLM(_MergingReducer):
    name = "prellm"

    def __init__(self, layout, num_layers: int, ratio: float = 0.5, contextual: float = CONTEXTUAL_SHARE) -> None:
        super().__init__(layout, num_layers, ratio)
        if not 0.0 <= contextual <= 1.0:
            raise ConfigError(f"reducer prellm: contextual must be in [0, 1], got {contextual}")
        self.contextual = float(contextual)

    def before_llm(self, state: TokenState, cache: KVCache | None) -> TokenState:
        visual = None if self.ratio == 0.0 else self.visual_prefill(state)
        if visual is None:
            return state
        backbone = self.backbone()
        hidden = state.hidden.clone()
        keep = torch.ones_like(visual)
        spans = visual_spans(visual)
        budgets = self.keep_count(torch.tensor([end - start for _, start, end in spans])).tolist()
        for (row, start, end), budget in zip(spans, budgets, strict=True):
            image = slice(start, end)
            keys, received = self.image_attention(backbone, state.hidden[row, image], state.position_ids[row, image])
            kept, groups = self.select(received, keys, budget)
            for target, members in groups:
                hidden[row, start + target] = state.hidden[row, start + members].float().mean(dim=0).to(hidden.dtype)
            keep[row, start:end] = False
            keep[row, start + kept] = True
        return self.finish(state, 0, keep, visual, hidden=hidden)

    def keep_count(self, counts: Tensor) -> Tensor:
        """The tokens images of `counts` tokens keep."""
        return counts - torch.floor(counts.float() * self.ratio).long()

    def contextual_count(self, budget: int) -> int:
        """Contextual tokens of an image keeping `budget` (at least one when `contextual` > 0, as VisionZip)."""
        return min(budget, max(1, math.floor(budget * self.contextual))) if self.contextual > 0 else 0

    @staticmethod
    def image_attention(backbone, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """One image's (n, D) layer-0 keys before the rotary embedding, averaged over the key heads,
        and the (n,) attention each token receives from the image's tokens in layer 0 (no causal
        mask), averaged over heads and queries."""
        layer = backbone.layers[0]
        attention = layer.self_attn
        n = hidden.shape[0]
        normed = layer.input_layernorm(hidden[None])
        q = attention.q_proj(normed).view(1, n, attention.num_heads, attention.head_dim)
        k = attention.k_proj(normed).view(1, n, attention.num_kv_heads, attention.head_dim)
        if attention.qk_norm:
            q, k = attention.q_norm(q), attention.k_norm(k)
        metric = k[0].float().mean(dim=1)
        cos, sin = backbone.rotary_emb(positions[None], hidden.dtype)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # (1, H, n, D)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        k = k.repeat_interleave(attention.num_heads // attention.num_kv_heads, dim=1)
        probs = torch.softmax((q @ k.transpose(-1, -2)).float() / math.sqrt(attention.head_dim), dim=-1)
        return metric, probs[0].mean(dim=(0, 1))

    def select(self, received: Tensor, keys: Tensor, budget: int) -> tuple[Tensor, list[tuple[int, Tensor]]]:
        """The (local) indices an image keeps, and each contextual target with the members it averages."""
        contextual = self.contextual_count(budget)
        dominant = received.argsort(descending=True, stable=True)[: budget - contextual]
        rest = torch.ones_like(received, dtype=torch.bool)
        rest[dominant] = False
        rest = rest.nonzero()[:, 0]
        if contextual == 0:
            return dominant, []
        step = max(1, rest.numel() // contextual)
        targets = rest[::step][:contextual]
        others = rest[~torch.isin(rest, targets)]
        unit = F.normalize(keys, dim=-1)
        assignment = (unit[others] @ unit[targets].T).argmax(dim=-1) if others.numel() else others
        groups = [(int(target), torch.cat((target[None], others[assignment == i]))) for i, target in enumerate(targets)]
        return torch.cat((dominant, targets)), groups
