"""Reference plug-ins at the backbone's hook points (see `BackboneHook` in backbone.py).

Each shows one way a plug-in changes the sequence, with the KV cache and rotary positions
kept right for later decode steps; the token reducers and latent-reasoning heads build on them:

* `DropTokens`     removes tokens after a layer (FastV-style pruning);
* `FeedbackLatent` feeds the last hidden state back as the next input embedding (Coconut);
* `InsertTokens`   inserts learned tokens after a marker token (registers after each image).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from mmllm.model.backbone import BackboneHook, KVCache, TokenState


class DropTokens(BackboneHook):
    """After layer `layer`, keep only the tokens `select(state)` marks True.

    Later layers, their KV cache and the logits see only the kept tokens. Kept tokens keep
    their rotary positions, so decoding continues at the position after the last input token
    whatever was dropped. `select` must keep the same number of tokens in every row.
    """

    def __init__(self, layer: int, select: Callable[[TokenState], Tensor]) -> None:
        super().__init__()
        self.layer = layer
        self.select = select

    def on_layer_end(self, layer_idx: int, state: TokenState, cache: KVCache | None) -> TokenState:
        if layer_idx != self.layer:
            return state
        keep = self.select(state)
        counts = keep.sum(dim=1)
        if not bool((counts == counts[0]).all()):
            raise ValueError(f"DropTokens must keep the same number of tokens per row, got {counts.tolist()}")
        if bool(keep.all()):
            return state
        index = keep.nonzero()[:, 1].view(keep.shape[0], -1)  # row-major, so in time order
        return state.select(index)


class FeedbackLatent(BackboneHook):
    """Continuous thought (Coconut, Hao et al. 2024): a `latent_id` token's input embedding is the
    last hidden state of the previous forward, optionally through a learned projection.

    A latent token must be the first token of its forward, whose predecessor is the previous
    forward's last token: the caller feeds latent steps one forward at a time, with a KV cache
    carrying everything before (as the generator and the latent trainer do).
    """

    def __init__(self, latent_id: int, hidden_size: int, projection: bool | nn.Module = False) -> None:
        """`projection`: False feeds the state as it is, True through a fresh Linear, a module through it."""
        super().__init__()
        self.latent_id = latent_id
        if isinstance(projection, nn.Module):
            self.projection = projection
        else:
            self.projection = nn.Linear(hidden_size, hidden_size) if projection else None
        self.last_hidden: Tensor | None = None

    def on_embed(self, state: TokenState, cache: KVCache | None) -> TokenState:
        is_latent = state.token_ids == self.latent_id
        if not bool(is_latent.any()):
            return state
        if bool(is_latent[:, 1:].any()):
            raise ValueError("feed latent tokens one forward at a time, each as the first token of its forward")
        if self.last_hidden is None:
            raise ValueError("a latent token needs the hidden state of a previous forward")
        fed = self.last_hidden if self.projection is None else self.projection(self.last_hidden)
        first = torch.where(is_latent[:, :1, None], fed[:, None].to(state.hidden.dtype), state.hidden[:, :1])
        state.hidden = torch.cat([first, state.hidden[:, 1:]], dim=1)
        return state

    def on_output(self, state: TokenState, cache: KVCache | None) -> TokenState:
        self.last_hidden = state.hidden[:, -1]
        return state


class InsertTokens(BackboneHook):
    """Insert `num_tokens` learned embeddings after every `after_id` token (e.g. `<|eoi|>`).

    Tokens after an insertion move `num_tokens` positions later; inserted tokens carry token
    id -1 and source index -1 (no label). Rows with fewer insertions are right-padded with
    invalid slots, which nothing attends to.
    """

    def __init__(self, after_id: int, num_tokens: int, hidden_size: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.after_id = after_id
        self.embeddings = nn.Parameter(torch.randn(num_tokens, hidden_size) * init_std)

    def on_embed(self, state: TokenState, cache: KVCache | None) -> TokenState:
        hits = state.token_ids == self.after_id
        if not bool(hits.any()):
            return state
        k = self.embeddings.shape[0]
        b, t = hits.shape
        device = hits.device
        before = hits.long().cumsum(dim=1) - hits.long()  # insertions earlier in the row
        shift = k * before
        if state.document_ids is not None:  # positions only shift within their own document
            starts = torch.ones_like(hits)
            starts[:, 1:] = state.document_ids[:, 1:] != state.document_ids[:, :-1]
            shift = shift - torch.where(starts, shift, torch.zeros_like(shift)).cummax(dim=1).values
        dest = torch.arange(t, device=device) + k * before  # new slot of each original token
        new_t = int((t + k * hits.sum(dim=1)).max())
        rows = torch.arange(b, device=device)[:, None]

        hidden = state.hidden.new_zeros(b, new_t, state.hidden.shape[-1])
        positions = torch.zeros(b, new_t, dtype=torch.long, device=device)
        token_ids = torch.full((b, new_t), -1, dtype=torch.long, device=device)
        source = torch.full((b, new_t), -1, dtype=torch.long, device=device)
        valid = torch.zeros(b, new_t, dtype=torch.bool, device=device)
        documents = torch.zeros(b, new_t, dtype=torch.long, device=device)
        old_valid = state.valid if state.valid is not None else torch.ones_like(hits)
        old_docs = state.document_ids if state.document_ids is not None else torch.zeros_like(state.position_ids)

        key_bias = None if state.key_bias is None else state.key_bias.new_zeros(b, new_t)  # inserted: no bias
        hidden[rows, dest] = state.hidden
        positions[rows, dest] = state.position_ids + shift
        token_ids[rows, dest] = state.token_ids
        source[rows, dest] = state.source_index
        valid[rows, dest] = old_valid
        documents[rows, dest] = old_docs
        if key_bias is not None:
            key_bias[rows, dest] = state.key_bias
        hit_rows, hit_cols = hits.nonzero(as_tuple=True)
        for j in range(k):
            slot = dest[hit_rows, hit_cols] + 1 + j
            hidden[hit_rows, slot] = self.embeddings[j].to(hidden.dtype)
            positions[hit_rows, slot] = positions[hit_rows, dest[hit_rows, hit_cols]] + 1 + j
            valid[hit_rows, slot] = old_valid[hit_rows, hit_cols]
            documents[hit_rows, slot] = old_docs[hit_rows, hit_cols]
        return TokenState(
            hidden=hidden,
            position_ids=positions,
            token_ids=token_ids,
            valid=None if bool(valid.all()) else valid,
            document_ids=documents if state.document_ids is not None else None,
            source_index=source,
            key_bias=key_bias,
        )
