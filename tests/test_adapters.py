"""The transformers adapters on tiny random upstream models saved in the test: codes equal a direct
call of the upstream class, decode shapes, save/load, encode-only Chameleon, malformed decode."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    ChameleonVQVAE,
    ChameleonVQVAEConfig,
    DacConfig,
    DacModel,
    Emu3VQVAE,
    Emu3VQVAEConfig,
    EncodecConfig,
    EncodecModel,
    JanusVQVAE,
    JanusVQVAEConfig,
    MimiConfig,
    MimiModel,
)

from mmllm.data.media import resample_audio, resize_image
from mmllm.errors import CheckpointError, ConfigError, MediaError
from mmllm.tokenizers import load_tokenizer
from mmllm.tokenizers.adapters import ChameleonAdapter, DacAdapter, Emu3Adapter, EncodecAdapter, MimiAdapter

IMAGE_SIZE = 32  # 4 levels of the tiny VQ-VAEs below downsample 8x: a 4x4 code grid
CODEC_RATE = 8000  # tiny codecs run at 8 kHz; inputs come at 16 kHz and are resampled
TINY_IMAGE = {"base_channels": 32, "channel_multiplier": [1, 1, 1, 1], "num_res_blocks": 1}  # 32: GroupNorm groups

UPSTREAM = {
    "hf-emu3": (
        Emu3VQVAE,
        lambda: Emu3VQVAEConfig(  # hidden_size: the attention width, which must equal the deepest channel count
            codebook_size=64, embed_dim=4, latent_channels=4, attn_resolutions=[], hidden_size=32, **TINY_IMAGE
        ),
    ),
    "hf-janus": (
        JanusVQVAE,
        lambda: JanusVQVAEConfig(
            num_embeddings=64, embed_dim=4, latent_channels=8, num_patches=4, projection_dim=8, **TINY_IMAGE
        ),
    ),
    "hf-chameleon": (
        ChameleonVQVAE,
        lambda: ChameleonVQVAEConfig(num_embeddings=64, embed_dim=4, latent_channels=8, resolution=32, **TINY_IMAGE),
    ),
    "hf-encodec": (
        EncodecModel,  # 16 codes = 4 bits at 500 frames/s: 2 kbps per level, so 4 kbps = 2 levels
        lambda: EncodecConfig(
            sampling_rate=CODEC_RATE,
            target_bandwidths=[2.0, 4.0],
            hidden_size=16,
            num_filters=4,
            upsampling_ratios=[4, 4],
            codebook_size=16,
            num_lstm_layers=1,
        ),
    ),
    "hf-mimi": (
        MimiModel,
        lambda: MimiConfig(
            sampling_rate=CODEC_RATE,
            hidden_size=16,
            num_filters=4,
            upsampling_ratios=[4, 4],
            codebook_size=16,
            codebook_dim=8,
            num_quantizers=4,
            vector_quantization_hidden_dimension=8,
            upsample_groups=16,
            num_hidden_layers=1,
            intermediate_size=32,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
        ),
    ),
    "hf-dac": (
        DacModel,
        lambda: DacConfig(
            sampling_rate=CODEC_RATE,
            encoder_hidden_size=4,
            downsampling_ratios=[2, 4],
            decoder_hidden_size=16,
            n_codebooks=3,
            codebook_size=16,
            codebook_dim=4,
        ),
    ),
}
IMAGE_NAMES = ["hf-emu3", "hf-janus", "hf-chameleon"]
AUDIO_NAMES = ["hf-encodec", "hf-mimi", "hf-dac"]
DECODABLE = ["hf-emu3", "hf-janus", *AUDIO_NAMES]


@pytest.fixture(scope="module")
def upstream_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each tiny upstream model saved with its own `save_pretrained`, as a user's local dir would be."""
    dirs = {}
    for name, (model_class, make_config) in UPSTREAM.items():
        torch.manual_seed(0)
        model = model_class(make_config())
        for buffer_name, buffer in model.named_buffers():
            if buffer_name.endswith((".embed", ".embed_sum")):  # EnCodec / Mimi codebooks start all-zero: every code 0
                buffer.normal_(std=0.1)  # about the scale of tiny random latents
        dirs[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(dirs[name])
    return dirs


def adapter_for(name: str, upstream_dirs: dict[str, Path], **config):
    if name == "hf-emu3":
        config.setdefault("image_size", IMAGE_SIZE)  # Emu3 takes any multiple of 8; its default is 512
    return load_tokenizer(name, model_dir=str(upstream_dirs[name]), **config)


def upstream_model(name: str, upstream_dirs: dict[str, Path]):
    return UPSTREAM[name][0].from_pretrained(upstream_dirs[name], local_files_only=True).eval()


def images(n: int, seed: int, size: int = 40) -> list[np.ndarray]:
    """Smooth random images (40x40, so prepare has to resize): blocks of colour, upscaled."""
    rng = np.random.default_rng(seed)
    return [resize_image(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8), (size, size)) for _ in range(n)]


