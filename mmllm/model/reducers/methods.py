"""Training-free visual-token reducers, each registered under its spec name.

fastv      FastV (Chen et al. 2024, "An Image is Worth 1/2 Tokens After Layer 2"): before layer
           `layer`, rank the visual tokens by the attention they receive from the last query
           (`queries=last`) or from every text query after the first visual token
           (`queries=text`), averaged over heads, and drop `ratio` of them. The scores come from
           that layer's own queries and keys, for the scoring rows only, so no full attention
           matrix is built and every layer keeps running SDPA. Ranking is per sample.
pdrop      PyramidDrop (Xing et al. 2024, "PyramidDrop: Accelerating Your Large Vision-Language
           Models via Pyramid Visual Redundancy Reduction"): before each layer of `layers`
           (default: 1/4, 1/2 and 3/4 of the depth), FastV's ranking drops the same fraction of
           the visual tokens left, so that `ratio` of them are gone after the last stage (the
           paper's per-stage keep ratio lambda is (1 - ratio) ** (1 / stages); its 0.5 over three
           stages is ratio=0.875).
dart       DART (Wen et al. 2025, "Stop Looking for Important Tokens ... Duplication Matters
           More"): before layer `layer`, pick `pivots` visual tokens (largest hidden-state norm),
           and keep those and the tokens least similar (cosine) to any pivot, dropping `ratio`
           of the visual tokens; no attention is needed.
sparsevlm  SparseVLM (Zhang et al. 2024, "SparseVLM: Visual Token Sparsification for Efficient
           Vision-Language Model Inference"). Text raters, chosen once on the embeddings as the
           official code does: the text after the first visual token that the visual tokens
           attend to more than average (softmax over that text of the visual-text embedding
           products, averaged over the visual tokens); all that text when none stands out.
           Before each layer of `layers` (default: the code's layers 2/6/15 of 32, at the same
           relative depths), the visual tokens are ranked by the attention they receive from the
           raters (FastV's scoring, on the rater rows only), and each stage removes the same
           fraction of the visual slots left, so that `ratio` of them are gone after the last.
           (The paper sizes each stage from the rank of the attention matrix; its code, like
           this, uses fixed per-stage budgets.) Recycling: `recycle` x (the slots a stage
           removes) of the slots it keeps are clusters of pruned tokens: the best-scored pruned
           tokens, ten per cluster, grouped by density-peak clustering (DPC-KNN, the code's
           `cluster_and_merge`); each cluster is the score-weighted mean of its members, in its
           center's slot (so at its position). The default 0.03 is the code's: it recycles the
           best 30% of the pruned tokens, ten per cluster.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from mmllm.errors import ConfigError
from mmllm.model.backbone import KVCache, TokenState, apply_rope
from mmllm.model.reducers.base import TokenReducer, check_layer, check_ratio, keep_tokens, register_reducer


class _LayerReducer(TokenReducer):
    """A reducer that acts before decoder layer `layer` (0: before the LLM, on the embeddings)."""

    def __init__(self, layout, num_layers: int, layer: int = 2, ratio: float = 0.5) -> None:
        super().__init__(layout, num_layers)
        self.layer = check_layer(self.name, layer, num_layers)
        self.ratio = check_ratio(self.name, ratio)

    def keep_count(self, counts: Tensor) -> Tensor:
        return counts - torch.floor(counts.float() * self.ratio).long()

    def before_llm(self, state: TokenState, cache: KVCache | None) -> TokenState:
        return self._act(state, cache) if self.layer == 0 else state

    def on_layer_end(self, layer_idx: int, state: TokenState, cache: KVCache | None) -> TokenState:
        return self._act(state, cache) if layer_idx == self.layer - 1 else state

    def _act(self, state: TokenState, cache: KVCache | None) -> TokenState:
        if self.ratio == 0.0:
            return state
        return self.reduce(state, cache, self.score, self.layer)

    def score(self, state: TokenState, visual: Tensor) -> Tensor:
        raise NotImplementedError


@register_reducer
class FastV(_LayerReducer):
    name = "fastv"

    def __init__(self, layout, num_layers: int, layer: int = 2, ratio: float = 0.5, queries: str = "last") -> None:
        super().__init__(layout, num_layers, layer, ratio)
        if queries not in ("last", "text"):
            raise ConfigError(f"reducer fastv: queries must be 'last' or 'text', got {queries!r}")
        self.queries = queries
        self._model: list = []  # the backbone, kept outside the module tree (its weights are the model's)

    def bind(self, backbone) -> None:
        self._model = [backbone]

    def score(self, state: TokenState, visual: Tensor) -> Tensor:
        return self.attention_received(state, visual, self.layer)

    def attention_received(
        self, state: TokenState, visual: Tensor, layer_index: int, raters: Tensor | None = None
    ) -> Tensor:
        """(B, T): the attention each token receives at layer `layer_index` from the scoring queries,
        averaged over heads and over those queries. The scoring queries are `raters` (B, T) when
        given (SparseVLM's), else the `queries` option's; a row without any uses its last token."""
        if not self._model:
            raise ConfigError(
                f"reducer {self.name}: attach it with attach_reducer(model, spec) so it can read the layer"
            )
        backbone = self._model[0]
        layer = backbone.layers[layer_index]
        attention = layer.self_attn
        normed = layer.input_layernorm(state.hidden)
        queries = self._scoring_queries(state, visual) if raters is None else raters
        rows, weights = _query_rows(state, queries)  # (B, S) slot indices of the scoring queries, their weights
        b, t, _ = normed.shape
        k = attention.k_proj(normed).view(b, t, attention.num_kv_heads, attention.head_dim)
        picked = normed.gather(1, rows[..., None].expand(-1, -1, normed.shape[-1]))
        q = attention.q_proj(picked).view(b, rows.shape[1], attention.num_heads, attention.head_dim)
        if attention.qk_norm:
            q, k = attention.q_norm(q), attention.k_norm(k)
        cos_k, sin_k = backbone.rotary_emb(state.position_ids, normed.dtype)
        cos_q, sin_q = backbone.rotary_emb(state.position_ids.gather(1, rows), normed.dtype)
        q = apply_rope(q.transpose(1, 2), cos_q, sin_q)  # (B, H, S, D)
        k = apply_rope(k.transpose(1, 2), cos_k, sin_k)  # (B, Hkv, T, D)
        k = k.repeat_interleave(attention.num_heads // attention.num_kv_heads, dim=1)
        logits = q @ k.transpose(-1, -2) / math.sqrt(attention.head_dim)  # (B, H, S, T): S scoring rows only
        slots = torch.arange(t, device=rows.device)
        allowed = slots[None, None, :] <= rows[:, :, None]  # causal: a query sees keys up to itself
        if state.valid is not None:
            allowed = allowed & state.valid[:, None, :]
        logits = logits.masked_fill(~allowed[:, None], float("-inf"))
        probs = torch.softmax(logits.float(), dim=-1)
        return (probs.mean(dim=1) * weights[..., None]).sum(dim=1)  # (B, T)

    def _scoring_queries(self, state: TokenState, visual: Tensor) -> Tensor:
        """(B, T) bool: the last token (`queries=last`) or the text after the first visual token."""
        if self.queries == "last":
            return _last_slot_mask(state, visual.shape)
        return _text_after_visual(state, visual)


def _slots(shape: torch.Size, device: torch.device) -> Tensor:
    return torch.arange(shape[1], device=device).expand(shape)


def _last_slot_mask(state: TokenState, shape: torch.Size) -> Tensor:
    """(B, T) bool: each row's last real token."""
    slots = _slots(shape, state.hidden.device)
    valid = state.valid if state.valid is not None else torch.ones(shape, dtype=torch.bool, device=slots.device)
    last = torch.where(valid, slots, -1).max(dim=1).values
    return slots == last[:, None]


def _text_after_visual(state: TokenState, visual: Tensor) -> Tensor:
    """(B, T) bool: the real non-visual tokens after each row's first visual token."""
    slots = _slots(visual.shape, visual.device)
    first_visual = torch.where(visual, slots, visual.shape[1]).min(dim=1).values
    valid = state.valid if state.valid is not None else torch.ones_like(visual)
    return valid & ~visual & (slots > first_visual[:, None])


def _query_rows(state: TokenState, queries: Tensor) -> tuple[Tensor, Tensor]:
    """The slots of the `queries` (B, T) of each row, in order and padded with its last token, as
    (B, S) indices, and (B, S) weights averaging over the real ones (0 on padding). A row without
    queries uses its last token."""
    last = _last_slot_mask(state, queries.shape)
    queries = queries | (last & ~queries.any(dim=1, keepdim=True))
    slots = _slots(queries.shape, queries.device)
    counts = queries.sum(dim=1, keepdim=True)
    width = int(counts.max())
    order = torch.where(queries, slots, slots + queries.shape[1]).argsort(dim=1)[:, :width]
    present = torch.arange(width, device=queries.device)[None, :] < counts
    rows = torch.where(present, order, last.long().argmax(dim=1, keepdim=True))
    weights = torch.where(present, 1.0 / counts, torch.zeros_like(counts, dtype=torch.float32)).float()
    return rows, weights


@register_reducer
class PyramidDrop(FastV):
    name = "pdrop"

    def __init__(
        self, layout, num_layers: int, layers: str | int = "", ratio: float = 0.5, queries: str = "last"
    ) -> None:
        stages = parse_layers(self.name, layers, num_layers, self.default_layers(num_layers))
        super().__init__(layout, num_layers, stages[0], ratio, queries)
        self.boundaries = stages
        self.stage_ratio = 1.0 - (1.0 - self.ratio) ** (1.0 / len(stages))  # each stage keeps lambda of what is left
        if self.boundaries[0] == 0:
            raise ConfigError(
                f"reducer {self.name}: stage boundaries are layers >= 1 (a stage before the first layer is prellm's)"
            )

    @staticmethod
    def default_layers(num_layers: int) -> list[int]:
        """PyramidDrop's default: four stages of equal depth, a drop at each inner boundary."""
        return quarters(num_layers)

    def keep_count(self, counts: Tensor) -> Tensor:
        return counts - torch.floor(counts.float() * self.stage_ratio).long()

    def before_llm(self, state: TokenState, cache: KVCache | None) -> TokenState:
        return state

    def on_layer_end(self, layer_idx: int, state: TokenState, cache: KVCache | None) -> TokenState:
        layer = layer_idx + 1
        if layer not in self.boundaries or self.ratio == 0.0:
            return state
        return self.reduce(state, cache, lambda s, v: self.attention_received(s, v, layer), layer)


def quarters(num_layers: int) -> list[int]:
    """The inner boundaries of four stages of equal depth (at least layer 1)."""
    bounds = sorted({round(num_layers * q / 4) for q in (1, 2, 3)} - {0, num_layers})
    return bounds or [1]


def parse_layers(name: str, layers: str | int, num_layers: int, default: list[int]) -> list[int]:
    """`2/6/9` (or one int) -> [2, 6, 9], checked increasing and inside the model; `default` when empty."""
    try:
        stages = [int(v) for v in str(layers).split("/") if v] if layers != "" else default
    except ValueError:
        stages = []
    if not stages or stages != sorted(set(stages)):
        raise ConfigError(f"reducer {name}: layers must be increasing, e.g. layers=2/4/6, got {layers!r}")
    return [check_layer(name, layer, num_layers) for layer in stages]


@register_reducer
class Dart(_LayerReducer):
    name = "dart"

    def __init__(self, layout, num_layers: int, layer: int = 2, ratio: float = 0.5, pivots: int = 8) -> None:
        super().__init__(layout, num_layers, layer, ratio)
        if pivots < 1:
            raise ConfigError(f"reducer dart: pivots must be >= 1, got {pivots}")
        self.pivots = int(pivots)

    def keep_count(self, counts: Tensor) -> Tensor:
        return torch.maximum(super().keep_count(counts), torch.clamp(counts, max=self.pivots))

    def score(self, state: TokenState, visual: Tensor) -> Tensor:
        hidden = state.hidden.float()
        norms = hidden.norm(dim=-1).masked_fill(~visual, float("-inf"))
        k = min(self.pivots, hidden.shape[1])
        pivot_index = norms.topk(k, dim=1).indices  # (B, k); rows with fewer visual tokens get some non-visual
        pivot_ok = visual.gather(1, pivot_index)
        pivots = F.normalize(hidden.gather(1, pivot_index[..., None].expand(-1, -1, hidden.shape[-1])), dim=-1)
        unit = F.normalize(hidden, dim=-1)
        similarity = (unit @ pivots.transpose(1, 2)).masked_fill(~pivot_ok[:, None, :], float("-inf"))
        score = -similarity.max(dim=-1).values  # least similar to every pivot first
        is_pivot = torch.zeros_like(visual).scatter(1, pivot_index, pivot_ok)
        return score.masked_fill(is_pivot, float("inf"))  # pivots are always kept


RECYCLED_PER_MERGED = 10  # SparseVLM's cluster_and_merge makes one cluster per ~10 recycled tokens
SPARSEVLM_LAYERS_OF_32 = (2, 6, 15)  # the official code's pruning layers in LLaVA's 32-layer LLM


@register_reducer
class SparseVLM(PyramidDrop):
    name = "sparsevlm"

    def __init__(
        self, layout, num_layers: int, layers: str | int = "", ratio: float = 0.5, recycle: float = 0.03
    ) -> None:
        super().__init__(layout, num_layers, layers, ratio, "text")
        if not 0.0 <= recycle <= 1.0:
            raise ConfigError(f"reducer sparsevlm: recycle must be in [0, 1], got {recycle}")
        self.recycle = float(recycle)
        self.stage_ratio = 1.0 - (1.0 - self.ratio) ** (1.0 / len(self.boundaries))
        self.raters: Tensor | None = None  # (B, T) over the prompt's input slots, chosen on the embeddings

    @staticmethod
    def default_layers(num_layers: int) -> list[int]:
        """SparseVLM's layers 2/6/15 of 32, at the same relative depths (at least layer 1)."""
        return sorted({max(1, round(num_layers * layer / 32)) for layer in SPARSEVLM_LAYERS_OF_32} - {num_layers})

    def keep_count(self, counts: Tensor) -> Tensor:
        return counts - torch.floor(counts.float() * self.stage_ratio).long()

    def before_llm(self, state: TokenState, cache: KVCache | None) -> TokenState:
        if state.hidden.shape[1] > 1:
            self.raters = self._choose_raters(state, self.visual(state))
        return state

    def on_layer_end(self, layer_idx: int, state: TokenState, cache: KVCache | None) -> TokenState:
        layer = layer_idx + 1
        if layer not in self.boundaries or self.ratio == 0.0 or state.hidden.shape[1] == 1:
            return state  # decode steps pass through
        return self._prune_and_recycle(state, cache, layer)

    def _choose_raters(self, state: TokenState, visual: Tensor) -> Tensor:
        """The text after the first visual token that the visual tokens attend to more than average:
        per row, softmax over that text of the visual-text embedding products, averaged over the
        visual tokens, above its mean. A row whose relevance picks none keeps all that text."""
        text = _text_after_visual(state, visual)
        raters = text.clone()
        hidden = state.hidden.float()
        for row in range(visual.shape[0]):
            if not bool(visual[row].any()) or not bool(text[row].any()):
                continue
            relevance = (hidden[row, visual[row]] @ hidden[row, text[row]].T).softmax(dim=-1).mean(dim=0)
            chosen = relevance > relevance.mean()
            if bool(chosen.any()):
                raters[row, text[row]] = chosen
        return raters

    def _prune_and_recycle(self, state: TokenState, cache: KVCache | None, layer: int) -> TokenState:
        source = state.source_index
        raters = self.raters.gather(1, source.clamp(min=0)) & (source >= 0)
        visual = self.visual(state)

        def score(s: TokenState, v: Tensor) -> Tensor:
            return self.attention_received(s, v, layer, raters)

        if self.recycle == 0.0 or not bool(visual.any()):
            return self.reduce(state, cache, score, layer)
        scores = score(state, visual).masked_fill(~visual, float("-inf"))
        counts = visual.sum(dim=1)
        budget = self.keep_count(counts)  # visual slots after this stage, merged ones included
        merged = torch.minimum(torch.ceil((counts - budget).float() * self.recycle).long(), budget)
        selected = budget - merged
        order = scores.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, _slots(order.shape, order.device))
        keep = ~visual | (rank < selected[:, None])
        hidden = state.hidden.clone()
        for row in range(hidden.shape[0]):
            clusters = int(merged[row])
            if clusters == 0:
                continue
            first = int(selected[row])
            pool = order[row, first : min(first + RECYCLED_PER_MERGED * clusters, int(counts[row]))]
            centers, assignment = density_peak_clusters(hidden[row, pool].float(), clusters)
            # Underflowed scores still count, so a cluster never divides by zero.
            weights = scores[row, pool].clamp(min=torch.finfo(torch.float32).tiny)
            totals = weights.new_zeros(clusters).index_add_(0, assignment, weights)
            sums = weights.new_zeros(clusters, hidden.shape[-1]).index_add_(
                0, assignment, hidden[row, pool].float() * weights[:, None]
            )
            hidden[row, pool[centers]] = (sums / totals[:, None]).to(hidden.dtype)
            keep[row, pool[centers]] = True
        if state.valid is not None:
            keep &= state.valid
        self.kept_counts = budget.tolist()
        self.record(layer, keep)
        return keep_tokens(replace(state, hidden=hidden), keep)


def density_peak_clusters(features: Tensor, clusters: int) -> tuple[Tensor, Tensor]:
    """SparseVLM's clustering (DPC-KNN, Du et al. 2016) of `features` (P, C): each token's density
    is exp(-mean squared distance to its `clusters` nearest), its separation the distance to the
    nearest denser token; the `clusters` tokens with the largest density x separation are the
    centers. Returns the centers' indices (clusters,) and each token's cluster (P,)."""
    distance = torch.cdist(features[None], features[None])[0] / math.sqrt(features.shape[-1])
    nearest = distance.topk(min(clusters, features.shape[0]), dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    separation = torch.where(denser, distance, distance.max()).min(dim=-1).values
    centers = (separation * density).argsort(descending=True, stable=True)[:clusters]
    assignment = distance[:, centers].argmin(dim=-1)
    assignment[centers] = torch.arange(clusters, device=features.device)
    return centers, assignment
