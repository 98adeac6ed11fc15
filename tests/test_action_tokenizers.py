"""Action tokenizers: round trips, determinism, batch = single, save/load, malformed decode, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmllm.data.toyworld import toy_media
from mmllm.errors import CheckpointError, ConfigError, MediaError
from mmllm.tokenizers import load_tokenizer
from mmllm.tokenizers.action import (
    BPE_FILE,
    BinningActionTokenizer,
    FastActionTokenizer,
    ResidualVQActionTokenizer,
)
from mmllm.tokenizers.training import load_train_config, train_tokenizer

REPO = Path(__file__).resolve().parent.parent
CHUNK, DIMS = 10, 2
TINY_RVQ = {"kind": "rvq", "depth": 2, "codebook_size": 16}  # small enough to train in a second


@pytest.fixture(scope="module")
def train_chunks() -> list[np.ndarray]:
    return toy_media("action", 400, seed=0)


@pytest.fixture(scope="module")
def test_chunks() -> list[np.ndarray]:
    return toy_media("action", 32, seed=1)


@pytest.fixture(scope="module")
def fitted(train_chunks) -> dict[str, object]:
    """One fitted or briefly trained tokenizer of each kind."""
    quantile = BinningActionTokenizer(mode="quantile")
    quantile.fit(train_chunks)
    fast = FastActionTokenizer(scale=20.0, vocab_size=256)
    fast.fit(train_chunks)
    torch.manual_seed(0)
    vqbet = ResidualVQActionTokenizer(hidden=32, latent_dim=8, quantizer=TINY_RVQ)
    train_steps(vqbet, train_chunks, steps=5)
    return {"uniform": BinningActionTokenizer(), "quantile": quantile, "fast": fast, "vqbet": vqbet.eval()}


def train_steps(tokenizer, items, steps: int, lr: float = 3e-3) -> list[float]:
    optimizer = torch.optim.AdamW(tokenizer.parameters(), lr=lr)
    tokenizer.train()
    losses = []
    for step in range(steps):
        batch = tokenizer.collate(items[(step * 32) % len(items) :][:32])
        loss, _ = tokenizer.training_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


KINDS = ("uniform", "quantile", "fast", "vqbet")


def decode_all(tokenizer, codes) -> np.ndarray:
    decoded = tokenizer.decode(codes)
    assert decoded.num_flagged == 0, decoded.flags
    return np.stack(decoded.media)


# ---------------------------------------------------------------- round trips


def test_uniform_bins_error_is_at_most_half_a_bin():
    tokenizer = BinningActionTokenizer()
    chunks = np.random.default_rng(0).uniform(-1, 1, (64, CHUNK, DIMS)).astype(np.float32)
    chunks[0, 0] = (-1.0, 1.0)  # both limits fall in the outer bins
    encoded = tokenizer.encode(list(chunks))
    assert encoded.codes.shape == (64, CHUNK * DIMS, 1) and int(encoded.codes.max()) <= 255
    error = np.abs(decode_all(tokenizer, encoded) - chunks).max()
    assert error <= 1 / 256 + 1e-6  # half of a bin of width 2 / 256


def test_quantile_bins_fit_monotone_edges_and_in_bin_values(fitted, test_chunks):
    tokenizer = fitted["quantile"]
    edges, values = tokenizer.edges.numpy(), tokenizer.values.numpy()
    assert (np.diff(edges, axis=1) >= 0).all()
    assert (edges[:, 0] == -1).all() and (edges[:, -1] == 1).all()
    assert ((values >= edges[:, :-1]) & (values <= edges[:, 1:])).all()
    assert not np.allclose(edges, BinningActionTokenizer().edges.numpy())  # fitting moved the edges
    reconstruction = decode_all(tokenizer, tokenizer.encode(test_chunks))
    assert np.mean((reconstruction - np.stack(test_chunks)) ** 2) < 1e-3


def test_fast_is_near_lossless_at_high_scale(train_chunks):
    scale = 100.0
    tokenizer = FastActionTokenizer(scale=scale, vocab_size=1024)
    tokenizer.fit(train_chunks)
    chunks = np.stack(train_chunks[:64])  # inside the fitted coefficient range: no clipping
    reconstruction = decode_all(tokenizer, tokenizer.encode(list(chunks)))
    # Rounding moves each orthonormal DCT coefficient by <= 0.5 / scale, so a dimension by <= that * sqrt(chunk).
    assert np.abs(reconstruction - chunks).max() <= 0.5 / scale * math.sqrt(CHUNK) + 1e-6


def test_fast_compresses_smooth_chunks(fitted, test_chunks):
    encoded = fitted["fast"].encode(test_chunks)
    assert encoded.codes.shape[-1] == 1 and encoded.lengths.max() <= CHUNK * DIMS
    assert encoded.lengths.float().mean() < CHUNK * DIMS / 2
    reconstruction = decode_all(fitted["fast"], encoded)
    # The final position is the DC coefficient's: at scale 20 each dim's sum moves by <= 0.5 / 20 * sqrt(10).
    assert np.abs(reconstruction.sum(1) - np.stack(test_chunks).sum(1)).max() <= 0.5 / 20 * math.sqrt(CHUNK) + 1e-5


def test_vqbet_training_lowers_the_loss(train_chunks):
    torch.manual_seed(0)
    tokenizer = ResidualVQActionTokenizer(hidden=32, latent_dim=8, quantizer=TINY_RVQ)
    losses = train_steps(tokenizer, train_chunks, steps=60)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:3])
    encoded = tokenizer.encode(train_chunks[:8])
    assert encoded.codes.shape == (8, CHUNK // 5, 2)
    assert tokenizer.tokens_per_item == 4


# ---------------------------------------------------------------- determinism, batching, save/load


@pytest.mark.parametrize("kind", KINDS)
def test_encode_is_deterministic_and_batch_equals_single(fitted, test_chunks, kind):
    tokenizer = fitted[kind]
    batch = tokenizer.encode(test_chunks[:6])
    again = tokenizer.encode(test_chunks[:6])
    assert torch.equal(batch.codes, again.codes)
    decoded = tokenizer.decode(batch).media
    for i, chunk in enumerate(test_chunks[:6]):
        single = tokenizer.encode([chunk])
        np.testing.assert_array_equal(single.items()[0], batch.items()[i])
        np.testing.assert_allclose(tokenizer.decode(single).media[0], decoded[i], atol=1e-6)
        assert decoded[i].shape == (CHUNK, DIMS) and decoded[i].dtype == np.float32


def test_fast_fit_is_deterministic(train_chunks):
    first, second = FastActionTokenizer(scale=20.0, vocab_size=256), FastActionTokenizer(scale=20.0, vocab_size=256)
    assert first.fit(train_chunks) == second.fit(train_chunks)
    assert first.bpe.get_vocab() == second.bpe.get_vocab()


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(fitted, test_chunks, kind, tmp_path):
    tokenizer = fitted[kind]
    tokenizer.save_pretrained(tmp_path / kind)
    loaded = load_tokenizer(tmp_path / kind)
    assert type(loaded) is type(tokenizer) and loaded.get_config() == tokenizer.get_config()
    codes = tokenizer.encode(test_chunks)
    assert torch.equal(loaded.encode(test_chunks).codes, codes.codes)
    np.testing.assert_array_equal(np.stack(loaded.decode(codes).media), np.stack(tokenizer.decode(codes).media))
    if kind == "fast":
        assert loaded.bpe.get_vocab() == tokenizer.bpe.get_vocab()


def test_fast_load_needs_its_bpe_vocabulary(fitted, tmp_path):
    fitted["fast"].save_pretrained(tmp_path / "fast")
    (tmp_path / "fast" / BPE_FILE).unlink()
    with pytest.raises(CheckpointError, match=BPE_FILE):
        load_tokenizer(tmp_path / "fast")
    fitted["fast"].save_pretrained(tmp_path / "fast")
    (tmp_path / "fast" / BPE_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_tokenizer(tmp_path / "fast")


# ---------------------------------------------------------------- malformed codes


def malformed_cases(tokenizer) -> dict[str, object]:
    size, levels = tokenizer.codebook_size, tokenizer.levels
    rng = np.random.default_rng(0)
    return {
        "random ids, too many": rng.integers(0, size, (CHUNK * DIMS + 7, levels)),
        "too few": np.zeros((1, levels), dtype=np.int64),  # for FAST: one token spells fewer than 20 coefficients
        "out of range": np.full((CHUNK * DIMS, levels), size + 5),
        "negative": -np.ones((CHUNK * DIMS, levels), dtype=np.int64),
        "empty": np.zeros((0, levels), dtype=np.int64),
        "wrong levels": np.zeros((3, levels + 2), dtype=np.int64),
        "nan": np.full((4, levels), np.nan),
        "strings": np.array([["a"] * levels]),
    }


@pytest.mark.parametrize("kind", KINDS)
def test_malformed_codes_decode_to_flagged_chunks(fitted, kind):
    tokenizer = fitted[kind]
    cases = malformed_cases(tokenizer)
    decoded = tokenizer.decode(list(cases.values()))
    for name, chunk, flag in zip(cases, decoded.media, decoded.flags, strict=True):
        assert chunk.shape == (CHUNK, DIMS) and chunk.dtype == np.float32, name
        assert np.isfinite(chunk).all() and np.abs(chunk).max() <= 1.0, name
        assert flag, f"{name} was not flagged"


def spelled_length(tokenizer: FastActionTokenizer, ids: list[int]) -> int | None:
    """Characters the ids spell, or None when an id is not in the BPE vocabulary."""
    tokens = [tokenizer.bpe.id_to_token(i) if 0 <= i < tokenizer.codebook_size else None for i in ids]
    return None if None in tokens else sum(map(len, tokens))


@settings(max_examples=150, deadline=None)
@given(ids=st.lists(st.integers(-5, 400), max_size=30))
def test_fast_decode_never_raises(fitted, ids):
    tokenizer = fitted["fast"]
    decoded = tokenizer.decode([np.array(ids, dtype=np.int64)])
    chunk, flag = decoded.media[0], decoded.flags[0]
    assert chunk.shape == (CHUNK, DIMS) and chunk.dtype == np.float32
    assert np.isfinite(chunk).all() and np.abs(chunk).max() <= 1.0
    assert bool(flag) == (spelled_length(tokenizer, ids) != CHUNK * DIMS)


def test_unfitted_fast_codes_every_coefficient_and_flags_ids_past_its_vocabulary(test_chunks):
    tokenizer = FastActionTokenizer(scale=10.0, vocab_size=1024)  # before fit: one token per coefficient value
    encoded = tokenizer.encode(test_chunks)
    assert (encoded.lengths == CHUNK * DIMS).all()
    assert decode_all(tokenizer, encoded).shape == (len(test_chunks), CHUNK, DIMS)
    decoded = tokenizer.decode([np.array([0, 1000] + [0] * 19)])
    assert "1 ids not in the BPE vocabulary" in decoded.flags[0]


def test_fast_repairs_by_zero_filling_high_frequencies(fitted, test_chunks):
    tokenizer = fitted["fast"]
    ids = max(tokenizer.encode(test_chunks).items(), key=len)
    whole = tokenizer.decode([ids]).media[0]
    cut = tokenizer.decode([ids[:-1]])
    assert "zero-filled" in cut.flags[0]
    # The first token starts with the DC coefficients, which alone set where the chunk ends.
    np.testing.assert_allclose(cut.media[0].sum(0), whole.sum(0), atol=1e-5)


# ---------------------------------------------------------------- bad input and configs


@pytest.mark.parametrize(
    ("item", "problem"),
    [
        (np.zeros(10, dtype=np.float32), "shape"),
        (np.zeros((10, 3), dtype=np.float32), "shape"),
        (np.zeros((0, 2), dtype=np.float32), "0 steps"),
        (np.zeros((11, 2), dtype=np.float32), "11 steps"),
        (np.full((10, 2), np.nan, dtype=np.float32), "NaN"),
        (np.array([["a", "b"]] * 10), "dtype"),
        ([[0.0, 0.0], [0.0]], "not an array"),
    ],
)
def test_bad_input_raises_media_error_naming_the_item(fitted, item, problem):
    for kind in KINDS:
        with pytest.raises(MediaError, match=f"item 0: .*{problem}"):
            fitted[kind].encode([item])


def test_short_chunks_are_padded_with_zero_actions_and_values_clipped():
    tokenizer = BinningActionTokenizer()
    prepared = tokenizer.prepare(np.array([[2.0, -3.0], [0.5, 0.25]], dtype=np.float64))
    assert prepared.shape == (CHUNK, DIMS) and prepared.dtype == np.float32
    np.testing.assert_array_equal(prepared[:2], [[1.0, -1.0], [0.5, 0.25]])
    assert not prepared[2:].any()


@pytest.mark.parametrize(
    ("cls", "config"),
    [
        (BinningActionTokenizer, {"mode": "kmeans"}),
        (BinningActionTokenizer, {"bins": 1}),
        (FastActionTokenizer, {"scale": 1e5}),
        (FastActionTokenizer, {"vocab_size": 1}),
        (ResidualVQActionTokenizer, {"sub_chunk": 3}),
        (ResidualVQActionTokenizer, {"latent_dim": 0}),
        (ResidualVQActionTokenizer, {"quantizer": {"kind": "nope"}}),
    ],
)
def test_bad_configs_raise_config_error(cls, config):
    with pytest.raises(ConfigError):
        cls(**config)


def test_fast_fit_refuses_a_range_beyond_the_vocabulary(train_chunks):
    with pytest.raises(ConfigError, match="vocab_size"):
        FastActionTokenizer(scale=200.0, vocab_size=64).fit(train_chunks)


@pytest.mark.parametrize("name", ["action_bins", "action_fast", "action_vqbet"])
def test_configs_fit_the_toy_budget(name):
    config = load_train_config(REPO / "configs" / "tokenizer" / f"{name}.yaml")
    tokenizer = load_tokenizer(config.tokenizer, **config.config)
    assert tokenizer.modality == "action" and tokenizer.tokens_per_item <= 20
    if name == "action_bins":  # exactly the toy layout's action range
        assert (tokenizer.codebook_size, tokenizer.levels, tokenizer.grid) == (256, 1, (10, 2))


@pytest.mark.parametrize("name", ["action_bins", "action_fast"])
def test_fitted_configs_train_and_save_through_the_trainer(name, tmp_path, test_chunks):
    path = REPO / "configs" / "tokenizer" / f"{name}.yaml"
    config = load_train_config(path, [f"out={tmp_path}", "data.num_items=200"])
    result = train_tokenizer(config, show_progress=False)
    loaded = load_tokenizer(tmp_path)
    codes = result.tokenizer.encode(test_chunks)
    assert torch.equal(loaded.encode(test_chunks).codes, codes.codes)