def waves(lengths: list[int], seed: int) -> list[tuple[np.ndarray, int]]:
    """16 kHz test signals, as (samples, rate) pairs: a random-pitch tone plus noise."""
    rng = np.random.default_rng(seed)
    t = [np.arange(n) / 16000 for n in lengths]
    return [
        (
            (0.5 * np.sin(2 * np.pi * rng.uniform(200, 2000) * x) + 0.1 * rng.standard_normal(len(x))).astype(
                np.float32
            ),
            16000,
        )
        for x in t
    ]


def direct_image_codes(name: str, model, batch: list[np.ndarray]) -> torch.Tensor:
    """The upstream class called by hand on the upstream preprocessing: (batch, rows, cols)."""
    pixels = torch.from_numpy(np.stack([resize_image(x, (IMAGE_SIZE, IMAGE_SIZE)) for x in batch]))
    pixels = pixels.permute(0, 3, 1, 2).float()
    with torch.no_grad():
        if name == "hf-chameleon":
            return model.encode(pixels * 0.0078 - 1.0).image_tokens.view(len(batch), 4, 4)
        normalized = (pixels / 255 - 0.5) / 0.5
        if name == "hf-emu3":
            sizes = torch.tensor([[IMAGE_SIZE, IMAGE_SIZE]] * len(batch))
            return torch.stack(model.encode(normalized, image_sizes=sizes).image_tokens)
        return model.encode(normalized).image_tokens.view(len(batch), 4, 4)


def direct_audio_codes(name: str, model, wave16k: np.ndarray) -> torch.Tensor:
    """The upstream codec called by hand on the resampled wave: (frames, levels)."""
    wave = torch.from_numpy(resample_audio(wave16k, 16000, CODEC_RATE)).view(1, 1, -1)
    with torch.no_grad():
        if name == "hf-encodec":
            return model.encode(wave, bandwidth=4.0).audio_codes[0, 0].T
        if name == "hf-mimi":
            return model.encode(wave, num_quantizers=4).audio_codes[0].T
        wave = torch.nn.functional.pad(wave, (0, -wave.shape[-1] % 8))  # DAC's hop: 2 * 4
        return model.encode(wave, n_quantizers=3).audio_codes[0].T


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_image_codes_equal_upstream_and_batches_match_singles(name, upstream_dirs):
    adapter = adapter_for(name, upstream_dirs)
    batch = images(3, seed=1)
    encoded = adapter.encode(batch)
    assert adapter.grid == (4, 4) and adapter.levels == 1 and adapter.tokens_per_item == 16
    assert encoded.codes.shape == (3, 16, 1) and encoded.lengths.tolist() == [16, 16, 16]
    direct = direct_image_codes(name, upstream_model(name, upstream_dirs), batch)
    assert torch.equal(encoded.codes[..., 0], direct.reshape(3, 16))
    assert len(direct.unique()) > 1  # random weights still spread codes: the comparison means something
    singles = torch.cat([adapter.encode([x]).codes for x in batch])
    assert torch.equal(singles, encoded.codes)


