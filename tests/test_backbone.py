"""Backbone behaviour beyond HF parity: causality, packed rows, padding, the KV cache, the loss,
and the three reference hooks that prove the hook points."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mmllm.errors import InputError
from mmllm.model.backbone import IGNORE_INDEX, AttentionMasks, CausalLM, TiledMask, TokenState
from mmllm.model.hooks import DropTokens, FeedbackLatent, InsertTokens

TOLERANCE = dict(atol=1e-5, rtol=0)


@pytest.fixture()
def model(tiny_config):
    torch.manual_seed(0)
    return CausalLM(tiny_config).eval()


def random_ids(shape, seed=0, high=256):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


def test_changing_a_later_token_never_changes_an_earlier_logit(model):
    ids = random_ids((1, 20))
    changed = ids.clone()
    changed[0, 12] = (changed[0, 12] + 1) % 256
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :12], b[:, :12], atol=0, rtol=0)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-4


def test_packed_row_equals_each_document_alone(model):
    docs = [random_ids((1, n), seed=n) for n in (7, 5, 9)]
    packed = torch.cat(docs, dim=1)
    document_ids = torch.cat([torch.full((1, d.shape[1]), i) for i, d in enumerate(docs)], dim=1)
    with torch.no_grad():
        packed_logits = model(packed, document_ids=document_ids).logits
        alone = torch.cat([model(d).logits for d in docs], dim=1)
        unmasked = model(packed).logits
    torch.testing.assert_close(packed_logits, alone, **TOLERANCE)
    assert (unmasked[:, 7:] - alone[:, 7:]).abs().max() > 1e-3  # without document ids they would leak


def test_left_padded_batch_equals_rows_alone(model):
    short, long = random_ids((1, 5), seed=1), random_ids((1, 9), seed=2)
    batch = torch.cat([F.pad(short, (4, 0)), long])
    mask = torch.tensor([[0] * 4 + [1] * 5, [1] * 9])
    with torch.no_grad():
        out = model(batch, attention_mask=mask).logits
        torch.testing.assert_close(out[0, 4:], model(short).logits[0], **TOLERANCE)
        torch.testing.assert_close(out[1], model(long).logits[0], **TOLERANCE)


def test_padded_batch_decodes_with_cache_like_rows_alone(model):
    short, long = random_ids((1, 5), seed=3), random_ids((1, 9), seed=4)
    batch = torch.cat([F.pad(short, (4, 0)), long])
    mask = torch.tensor([[0] * 4 + [1] * 5, [1] * 9])
    nxt = random_ids((2, 3), seed=5)
    cache = model.new_kv_cache(capacity=4)  # small: forces the cache to grow
    with torch.no_grad():
        model(batch, attention_mask=mask, kv_cache=cache)
        steps = torch.cat([model(nxt[:, i : i + 1], kv_cache=cache).logits for i in range(3)], dim=1)
        ref_short = model(torch.cat([short, nxt[:1]], dim=1)).logits[:, -3:]
        ref_long = model(torch.cat([long, nxt[1:]], dim=1)).logits[:, -3:]
    torch.testing.assert_close(steps[:1], ref_short, **TOLERANCE)
    torch.testing.assert_close(steps[1:], ref_long, **TOLERANCE)
    assert cache.next_position.tolist() == [8, 12]


def test_cache_with_gradients_equals_full_forward(model):
    """Latent-thought training reuses a prefix cache with autograd on; results must match."""
    ids = random_ids((2, 10))
    cache = model.new_kv_cache()
    prefix = model(ids[:, :6], kv_cache=cache).logits
    rest = model(ids[:, 6:], kv_cache=cache).logits
    full = model(ids).logits
    torch.testing.assert_close(torch.cat([prefix, rest], dim=1), full, **TOLERANCE)
    torch.cat([prefix, rest], dim=1).sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_loss_skips_ignored_labels_and_document_boundaries(model):
    ids = random_ids((1, 10))
    labels = ids.clone()
    labels[0, :3] = IGNORE_INDEX
    docs = torch.tensor([[0] * 6 + [1] * 4])
    out = model(ids, labels=labels, document_ids=docs)
    logits = out.logits[0]
    # targets: position t predicts label t+1; position 5 is a document's last token
    positions = [t for t in range(9) if t + 1 >= 3 and t != 5]
    expected = F.cross_entropy(logits[positions], ids[0, [t + 1 for t in positions]])
    torch.testing.assert_close(out.loss, expected, **TOLERANCE)


def test_z_loss_adds_mean_squared_log_partition(tiny_config):
    torch.manual_seed(0)
    plain = CausalLM(tiny_config)
    with_z = CausalLM(dataclasses.replace(tiny_config, z_loss=1e-2))
    with_z.load_state_dict(plain.state_dict())
    ids = random_ids((2, 8))
    base, total = plain(ids, labels=ids), with_z(ids, labels=ids)
    log_z = torch.logsumexp(base.logits[:, :-1].float(), dim=-1)
    torch.testing.assert_close(total.loss - base.loss, 1e-2 * log_z.pow(2).mean(), **TOLERANCE)


@pytest.mark.parametrize("bad", [-1, 256, 10_000])
def test_out_of_range_ids_are_named(model, bad):
    with pytest.raises(InputError, match=f"input id {bad} is outside the vocabulary \\[0, 256\\)"):
        model(torch.tensor([[1, bad, 2]]))


def test_tied_embeddings_share_one_matrix(tiny_config):
    model = CausalLM(dataclasses.replace(tiny_config, tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == model.config.num_parameters()


# ---------------------------------------------------------------------- hooks


def test_drop_hook_keeps_cache_and_positions_right(model):
    """Tokens dropped after layer 0: later cached decode steps equal a full recompute."""
    prompt = random_ids((2, 12), seed=6, high=200)
    prompt[:, 2:8] = 200 + torch.arange(6)  # ids 200..205 stand in for an image span
    drop = DropTokens(layer=0, select=lambda s: ~((s.token_ids >= 200) & (s.token_ids < 206)))
    model.attach_hook(drop)
    continuation = random_ids((2, 4), seed=7, high=200)
    cache = model.new_kv_cache()
    with torch.no_grad():
        out = model(prompt, kv_cache=cache)
        assert out.logits.shape[1] == 6  # 12 tokens, 6 dropped after layer 0
        assert out.state.position_ids[0].tolist() == [0, 1, 8, 9, 10, 11]
        assert [layer.length for layer in cache.layers] == [12, 6]
        steps = [model(continuation[:, i : i + 1], kv_cache=cache).logits for i in range(4)]
        reference = model(torch.cat([prompt, continuation], dim=1)).logits[:, -4:]
    torch.testing.assert_close(torch.cat(steps, dim=1), reference, **TOLERANCE)
    assert cache.next_position.tolist() == [16, 16]
    model.detach_hook(drop)
    with torch.no_grad():
        undropped = model(torch.cat([prompt, continuation], dim=1)).logits[:, -4:]
    assert (undropped - reference).abs().max() > 1e-4  # dropping changed something


def test_drop_hook_equals_running_later_layers_on_kept_tokens(model):
    """An independent reference: layer 0 on all tokens, layer 1 only on the kept ones."""
    ids = random_ids((1, 10), seed=8)
    keep = torch.ones(1, 10, dtype=torch.bool)
    keep[0, [2, 3, 7]] = False
    model.attach_hook(DropTokens(0, lambda s: keep))
    with torch.no_grad():
        hooked = model(ids).logits
        bare = CausalLM(model.config).eval()
        bare.load_state_dict(model.state_dict(), strict=False)
        positions = torch.arange(10)[None]
        h = bare.model.embed_tokens(ids)

        def run(layer, hidden, pos):
            state = TokenState(hidden, pos, None, None, None, pos)
            rope = bare.model.rotary_emb(pos, hidden.dtype)
            return layer(hidden, rope, AttentionMasks(state), None)

        h = run(bare.model.layers[0], h, positions)
        h, kept_pos = h[:, keep[0]], positions[:, keep[0]]
        h = run(bare.model.layers[1], h, kept_pos)
        expected = bare.lm_head(bare.model.norm(h))
    torch.testing.assert_close(hooked, expected, **TOLERANCE)


def test_feedback_hook_cached_equals_uncached(model):
    latent_id = 255
    hook = model.attach_hook(FeedbackLatent(latent_id, model.config.hidden_size, projection=True))
    prompt, answer = random_ids((2, 6), seed=9, high=200), random_ids((2, 3), seed=10, high=200)
    latent = torch.full((2, 1), latent_id)
    cache = model.new_kv_cache()
    fed = []
    with torch.no_grad():
        logits = [model(prompt, kv_cache=cache).logits]
        for _ in range(3):
            fed.append(hook.projection(hook.last_hidden))
            logits.append(model(latent, kv_cache=cache).logits)
        logits.append(model(answer, kv_cache=cache).logits)
        cached = torch.cat(logits, dim=1)
        # Uncached reference: one forward whose latent positions carry the fed-back embeddings.
        model.detach_hook(hook)
        embeds = model.model.embed_tokens(torch.cat([prompt, answer], dim=1))
        embeds = torch.cat([embeds[:, :6], torch.stack(fed, dim=1), embeds[:, 6:]], dim=1)
        uncached = model(inputs_embeds=embeds).logits
    torch.testing.assert_close(cached, uncached, **TOLERANCE)
    # The fed-back state is the previous forward's output, not the latent token's own embedding.
    assert (fed[0] - hook.projection(model.model.embed_tokens.weight[latent_id])).abs().max() > 1e-3


def test_feedback_hook_refuses_a_latent_without_history(model):
    model.attach_hook(FeedbackLatent(255, model.config.hidden_size))
    with pytest.raises(ValueError, match="previous forward"):
        model(torch.tensor([[255]]))


def test_insert_hook_matches_spliced_embeddings_and_decodes(model):
    marker, k = 250, 3
    hook = model.attach_hook(InsertTokens(after_id=marker, num_tokens=k, hidden_size=model.config.hidden_size))
    prompt = random_ids((2, 8), seed=11, high=200)
    prompt[:, 4] = marker
    nxt = random_ids((2, 2), seed=12, high=200)
    cache = model.new_kv_cache()
    with torch.no_grad():
        out = model(prompt, kv_cache=cache)
        assert out.logits.shape[1] == 8 + k
        assert out.state.source_index[0].tolist() == [0, 1, 2, 3, 4, -1, -1, -1, 5, 6, 7]
        steps = torch.cat([model(nxt[:, i : i + 1], kv_cache=cache).logits for i in range(2)], dim=1)
        assert cache.next_position.tolist() == [13, 13]
        model.detach_hook(hook)
        embeds = model.model.embed_tokens(torch.cat([prompt, nxt], dim=1))
        spliced = torch.cat([embeds[:, :5], hook.embeddings[None].expand(2, -1, -1), embeds[:, 5:]], dim=1)
        reference = model(inputs_embeds=spliced).logits
    torch.testing.assert_close(out.logits, reference[:, : 8 + k], **TOLERANCE)
    torch.testing.assert_close(steps, reference[:, 8 + k :], **TOLERANCE)


def test_insert_hook_pads_uneven_rows_and_trains(model):
    marker = 250
    hook = model.attach_hook(InsertTokens(marker, 2, model.config.hidden_size))
    ids = random_ids((2, 6), seed=13, high=200)
    ids[0, 1] = ids[0, 3] = marker  # two insertions in row 0, one in row 1
    ids[1, 2] = marker
    labels = ids.clone()
    out = model.train()(ids, labels=labels)
    assert out.state.hidden.shape[1] == 10
    assert out.state.valid[1].tolist() == [True] * 8 + [False] * 2
    out.loss.backward()
    assert hook.embeddings.grad is not None and hook.embeddings.grad.abs().sum() > 0


def test_cache_switches_from_inference_to_gradients(model):
    """A prefix cached without gradients (preallocated slots), then continued with them."""
    ids = random_ids((2, 10), seed=14)
    cache = model.new_kv_cache(capacity=64)
    with torch.no_grad():
        prefix = model(ids[:, :6], kv_cache=cache).logits
    rest = model(ids[:, 6:], kv_cache=cache).logits
    assert rest.requires_grad and cache.layers[0].keys.shape[2] == 10
    with torch.no_grad():
        full = model(ids).logits
    torch.testing.assert_close(torch.cat([prefix, rest.detach()], dim=1), full, **TOLERANCE)


def test_casting_to_bf16_keeps_rope_frequencies_exact(model):
    before = model.model.rotary_emb.inv_freq.clone()
    model.to(torch.bfloat16)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(model.model.rotary_emb.inv_freq, before)
    with torch.no_grad():
        assert torch.isfinite(model(random_ids((1, 8))).logits).all()


def packed_document_ids(lengths_per_row: list[list[int]]) -> torch.Tensor:
    return torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in lengths_per_row])


def forward_and_grads(model, ids, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(ids, **kwargs).logits
    (logits.float() ** 2).mean().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "kwargs_of",
    [
        # packed rows: documents of uneven lengths, boundaries off the tile grid
        lambda ids: {"document_ids": packed_document_ids([[70, 150, 40, 40], [300]])},
        # left padding
        lambda ids: {"attention_mask": torch.cat([torch.zeros(1, 90), torch.ones(1, 210)], 1).long().expand(2, -1)},
    ],
    ids=["packed", "padded"],
)
def test_tiled_attention_equals_the_whole_mask(model, monkeypatch, kwargs_of):
    """Prefills longer than QUERY_TILE attend tile by tile; logits and gradients stay those of one
    SDPA call over the whole mask."""
    from mmllm.model import backbone

    model.train()
    ids = random_ids((2, 300), seed=21)
    tiled = forward_and_grads(model, ids, **kwargs_of(ids))
    monkeypatch.setattr(backbone, "QUERY_TILE", 10**6)
    whole = forward_and_grads(model, ids, **kwargs_of(ids))
    torch.testing.assert_close(tiled[0], whole[0], **TOLERANCE)
    for name, grad in whole[1].items():
        torch.testing.assert_close(tiled[1][name], grad, **TOLERANCE, msg=lambda m, name=name: f"{name}: {m}")


def test_tiles_skip_the_keys_no_query_of_theirs_sees(model, monkeypatch):
    from mmllm.model import backbone

    monkeypatch.setattr(backbone, "QUERY_TILE", 128)
    document_ids = packed_document_ids([[100, 200, 212], [256, 256]])
    state = TokenState(
        hidden=torch.zeros(2, 512, 8),
        position_ids=torch.zeros(2, 512, dtype=torch.long),
        token_ids=None,
        valid=None,
        document_ids=document_ids,
        source_index=torch.arange(512).expand(2, -1),
    )
    mask, causal = AttentionMasks(state).get(0, None, None)
    assert isinstance(mask, TiledMask) and not causal
    # tile [256, 384): row 0's document starts at 100, row 1's at 256, so keys start at 100
    assert [(start, end, first) for start, end, first, _ in mask.tiles] == [
        (0, 128, 0),
        (128, 256, 0),
        (256, 384, 100),
        (384, 512, 256),
    ]
    scored = sum((end - start) * (end - first) for start, end, first, _ in mask.tiles)
    assert scored < 0.46 * 512 * 512  # 45% of the 512 x 512 pairs the whole mask scores


def test_sliding_window_tiles_equal_the_whole_mask(tiny_config, monkeypatch):
    from mmllm.model import backbone

    config = dataclasses.replace(tiny_config, sliding_window=40)
    torch.manual_seed(0)
    model = CausalLM(config).train()
    ids = random_ids((1, 400), seed=22)
    tiled = forward_and_grads(model, ids, attention_mask=torch.ones(1, 400).long())
    monkeypatch.setattr(backbone, "QUERY_TILE", 10**6)
    whole = forward_and_grads(model, ids, attention_mask=torch.ones(1, 400).long())
    torch.testing.assert_close(tiled[0], whole[0], **TOLERANCE)
    for name, grad in whole[1].items():
        torch.testing.assert_close(tiled[1][name], grad, **TOLERANCE)
