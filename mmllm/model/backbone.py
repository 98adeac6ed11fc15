"""The mmllm decoder-only transformer, all of it in this one file.

Llama family: RMSNorm, rotary position embeddings (theta and scaling), SwiGLU MLP and
grouped-query attention through `scaled_dot_product_attention`, with options for qkv bias,
q/k-norm (Qwen3), tied embeddings, sliding windows (Mistral) and a z-loss. Parameter names
equal Hugging Face's (`model.layers.0.self_attn.q_proj.weight`), so HF checkpoints load as
they are and peft adapters apply to this model and to its HF export alike.

Three things HF's implementation does not give us, and the reason this file exists:

* Packed rows. `document_ids` keep attention inside each document, and positions restart
  per document, so pretraining packs without cross-document leakage. A masked prefill on
  CPU attends in tiles of queries, each over the keys it can see (`TiledMask`), so a row of short
  documents skips most of the query-key scores one whole-mask SDPA call computes.
* An explicit `KVCache` whose layers may hold different numbers of tokens, with each slot's
  rotary position and validity recorded, so a plug-in may drop tokens mid-network and later
  decode steps still attend to the right keys at the right positions.
* Hook points in the layer loop (`BackboneHook`), where reducers and latent heads attach
  with one call instead of patching anyone's code:

      on_embed(state)                after the token embedding, before layer 0
      on_layer_end(i, state)         after layer i; may drop, merge or reorder tokens
      on_output(state)               after the final norm, before the LM head

  Each receives the sequence as a `TokenState` and returns it, changed or not. A hook that
  changes the number of tokens keeps every field of the state aligned (see `TokenState`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmllm.errors import ConfigError, InputError
from mmllm.model.config import ModelConfig
from mmllm.model.loss import IGNORE_INDEX, cross_entropy

# --------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 (as HF does) so bf16 activations keep their small differences.
        h = x.float()
        normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_frequencies(config: ModelConfig) -> tuple[Tensor, float]:
    """Inverse frequencies of RoPE and the factor applied to cos/sin, for the config's scaling.

    Formulas follow the papers as HF implements them: linear position interpolation
    (Chen et al. 2023), Llama 3.1's wavelength-banded scaling, and YaRN (Peng et al. 2023).
    """
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = dict(config.rope_scaling or {})
    kind = scaling.pop("rope_type", scaling.pop("type", "default"))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn_frequencies(config, scaling)
    raise ConfigError(f"rope_type '{kind}' is not supported (supported: default, linear, llama3, yarn)")


def _yarn_frequencies(config: ModelConfig, scaling: dict[str, Any]) -> tuple[Tensor, float]:
    dim, base = config.head_dim, config.rope_theta
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or config.max_position_embeddings / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(scaling.get("beta_fast") or 32), correction_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoids a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin of each position, computed in fp32 from the positions (no table to outgrow).

    The frequencies are a plain attribute, not a buffer, so casting the model to bf16 never
    rounds them; they follow the positions' device on first use.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.inv_freq, self.attention_scaling = rope_frequencies(config)

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if self.inv_freq.device != position_ids.device:
            self.inv_freq = self.inv_freq.to(position_ids.device)
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, T, D/2)
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = (angles.cos() * self.attention_scaling).to(dtype)
        sin = (angles.sin() * self.attention_scaling).to(dtype)
        return cos[:, None], sin[:, None]  # broadcast over heads


def rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + rotate_half(x) * sin


# --------------------------------------------------------------------------------------
# The sequence as the layer loop sees it, and the KV cache


@dataclass
class TokenState:
    """The tokens flowing through the layer loop; hooks receive and return one.

    All tensors are (B, T) except `hidden` (B, T, C). A hook that inserts or removes tokens
    updates every field so index t still describes the same token everywhere.
    """

    hidden: Tensor
    position_ids: Tensor  # rotary position of each token
    token_ids: Tensor | None  # input id of each token; -1 where it has none (inserted, fed back)
    valid: Tensor | None  # False on padding; None when every token is real
    document_ids: Tensor | None  # packed-row document of each token; None for one per row
    source_index: Tensor  # index of each token in the forward's input; -1 for inserted ones
    # fp32, added to the attention logit of every query that attends to the token, in this and
    # later forwards (the KV cache keeps it): ToMe's proportional attention, log of a merged
    # token's size. None: zero everywhere, and attention keeps its mask-free paths.
    key_bias: Tensor | None = None

    def select(self, index: Tensor) -> TokenState:
        """Keep the tokens at `index` (B, T') of every row, in that order."""

        def take(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.gather(1, index)

        hidden = self.hidden.gather(1, index[..., None].expand(-1, -1, self.hidden.shape[-1]))
        return TokenState(
            hidden=hidden,
            position_ids=take(self.position_ids),
            token_ids=take(self.token_ids),
            valid=take(self.valid),
            document_ids=take(self.document_ids),
            source_index=take(self.source_index),
            key_bias=take(self.key_bias),
        )


class LayerKV:
    """One layer's cached keys and values, with each slot's rotary position, validity and key bias.

    Slots are in time order, which is what causality is checked against. Without gradients
    the buffers are preallocated and written in place (grown by doubling); with gradients
    (latent-thought training) they are concatenated so autograd sees every step.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.length = 0
        self.all_valid = True  # no padding slot cached: attention may skip the validity mask
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self.positions: Tensor | None = None
        self.valid: Tensor | None = None
        self.key_bias: Tensor | None = None  # fp32 (B, capacity); None until a slot with a bias is cached

    def append(
        self, keys: Tensor, values: Tensor, positions: Tensor, valid: Tensor | None, key_bias: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Add (B, H, T, D) keys/values (`valid` None: all real; `key_bias` None: zero); return every
        cached key and value so far."""
        new_len = self.length + keys.shape[2]
        if valid is None:
            valid = torch.ones_like(positions, dtype=torch.bool)
        else:
            self.all_valid = self.all_valid and bool(valid.all())
        biased = key_bias is not None or self.key_bias is not None
        if biased:
            key_bias = torch.zeros_like(positions, dtype=torch.float32) if key_bias is None else key_bias.float()
        if torch.is_grad_enabled() and (keys.requires_grad or values.requires_grad):
            n = self.length
            self.keys = keys if n == 0 else torch.cat((self.keys[:, :, :n], keys), dim=2)
            self.values = values if n == 0 else torch.cat((self.values[:, :, :n], values), dim=2)
            self.positions = positions if n == 0 else torch.cat((self.positions[:, :n], positions), dim=1)
            self.valid = valid if n == 0 else torch.cat((self.valid[:, :n], valid), dim=1)
            if biased:
                old_bias = self.key_bias[:, :n] if self.key_bias is not None else key_bias.new_zeros(keys.shape[0], n)
                self.key_bias = torch.cat((old_bias, key_bias), dim=1)
            self.length = new_len
            return self.keys, self.values
        if self.keys is None or new_len > self.keys.shape[2] or self.keys.requires_grad:
            self._grow(keys, values, max(new_len, self.capacity, 2 * self.length))
        if biased and self.key_bias is None:
            self.key_bias = torch.zeros(self.positions.shape, dtype=torch.float32, device=keys.device)
        s = slice(self.length, new_len)
        self.keys[:, :, s] = keys
        self.values[:, :, s] = values
        self.positions[:, s] = positions
        self.valid[:, s] = valid
        if biased:
            self.key_bias[:, s] = key_bias
        self.length = new_len
        return self.keys[:, :, :new_len], self.values[:, :, :new_len]

    def _grow(self, keys: Tensor, values: Tensor, capacity: int) -> None:
        b, h, _, d = keys.shape
        old = (self.keys, self.values, self.positions, self.valid, self.key_bias)
        self.keys = keys.new_empty(b, h, capacity, d)
        self.values = values.new_empty(b, h, capacity, values.shape[-1])
        self.positions = torch.zeros(b, capacity, dtype=torch.long, device=keys.device)
        self.valid = torch.zeros(b, capacity, dtype=torch.bool, device=keys.device)
        if old[4] is not None:
            self.key_bias = torch.zeros(b, capacity, dtype=torch.float32, device=keys.device)
        if old[0] is not None:
            n = self.length
            self.keys[:, :, :n], self.values[:, :, :n] = old[0][:, :, :n].detach(), old[1][:, :, :n].detach()
            self.positions[:, :n], self.valid[:, :n] = old[2][:, :n], old[3][:, :n]
            if old[4] is not None:
                self.key_bias[:, :n] = old[4][:, :n]

    def key_meta(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """Positions, validity and key bias (None: zero) (B, length) of the cached slots."""
        n = self.length
        key_bias = None if self.key_bias is None else self.key_bias[:, :n]
        return self.positions[:, :n], self.valid[:, :n], key_bias

    def select_rows(self, rows: Tensor) -> None:
        """Keep only the batch rows `rows` (B',), e.g. when finished sequences leave a batch."""
        if self.keys is None:
            return
        self.keys, self.values = self.keys[rows], self.values[rows]
        self.positions, self.valid = self.positions[rows], self.valid[rows]
        if self.key_bias is not None:
            self.key_bias = self.key_bias[rows]
        self.all_valid = self.all_valid or bool(self.valid[:, : self.length].all())


class KVCache:
    """Keys and values of every layer for incremental decoding.

    Layers may hold different numbers of slots: a hook that drops tokens after layer k leaves
    layers after k shorter. `next_position` is the rotary position the next token of each row
    takes, so decoding continues at the right position whatever was dropped or inserted.
    """

    def __init__(self, num_layers: int, capacity: int = 0) -> None:
        self.layers = [LayerKV(capacity) for _ in range(num_layers)]
        self.next_position: Tensor | None = None

    def __len__(self) -> int:
        """Number of slots the first layer holds (the prompt plus decoded tokens)."""
        return self.layers[0].length

    def select_rows(self, rows: Tensor) -> None:
        """Keep only the batch rows `rows` in every layer."""
        for layer in self.layers:
            layer.select_rows(rows)
        if self.next_position is not None:
            self.next_position = self.next_position[rows]


# --------------------------------------------------------------------------------------
# Attention masks


class AttentionMasks:
    """Builds the SDPA mask for each layer of one forward, or chooses a mask-free path.

    A query attends to a key when the key is an earlier-or-same slot, is valid (not padding),
    belongs to the same document, and lies within the layer's sliding window. Each query also
    attends to itself, so padding queries never see an all-masked row (which makes SDPA NaN).
    The mask is boolean, unless some key carries a bias (`TokenState.key_bias`): then it is
    additive, the key's bias where allowed and -inf elsewhere.
    """

    def __init__(self, state: TokenState, same_keys_per_layer: bool = False) -> None:
        self.state = state
        # True when every layer's cache holds the same slots (no plug-in dropped or inserted
        # tokens), so one mask per window serves every layer of the forward.
        self.same_keys_per_layer = same_keys_per_layer
        self._memo: dict[int | None, tuple[Tensor | TiledMask | None, bool]] = {}

    def get(self, past: int, window: int | None, cache: LayerKV | None) -> tuple[Tensor | TiledMask | None, bool]:
        if past and not self.same_keys_per_layer:  # layers may hold different cached keys: build per layer
            return self._build(past, window, cache)
        if window not in self._memo:  # every layer sees the same keys
            self._memo[window] = self._build(past, window, cache)
        return self._memo[window]

    def _build(self, past: int, window: int | None, cache: LayerKV | None) -> tuple[Tensor | TiledMask | None, bool]:
        s = self.state
        t = s.hidden.shape[1]
        if cache is not None:
            key_pos, key_valid, key_bias = cache.key_meta()
            all_valid = cache.all_valid
        else:
            key_pos, key_valid, key_bias = s.position_ids, s.valid, s.key_bias
            all_valid = key_valid is None or bool(key_valid.all())
        span = int(s.position_ids.max() - key_pos.min()) if window is not None else 0
        within_window = window is None or span < window
        if all_valid and within_window and s.document_ids is None and key_bias is None:
            if past == 0:
                return None, True  # plain causal: SDPA's flash/efficient kernels apply
            if t == 1:
                return None, False  # one new token sees every cached key
        device = s.hidden.device
        q_slot = torch.arange(past, past + t, device=device)
        k_slot = torch.arange(past + t, device=device)
        allowed = (k_slot[None, :] <= q_slot[:, None])[None]  # (1, T, K)
        if key_valid is not None:
            allowed = allowed & key_valid[:, None, :]
        if s.document_ids is not None:
            allowed = allowed & (s.document_ids[:, :, None] == s.document_ids[:, None, :])
        if window is not None:
            allowed = allowed & ((s.position_ids[:, :, None] - key_pos[:, None, :]) < window)
        allowed = (allowed | (k_slot[None, :] == q_slot[:, None])[None])[:, None]  # (B, 1, T, K): broadcast over heads
        mask = allowed
        if key_bias is not None:
            mask = torch.where(allowed, key_bias[:, None, None, :].to(s.hidden.dtype), float("-inf"))
        if past == 0 and t > QUERY_TILE and s.hidden.device.type == "cpu":
            return TiledMask.cut(allowed, mask, QUERY_TILE), False
        return mask, False


# Queries per tile of a masked prefill on CPU. A training step of the demo model on packed rows
# (4 x 1024 tokens, documents of 80-360) took 1.10 s with the whole mask and 0.72 s in tiles of 64
# (fp32, one CPU thread); tiles of 32 and 128 were within 5% of 64. On a GPU, where one SDPA launch
# per tile and layer is not yet measured against the masked kernel, the whole mask is kept.
QUERY_TILE = 64


@dataclass
class TiledMask:
    """A prefill's attention mask cut into tiles of queries, each with the keys its queries can see.

    A query never sees a later key, nor one outside its document or sliding window, so the tile of
    queries [start, end) attends only to keys [first, end), where `first` is the earliest key any
    of them sees. On packed rows and windowed layers that skips most of the T x T scores a
    whole-mask SDPA call computes; each query's result is the same.
    """

    tiles: list[tuple[int, int, int, Tensor]]  # (start, end, first key, mask of queries start:end, keys first:end)

    @classmethod
    def cut(cls, allowed: Tensor, mask: Tensor, tile: int) -> TiledMask:
        """`allowed` (B, 1, T, T) bool, `mask` the same or its additive form."""
        t = allowed.shape[-1]
        tiles_count = -(-t // tile)
        padded = F.pad(allowed.any(dim=(0, 1)), (0, 0, 0, tiles_count * tile - t))  # (tiles x tile, T)
        seen = padded.view(tiles_count, tile, t).any(dim=1)  # (tiles, T): keys some query of the tile sees
        firsts = seen.int().argmax(dim=1).tolist()  # every query sees itself, so each tile sees a key
        return cls(
            [
                (start, min(start + tile, t), first, mask[..., start : start + tile, first : start + tile])
                for start, first in zip(range(0, t, tile), firsts, strict=True)
            ]
        )

    def attend(self, q: Tensor, k: Tensor, v: Tensor, enable_gqa: bool) -> Tensor:
        """SDPA of queries (B, H, T, D) on keys and values (B, H_kv, T, D), tile by tile."""
        return torch.cat(
            [
                F.scaled_dot_product_attention(
                    q[:, :, start:end], k[:, :, first:end], v[:, :, first:end], attn_mask=mask, enable_gqa=enable_gqa
                )
                for start, end, first, mask in self.tiles
            ],
            dim=2,
        )


# --------------------------------------------------------------------------------------
# The transformer


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.window = config.window_for_layer(layer_idx)
        h, q, kv = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(h, q, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, kv, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, kv, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q, h, bias=config.o_proj_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm

    def project(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Rotated queries (B, H, T, D), keys and values (B, H_kv, T, D) of `x`."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        masks: AttentionMasks,
        cache: LayerKV | None,
    ) -> Tensor:
        b, t, _ = x.shape
        q, k, v = self.project(x, rope)
        past = 0
        if cache is not None:
            past = cache.length
            state = masks.state
            k, v = cache.append(k, v, state.position_ids, state.valid, state.key_bias)
        mask, causal = masks.get(past, self.window, cache)
        if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # bf16 autocast on CPU: attention in fp32, exact and 1.9x faster there than the bf16
            # SDPA kernels (forward and backward of the demo model's packed rows, one thread);
            # the projections around it keep their bf16 matmuls.
            with torch.autocast("cpu", enabled=False):
                out = self._attend(q.float(), k.float(), v.float(), mask, causal)
        else:
            out = self._attend(q, k, v, mask, causal)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | TiledMask | None, causal: bool) -> Tensor:
        enable_gqa = self.num_kv_heads != self.num_heads
        if isinstance(mask, TiledMask):
            return mask.attend(q, k, v, enable_gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=enable_gqa)


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=config.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], masks: AttentionMasks, cache: LayerKV | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, masks, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class BackboneHook(nn.Module):
    """Base class of plug-ins at the layer loop's hook points; each method may change the state.

    A hook is an `nn.Module`, so its learned parameters (register tokens, projection heads)
    train and save with the model. Attach with `CausalLM.attach_hook`.
    """

    def on_embed(self, state: TokenState, cache: KVCache | None) -> TokenState:
        return state

    def on_layer_end(self, layer_idx: int, state: TokenState, cache: KVCache | None) -> TokenState:
        return state

    def on_output(self, state: TokenState, cache: KVCache | None) -> TokenState:
        return state


class Backbone(nn.Module):
    """Embedding, decoder layers and final norm: HF's `model.` prefix."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.hooks = nn.ModuleList()
        # Recompute each layer's activations in the backward pass instead of keeping them
        # (training only; the trainer's `activation_checkpointing` option sets it).
        self.activation_checkpointing = False

    def forward(
        self,
        input_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        position_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        document_ids: Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> TokenState:
        state = self._initial_state(input_ids, inputs_embeds, position_ids, attention_mask, document_ids, kv_cache)
        for hook in self.hooks:
            state = hook.on_embed(state, kv_cache)
        if kv_cache is not None:
            kv_cache.next_position = _next_positions(state, kv_cache.next_position)
        rope = self.rotary_emb(state.position_ids, state.hidden.dtype)
        same_keys = not self.hooks and (
            kv_cache is None
            or (len({c.length for c in kv_cache.layers}) == 1 and all(c.key_bias is None for c in kv_cache.layers))
        )
        masks = AttentionMasks(state, same_keys_per_layer=same_keys)
        for i, layer in enumerate(self.layers):
            cache = kv_cache.layers[i] if kv_cache is not None else None
            if self.activation_checkpointing and self.training and cache is None:
                state.hidden = checkpoint(layer, state.hidden, rope, masks, None, use_reentrant=False)
            else:
                state.hidden = layer(state.hidden, rope, masks, cache)
            for hook in self.hooks:
                changed = hook.on_layer_end(i, state, kv_cache)
                if changed is not state:
                    state = changed
                    rope = self.rotary_emb(state.position_ids, state.hidden.dtype)
                    masks = AttentionMasks(state)
        state.hidden = self.norm(state.hidden)
        for hook in self.hooks:
            state = hook.on_output(state, kv_cache)
        return state

    def _initial_state(
        self,
        input_ids: Tensor | None,
        inputs_embeds: Tensor | None,
        position_ids: Tensor | None,
        attention_mask: Tensor | None,
        document_ids: Tensor | None,
        kv_cache: KVCache | None,
    ) -> TokenState:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if document_ids is not None and kv_cache is not None:
            raise ValueError("document_ids (packed rows) are for training; they cannot be combined with a KV cache")
        if input_ids is not None and input_ids.numel():
            low, high = (int(v) for v in torch.aminmax(input_ids))  # one pass, one sync per forward
            if low < 0 or high >= self.config.vocab_size:
                bad = low if low < 0 else high
                raise InputError(f"input id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = hidden.shape[:2]
        device = hidden.device
        valid = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
        if position_ids is None:
            position_ids = default_positions(b, t, device, valid, document_ids, kv_cache)
        token_ids = input_ids if input_ids is not None else torch.full((b, t), -1, device=device)
        source_index = torch.arange(t, device=device).expand(b, t)
        return TokenState(hidden, position_ids, token_ids, valid, document_ids, source_index)


def _next_positions(state: TokenState, previous: Tensor | None) -> Tensor:
    """Per row, one past the largest position of a real token (never moving backwards)."""
    positions = state.position_ids if state.valid is None else state.position_ids.masked_fill(~state.valid, -1)
    following = positions.max(dim=1).values + 1
    return following if previous is None else torch.maximum(following, previous)


def default_positions(
    batch: int,
    length: int,
    device: torch.device,
    valid: Tensor | None,
    document_ids: Tensor | None,
    kv_cache: KVCache | None,
) -> Tensor:
    """Rotary positions: restart per document; skip padding; continue after the cache."""
    if document_ids is not None:
        index = torch.arange(length, device=device).expand(batch, length)
        starts = torch.ones_like(document_ids, dtype=torch.bool)
        starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        first_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
        return index - first_index
    step = valid.long() if valid is not None else torch.ones(batch, length, dtype=torch.long, device=device)
    positions = (step.cumsum(dim=1) - 1).clamp(min=0)
    if kv_cache is not None and kv_cache.next_position is not None:
        positions = positions + kv_cache.next_position[:, None]
    return positions


@dataclass
class CausalLMOutput:
    logits: Tensor
    loss: Tensor | None = None
    hidden_states: Tensor | None = None  # final-norm hidden states, when asked for
    kv_cache: KVCache | None = None
    state: TokenState | None = None  # the sequence after hooks (source_index maps it back)


class CausalLM(nn.Module):
    """Backbone plus LM head and the next-token loss; HF's `*ForCausalLM` layout."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)

    # The accessors transformers models have, which peft uses: LoRA's trainable token rows find
    # the embedding through them, and the head tied to it through `_tied_weights_keys`.
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    @property
    def _tied_weights_keys(self) -> dict[str, str] | None:
        return {"lm_head.weight": "model.embed_tokens.weight"} if self.config.tie_word_embeddings else None

    def attach_hook(self, hook: BackboneHook) -> BackboneHook:
        """Attach a plug-in at the hook points; hooks run in the order attached."""
        self.model.hooks.append(hook)
        return hook

    def detach_hook(self, hook: BackboneHook) -> None:
        self.model.hooks = nn.ModuleList(h for h in self.model.hooks if h is not hook)

    def new_kv_cache(self, capacity: int = 0) -> KVCache:
        """An empty cache; `capacity` preallocates that many slots per layer."""
        return KVCache(self.config.num_hidden_layers, capacity)

    def forward(
        self,
        input_ids: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        position_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        document_ids: Tensor | None = None,
        kv_cache: KVCache | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool = False,
    ) -> CausalLMOutput:
        """Logits for every token (or the last `logits_to_keep`), and the loss when labels are given.

        `attention_mask` (B, T) is 1 for real tokens and 0 for padding, as in HF, and covers
        this forward's tokens only: the KV cache remembers which earlier slots were real. `labels` are
        aligned with the input and shifted here; `IGNORE_INDEX` positions, and the last token
        of each packed document, carry no loss.
        """
        state = self.model(input_ids, inputs_embeds, position_ids, attention_mask, document_ids, kv_cache)
        hidden = state.hidden
        kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        logits = self.lm_head(kept)
        loss = None
        if labels is not None:
            loss = self.next_token_loss(logits, labels, state)
        return CausalLMOutput(
            logits=logits,
            loss=loss,
            hidden_states=hidden if output_hidden_states else None,
            kv_cache=kv_cache,
            state=state,
        )

    def next_token_loss(self, logits: Tensor, labels: Tensor, state: TokenState) -> Tensor:
        """Mean cross-entropy of each token's next label, plus the z-loss when configured."""
        if logits.shape[1] != state.hidden.shape[1]:
            raise ValueError("labels need logits for every position; leave logits_to_keep at 0")
        labels = _labels_for_state(labels, state)
        targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
        if state.document_ids is not None:
            crosses = F.pad(state.document_ids[:, 1:] != state.document_ids[:, :-1], (0, 1), value=False)
            targets = targets.masked_fill(crosses, IGNORE_INDEX)
        return cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), self.config.z_loss)


def _labels_for_state(labels: Tensor, state: TokenState) -> Tensor:
    """Labels re-indexed to the tokens a hook left; inserted tokens carry no label."""
    if state.source_index.shape == labels.shape and bool(
        (state.source_index == torch.arange(labels.shape[1], device=labels.device)).all()
    ):
        return labels
    source = state.source_index
    gathered = labels.gather(1, source.clamp(min=0))
    return gathered.masked_fill(source < 0, IGNORE_INDEX)