@pytest.mark.parametrize("name", ["hf-emu3", "hf-janus"])
def test_image_decode_equals_upstream_decode(name, upstream_dirs):
    adapter = adapter_for(name, upstream_dirs)
    codes = adapter.encode(images(2, seed=2))
    decoded = adapter.decode(codes)
    assert decoded.flags == ["", ""]
    assert all(x.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and x.dtype == np.uint8 for x in decoded.media)
    model = upstream_model(name, upstream_dirs)
    with torch.no_grad():
        grid = codes.codes[..., 0].view(2, 4, 4)
        pixels = model.decode(grid) if name == "hf-emu3" else model.decode(grid.flatten(1))
    expected = ((pixels * 0.5 + 0.5) * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(np.stack(decoded.media), expected)


@pytest.mark.parametrize("name", AUDIO_NAMES)
def test_audio_codes_equal_upstream_and_are_ragged(name, upstream_dirs):
    adapter = adapter_for(name, upstream_dirs, **({"bandwidth": 4.0} if name == "hf-encodec" else {}))
    assert adapter.sample_rate == CODEC_RATE and adapter.grid is None
    assert adapter.levels == {"hf-encodec": 2, "hf-mimi": 4, "hf-dac": 3}[name]
    batch = waves([1600, 2403, 37], seed=3)
    encoded = adapter.encode(batch)
    model = upstream_model(name, upstream_dirs)
    for item, (wave, _) in zip(encoded.items(), batch, strict=True):
        direct = direct_audio_codes(name, model, wave)
        np.testing.assert_array_equal(item, direct.numpy())
        assert len(item) == math.ceil(math.ceil(len(wave) / 2) / adapter.samples_per_frame)  # 16 kHz -> 8 kHz
    assert encoded.codes.shape == (3, max(encoded.lengths.tolist()), adapter.levels)
    assert len(np.unique(encoded.items()[0])) > 1
    singles = [adapter.encode([wave]).items()[0] for wave in batch]
    assert all(np.array_equal(a, b) for a, b in zip(singles, encoded.items(), strict=True))
    bare = adapter.encode([resample_audio(batch[0][0], 16000, CODEC_RATE)]).items()[0]  # bare: at the codec's rate
    np.testing.assert_array_equal(bare, encoded.items()[0])


@pytest.mark.parametrize("name", AUDIO_NAMES)
def test_audio_decode_gives_waves_at_the_codec_rate(name, upstream_dirs):
    adapter = adapter_for(name, upstream_dirs)
    encoded = adapter.encode(waves([1600, 800], seed=4))
    decoded = adapter.decode(encoded)
    assert decoded.flags == ["", ""]
    for wave, frames in zip(decoded.media, encoded.lengths.tolist(), strict=True):
        assert wave.dtype == np.float32 and wave.shape == (frames * adapter.samples_per_frame,)
        assert np.isfinite(wave).all()


def test_audio_is_cut_to_max_frames_and_levels_follow_the_settings(upstream_dirs):
    short = adapter_for("hf-dac", upstream_dirs, max_frames=3)
    assert short.encode(waves([4000], seed=5)).lengths.tolist() == [3]
    assert short.tokens_per_item == 3 * 3
    assert adapter_for("hf-encodec", upstream_dirs).levels == 1  # lowest target bandwidth by default, as upstream
    assert adapter_for("hf-mimi", upstream_dirs, num_quantizers=2).levels == 2
    with pytest.raises(ConfigError, match="bandwidth 3.0"):
        adapter_for("hf-encodec", upstream_dirs, bandwidth=3.0)
    with pytest.raises(ConfigError, match="num_quantizers 9"):
        adapter_for("hf-mimi", upstream_dirs, num_quantizers=9)


@pytest.mark.parametrize("name", [*IMAGE_NAMES, *AUDIO_NAMES])
def test_save_and_load_without_the_upstream_dir(name, upstream_dirs, tmp_path):
    adapter = adapter_for(name, upstream_dirs)
    media = images(2, seed=6) if name in IMAGE_NAMES else waves([1200, 700], seed=6)
    before = adapter.encode(media)
    copy = tmp_path / "upstream"
    shutil.copytree(upstream_dirs[name], copy)
    adapter = adapter_for(name, {name: copy})
    adapter.save_pretrained(tmp_path / "saved")
    shutil.rmtree(copy)  # the saved tokenizer must not need the upstream dir
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert "model_dir" not in config["config"]
    loaded = load_tokenizer(tmp_path / "saved")
    assert type(loaded) is type(adapter) and loaded.get_config() == adapter.get_config()
    after = loaded.encode(media)
    assert torch.equal(before.codes, after.codes) and torch.equal(before.lengths, after.lengths)
    if loaded.can_decode:
        original, reloaded = adapter.decode(before).media, loaded.decode(after).media
        assert all(np.array_equal(a, b) for a, b in zip(original, reloaded, strict=True))


@pytest.mark.parametrize("name", [*IMAGE_NAMES, *AUDIO_NAMES])
def test_loading_weights_into_a_used_adapter_takes_effect(name, upstream_dirs):
    trained = adapter_for(name, upstream_dirs)
    fresh = type(trained)(**trained.get_config())  # same structure, new random weights
    media = images(1, seed=9) if name in IMAGE_NAMES else waves([900], seed=9)
    fresh.encode(media)  # a first use may cache derived tensors (Mimi caches its codebooks)
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh.encode(media).codes, trained.encode(media).codes)


def test_image_sizes_must_fit_the_upstream_grid(upstream_dirs):
    with pytest.raises(ConfigError, match="multiple of 8"):
        adapter_for("hf-emu3", upstream_dirs, image_size=30)
    with pytest.raises(ConfigError, match="upstream takes 4x4"):
        adapter_for("hf-janus", upstream_dirs, image_size=64)
    assert adapter_for("hf-emu3", upstream_dirs, image_size=64).grid == (8, 8)


