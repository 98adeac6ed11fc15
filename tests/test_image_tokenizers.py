"""Image tokenizers (image-conv, image-titok): the ModalityTokenizer contract on tiny untrained
models, variable resolution, bad input, and the TiTok prefix property on a briefly trained one."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mmllm.data.toyworld import toy_media
from mmllm.errors import ConfigError, MediaError
from mmllm.tokenizers import load_tokenizer
from mmllm.tokenizers.image_1d import TiTokTokenizer
from mmllm.vocab import VocabLayout

TINY = {
    "image-conv": {
        "channels": [8, 8, 16],
        "strides": [2, 2, 2],
        "encoder_blocks": [0, 0, 1],
        "decoder_blocks": [0, 0, 1],
    },
    "image-titok": {"num_tokens": 8, "width": 32, "encoder_depth": 1, "decoder_depth": 1, "heads": 2},
}


def build(name: str, **overrides):
    torch.manual_seed(0)
    return load_tokenizer(name, **{**TINY[name], **overrides}).eval()


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return toy_media("image", 5, seed=3)


@pytest.fixture(params=sorted(TINY), scope="module")
def tokenizer(request):
    return build(request.param)


def test_round_trip_shapes_and_dtypes(tokenizer, images):
    encoded = tokenizer.encode(images)
    frames = 64 if tokenizer.name == "image-conv" else 8
    assert encoded.codes.shape == (5, frames, tokenizer.levels)
    assert encoded.codes.dtype == torch.long
    assert encoded.lengths.tolist() == [frames] * 5
    assert int(encoded.codes.min()) >= 0 and int(encoded.codes.max()) < tokenizer.codebook_size == 512
    assert tokenizer.tokens_per_item == frames
    decoded = tokenizer.decode(encoded)
    assert decoded.flags == [""] * 5
    for image in decoded.media:
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8


def test_deterministic(tokenizer, images):
    again = build(tokenizer.name)
    codes = tokenizer.encode(images).items()
    assert all(np.array_equal(a, b) for a, b in zip(codes, again.encode(images).items(), strict=True))
    first, second = tokenizer.decode(codes).media, again.decode(codes).media
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_batch_equals_single(tokenizer, images):
    batch = tokenizer.encode(images).items()
    single = [tokenizer.encode([image]).items()[0] for image in images]
    assert all(np.array_equal(a, b) for a, b in zip(batch, single, strict=True))
    decoded = tokenizer.decode(batch).media
    alone = [tokenizer.decode([codes]).media[0] for codes in batch]
    assert all(np.array_equal(a, b) for a, b in zip(decoded, alone, strict=True))


def test_save_load_equality(tokenizer, images, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert type(loaded) is type(tokenizer) and loaded.get_config() == tokenizer.get_config()
    codes = tokenizer.encode(images).items()
    assert all(np.array_equal(a, b) for a, b in zip(codes, loaded.encode(images).items(), strict=True))
    ours, theirs = tokenizer.decode(codes).media, loaded.decode(codes).media
    assert all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True))


MALFORMED = {
    "random ids out of range": np.random.default_rng(0).integers(-1000, 5000, size=(64, 1)),
    "too short": np.zeros((3, 1), dtype=np.int64),
    "too long": np.ones((500, 1), dtype=np.int64),
    "wrong levels": np.ones((64, 3), dtype=np.int64),
    "empty": np.zeros((0,), dtype=np.int64),
    "nan floats": np.full((64, 1), np.nan),
    "strings": np.array(["a", "b"]),
    "scalar": np.int64(7),
    "ragged list": [[1, 2], [3]],
    "none": None,
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_codes_decode_flagged_never_raise(tokenizer, case):
    decoded = tokenizer.decode([MALFORMED[case]])
    assert decoded.media[0].shape == (64, 64, 3) and decoded.media[0].dtype == np.uint8
    short_prefix_is_valid = case == "too short" and tokenizer.grid is None  # a TiTok prefix is well formed
    assert bool(decoded.flags[0]) != short_prefix_is_valid


def test_well_formed_codes_unflagged(tokenizer):
    rng = np.random.default_rng(1)
    frames = 64 if tokenizer.name == "image-conv" else 8
    codes = [rng.integers(0, 512, size=(frames, 1)), rng.integers(0, 512, size=(frames,))]
    if tokenizer.name == "image-conv":
        codes.append(rng.integers(0, 512, size=(8, 8, 1)))  # the grid form VocabLayout may give
    else:
        codes.append(rng.integers(0, 512, size=(3, 1)))  # a prefix is a well-formed 1D item
    decoded = tokenizer.decode(codes)
    assert decoded.flags == [""] * len(codes)


def test_bad_input_raises_media_error_and_rgba_grey_convert(tokenizer):
    for bad in (np.zeros((64, 64, 2), np.uint8), np.zeros((2, 64, 64, 3), np.uint8), np.zeros((0, 64, 3))):
        with pytest.raises(MediaError, match="item 0"):
            tokenizer.encode([bad])
    with pytest.raises(MediaError, match=r"\[0, 1\]"):
        tokenizer.prepare(np.full((64, 64, 3), 2.5), "item 0")
    rgb = toy_media("image", 1, seed=4)[0]
    rgba = np.concatenate([rgb, np.full((64, 64, 1), 255, np.uint8)], axis=-1)
    assert np.array_equal(tokenizer.prepare(rgba), rgb)
    half = rgba.copy()
    half[..., 3] = 0
    assert not tokenizer.prepare(half).any()  # transparent composites onto black
    grey = tokenizer.prepare(rgb[..., 0])
    assert grey.shape == (64, 64, 3) and np.array_equal(grey[..., 2], rgb[..., 0])
    assert tokenizer.prepare(np.zeros((100, 40, 3), np.uint8)).shape == (64, 64, 3)  # resized


def test_a_one_by_one_encoder_has_no_convolution_past_a_cell():
    """encoder_kernel 1: every encoder convolution is a patch merge (kernel = stride) or 1x1, so
    no convolution mixes a cell with its neighbours; the default's 3x3 blocks do."""

    def widths(tokenizer) -> set[tuple[int, int]]:
        convs = [m for m in tokenizer.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
        return {(m.kernel_size[0], m.stride[0]) for m in convs}

    local = widths(build("image-conv", encoder_kernel=1))
    assert all(kernel in (1, stride) for kernel, stride in local), local
    assert (3, 1) in widths(build("image-conv"))
    with pytest.raises(ConfigError, match="encoder_kernel"):
        build("image-conv", encoder_kernel=2)


# ---------------------------------------------------------------- variable resolution


@pytest.fixture(scope="module")
def variable():
    return build("image-conv", variable_resolution=True, max_grid=[6, 10])


def test_variable_resolution_resize_rule(variable):
    assert variable.prepare(np.zeros((40, 72, 3), np.uint8)).shape == (40, 72, 3)  # fits: kept
    assert variable.prepare(np.zeros((64, 64, 3), np.uint8)).shape == (48, 48, 3)  # capped at 6 rows
    assert variable.prepare(np.zeros((200, 100, 3), np.uint8)).shape == (48, 24, 3)  # aspect kept
    assert variable.prepare(np.zeros((3, 900, 3), np.uint8)).shape == (8, 80, 3)  # at least one cell
    assert variable.grid is None and variable.max_frames == 60 and variable.tokens_per_item == 60


def test_variable_resolution_round_trip(variable, images):
    wide = np.zeros((40, 72, 3), np.uint8)
    wide[8:30, 10:60] = (255, 0, 0)
    batch = [wide, images[0]]
    encoded = variable.encode(batch)
    assert encoded.shapes == [(5, 9), (6, 6)]
    items = encoded.items()
    assert [item.shape for item in items] == [(5, 9, 1), (6, 6, 1)]
    decoded = variable.decode(items)
    assert decoded.flags == ["", ""]
    assert [image.shape for image in decoded.media] == [(40, 72, 3), (48, 48, 3)]
    single = variable.encode([wide]).items()[0]
    assert np.array_equal(single, items[0])
    assert np.array_equal(variable.decode([single]).media[0], decoded.media[0])


def test_variable_resolution_repair_keeps_or_builds_a_grid(variable):
    cropped = variable.decode([np.zeros((8, 12, 1), np.int64)])
    assert cropped.media[0].shape == (48, 80, 3) and "cropped" in cropped.flags[0]
    flat = variable.decode([np.zeros((23, 1), np.int64)])
    assert flat.media[0].shape == (24, 80, 3) and "laid out as 3x10" in flat.flags[0]
    clamped = variable.decode([np.full((2, 3, 1), 9999)])
    assert clamped.media[0].shape == (16, 24, 3) and "clamped" in clamped.flags[0]
    for case in ("scalar", "none", "ragged list", "empty"):
        decoded = variable.decode([MALFORMED[case]])
        assert decoded.media[0].shape == (8, 8, 3) and decoded.flags[0]


def test_variable_resolution_layout_streams_rows(variable, images):
    m = variable.modality_range()
    assert m.row_end and m.grid == (6, 10)
    layout = VocabLayout.build(100, [m])
    codes = variable.encode([np.zeros((16, 40, 3), np.uint8)]).items()[0]
    ids = layout.codes_to_ids("image", codes)
    assert len(ids) == 2 * (5 + 1)  # two rows of five codes, each closed by end-of-row
    back = layout.ids_to_codes("image", ids).codes
    assert np.array_equal(back, codes)
    assert variable.decode([back]).flags == [""]


# ---------------------------------------------------------------- training


def train_steps(tokenizer, batch: torch.Tensor, steps: int, lr: float) -> list[float]:
    """Plain AdamW steps on one batch (as training.py does for the generator); the losses."""
    optimizer = torch.optim.AdamW([p for n, p in tokenizer.named_parameters() if "discriminator" not in n], lr)
    tokenizer.train()
    losses = []
    for _ in range(steps):
        loss, _ = tokenizer.training_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", sorted(TINY))
def test_training_steps_reduce_loss(name, images):
    tokenizer = build(name)
    batch = tokenizer.collate([tokenizer.prepare(image) for image in images])
    assert batch.shape == (5, 3, 64, 64) and float(batch.min()) >= -1 and float(batch.max()) <= 1
    _, logs = tokenizer.training_loss(batch)
    assert {"l1", "psnr", "usage", "perplexity"} <= set(logs)
    losses = train_steps(tokenizer, batch, 10, 1e-2)
    assert losses[-1] < 0.7 * losses[0], losses


def test_gan_starts_at_its_step(images):
    tokenizer = build("image-conv", gan={"channels": 8, "layers": 2, "start_step": 1})
    batch = tokenizer.collate(images[:2])
    tokenizer.train()
    assert tokenizer.discriminator_loss(batch) is None  # before the start step
    _, logs = tokenizer.training_loss(batch)
    assert "gan_loss" not in logs
    loss, logs = tokenizer.training_loss(batch)
    loss.backward()
    assert "gan_loss" in logs and torch.isfinite(loss)
    assert tokenizer.decoder.conv_out.weight.grad is not None
    disc_loss = tokenizer.discriminator_loss(batch)
    disc_loss.backward()
    assert torch.isfinite(disc_loss) and tokenizer.discriminator.layers[0].weight.grad is not None
    assert any(name.startswith("discriminator.") for name in tokenizer.state_dict())


def palette_quadrants(n: int, seed: int) -> list[np.ndarray]:
    """32x32 images of four flat quadrants in 8 colours: coarse-to-fine content a tiny model learns fast."""
    palette = np.array([[(c >> 2) & 1, (c >> 1) & 1, c & 1] for c in range(8)], dtype=np.uint8) * 255
    quadrants = palette[np.random.default_rng(seed).integers(0, 8, size=(n, 2, 2))]
    return list(quadrants.repeat(16, axis=1).repeat(16, axis=2))


def test_titok_prefix_error_does_not_grow():
    """Nested dropout: after brief training, longer prefixes reconstruct at least as well."""
    torch.manual_seed(0)
    tokenizer = TiTokTokenizer(
        image_size=32, patch_size=8, num_tokens=8, width=48, encoder_depth=1, decoder_depth=1, heads=2
    )
    images = palette_quadrants(64, seed=5)
    train_steps(tokenizer, tokenizer.collate(images), 150, 3e-3)
    codes = tokenizer.encode(images).items()
    errors = []
    for prefix in (1, 2, 4, 8):
        decoded = tokenizer.decode([c[:prefix] for c in codes])
        assert decoded.flags == [""] * len(codes)
        errors.append(np.mean([(a.astype(float) - b) ** 2 for a, b in zip(decoded.media, images, strict=True)]))
    assert all(longer <= shorter * 1.02 for shorter, longer in itertools.pairwise(errors)), errors  # 2%: float noise
    assert errors[-1] < 0.8 * errors[0], errors  # and the tail tokens do carry detail
