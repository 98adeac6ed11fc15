"""Training-free visual-token reducers, each registered under its spec name.

fastv   FastV (Chen et al. 2024, "An Image is Worth 1/2 Tokens After Layer 2"): before layer
        `layer`, rank the visual tokens by the attention they receive from the last query
        (`queries=last`) or from every text query after the first visual token
        (`queries=text`), averaged over heads, and drop `ratio` of them. The scores come from
        that layer's own queries and keys, for the scoring rows only, so no full attention
        matrix is built and every layer keeps running SDPA. Ranking is per sample.
dart    DART (Wen et al. 2025, "Stop Looking for Important Tokens ... Duplication Matters
        More"): before layer `layer`, pick `pivots` visual tokens (largest hidden-state norm),
        and keep those and the tokens least similar (cosine) to any pivot, dropping `ratio`
        of the visual tokens; no attention is needed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mmllm.errors import ConfigError
from mmllm.model.backbone import KVCache, TokenState, apply_rope
from mmllm.model.reducers.base import TokenReducer, check_layer, check_ratio, register_reducer


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

    def attention_received(self, state: TokenState, visual: Tensor, layer_index: int) -> Tensor:
        """(B, T): the attention each token receives from the scoring queries at layer `layer_index`,
        averaged over heads (and over the scoring queries)."""
        if not self._model:
            raise ConfigError(
                f"reducer {self.name}: attach it with attach_reducer(model, spec) so it can read the layer"
            )
        backbone = self._model[0]
        layer = backbone.layers[layer_index]
        attention = layer.self_attn
        normed = layer.input_layernorm(state.hidden)
        rows = self._scoring_rows(state, visual)  # (B, S) slot indices of the scoring queries
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
        weights = self._row_weights(state, visual, rows)  # (B, S): 1 for real scoring rows, 0 for padding
        return (probs.mean(dim=1) * weights[..., None]).sum(dim=1)  # (B, T)

    def _scoring_rows(self, state: TokenState, visual: Tensor) -> Tensor:
        b, t = visual.shape
        slots = torch.arange(t, device=visual.device).expand(b, t)
        valid = state.valid if state.valid is not None else torch.ones_like(visual)
        last = torch.where(valid, slots, -1).max(dim=1).values
        if self.queries == "last":
            return last[:, None]
        first_visual = torch.where(visual, slots, t).min(dim=1).values
        text = valid & ~visual & (slots > first_visual[:, None])
        count = int(text.sum(dim=1).max())
        if count == 0:
            return last[:, None]
        order = torch.where(text, slots, slots + t).argsort(dim=1)[:, :count]
        present = torch.arange(count, device=visual.device)[None, :] < text.sum(dim=1, keepdim=True)
        return torch.where(present, order, last[:, None])

    def _row_weights(self, state: TokenState, visual: Tensor, rows: Tensor) -> Tensor:
        if rows.shape[1] == 1:
            return torch.ones_like(rows, dtype=torch.float32)
        b, t = visual.shape
        slots = torch.arange(t, device=visual.device).expand(b, t)
        first_visual = torch.where(visual, slots, t).min(dim=1).values
        valid = state.valid if state.valid is not None else torch.ones_like(visual)
        text = valid & ~visual & (slots > first_visual[:, None])
        counts = text.sum(dim=1, keepdim=True).clamp(min=1)
        present = torch.arange(rows.shape[1], device=rows.device)[None, :] < text.sum(dim=1, keepdim=True)
        return torch.where(present, 1.0 / counts, torch.zeros_like(counts, dtype=torch.float32)).float()


@register_reducer
class PyramidDrop(FastV):
    name = "pdrop"

    def __init__(
        self, layout, num_layers: int, layers: str | int = "", ratio: float = 0.5, queries: str = "last"
    ) -> None:
        stages = [int(v) for v in str(layers).split("/") if v] if layers != "" else _quarters(num_layers)
        if not stages or stages != sorted(set(stages)):
            raise ConfigError(f"reducer pdrop: layers must be increasing, e.g. layers=2/4/6, got {layers!r}")
        super().__init__(layout, num_layers, stages[0], ratio, queries)
        self.boundaries = [check_layer(self.name, layer, num_layers) for layer in stages]
        if self.boundaries[0] == 0:
            raise ConfigError(
                "reducer pdrop: stage boundaries are layers >= 1 (a stage before the first layer is prellm's)"
            )

    def before_llm(self, state: TokenState, cache: KVCache | None) -> TokenState:
        return state

    def on_layer_end(self, layer_idx: int, state: TokenState, cache: KVCache | None) -> TokenState:
        layer = layer_idx + 1
        if layer not in self.boundaries or self.ratio == 0.0:
            return state
        return self.reduce(state, cache, lambda s, v: self.attention_received(s, v, layer), layer)


def _quarters(num_layers: int) -> list[int]:
    """PyramidDrop's default: four stages of equal depth, a drop at each inner boundary."""
    bounds = sorted({round(num_layers * q / 4) for q in (1, 2, 3)} - {0, num_layers})
    return bounds or [1]


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