def test_normalization_comes_from_the_preprocessor_config(upstream_dirs, tmp_path):
    from transformers import Emu3ImageProcessor

    model_dir = tmp_path / "emu3"
    shutil.copytree(upstream_dirs["hf-emu3"], model_dir)
    Emu3ImageProcessor(image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0]).save_pretrained(model_dir)
    adapter = Emu3Adapter(model_dir=str(model_dir), image_size=IMAGE_SIZE)
    assert adapter.image_mean == [0.0, 0.0, 0.0] and adapter.image_std == [1.0, 1.0, 1.0]
    assert adapter.rescale_factor == pytest.approx(1 / 255)
    assert Emu3Adapter(model_dir=str(model_dir), image_size=IMAGE_SIZE, image_std=0.5).image_std == [0.5] * 3


def test_chameleon_is_encode_only(upstream_dirs):
    adapter = adapter_for("hf-chameleon", upstream_dirs)
    assert isinstance(adapter, ChameleonAdapter) and not adapter.can_decode
    decoded = adapter.decode(adapter.encode(images(2, seed=7)))
    assert len(decoded.media) == 2 and decoded.num_flagged == 2
    assert all("encode-only" in flag for flag in decoded.flags)
    assert all(x.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and not x.any() for x in decoded.media)


@pytest.mark.parametrize("name", DECODABLE)
def test_malformed_codes_decode_to_flagged_media(name, upstream_dirs):
    adapter = adapter_for(name, upstream_dirs, **({"max_frames": 40} if name in AUDIO_NAMES else {}))
    rng = np.random.default_rng(8)
    malformed = [
        rng.integers(-50, 500, (7, adapter.levels)),  # out of range, wrong length for images
        rng.integers(0, adapter.codebook_size, (3, adapter.levels + 2)),  # extra levels
        np.zeros((0, adapter.levels), dtype=np.int64),  # nothing
        np.array([[np.nan, 1.0]]),  # not codes at all
        rng.integers(0, adapter.codebook_size, (41, adapter.levels)) if name in AUDIO_NAMES else [[1]] * 99,  # too long
    ]
    decoded = adapter.decode(malformed)
    assert len(decoded.media) == len(malformed) and decoded.num_flagged == len(malformed)
    for medium in decoded.media:
        if name in IMAGE_NAMES:
            assert medium.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and medium.dtype == np.uint8
        else:
            assert medium.ndim == 1 and medium.dtype == np.float32 and len(medium) > 0
            assert len(medium) <= adapter.max_frames * adapter.samples_per_frame


def test_missing_or_wrong_dirs_raise_one_line_checkpoint_errors(upstream_dirs, tmp_path):
    cases = [
        ("hf-emu3", upstream_dirs["hf-janus"], "'janus_vqgan' model"),
        ("hf-encodec", upstream_dirs["hf-dac"], "'dac' model"),
        ("hf-mimi", tmp_path / "nowhere", "no such directory"),
    ]
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(upstream_dirs["hf-dac"] / "config.json", no_weights)
    cases.append(("hf-dac", no_weights, "cannot load DacModel"))
    for name, path, problem in cases:
        with pytest.raises(CheckpointError, match=problem) as caught:
            load_tokenizer(name, model_dir=str(path))
        assert "\n" not in str(caught.value) and str(path) in str(caught.value)
    with pytest.raises(CheckpointError, match="'dac' config"):
        Emu3Adapter(hf_config=DacAdapter(model_dir=str(upstream_dirs["hf-dac"])).get_config()["hf_config"])
    with pytest.raises(ConfigError, match="exactly one"):
        MimiAdapter()


def test_bad_media_raise_media_errors(upstream_dirs):
    image_adapter = adapter_for("hf-emu3", upstream_dirs)
    audio_adapter = EncodecAdapter(model_dir=str(upstream_dirs["hf-encodec"]))
    bad = [
        (image_adapter, np.zeros((32, 32, 4), dtype=np.uint8), "4 channels|channels last"),
        (image_adapter, np.zeros((32, 32, 3), dtype=np.float32), "uint8"),
        (audio_adapter, np.zeros((2, 800), dtype=np.float32), "expected 1-d"),
        (audio_adapter, np.array([0.0, np.inf], dtype=np.float32), "finite"),
        (audio_adapter, np.zeros(0, dtype=np.float32), "non-empty"),
    ]
    for adapter, item, problem in bad:
        with pytest.raises(MediaError, match=problem):
            adapter.prepare(item, "clip.x")


@pytest.mark.gpu
@pytest.mark.parametrize("name", [*IMAGE_NAMES, *AUDIO_NAMES])
def test_adapters_run_on_cuda(name, upstream_dirs):
    adapter = adapter_for(name, upstream_dirs).to("cuda")
    media = images(2, seed=10) if name in IMAGE_NAMES else waves([1600, 900], seed=10)
    encoded = adapter.encode(media)
    assert encoded.codes.device.type == "cpu" and int(encoded.codes.max()) < adapter.codebook_size
    decoded = adapter.decode(encoded)
    assert decoded.num_flagged == (0 if adapter.can_decode else 2)
