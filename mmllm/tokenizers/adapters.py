"""Adapters that serve transformers' image VQ-VAEs and audio codecs as ModalityTokenizers.

Each adapter wraps one upstream class, unchanged, as its submodule `model`:

    hf-emu3        Emu3VQVAE        image -> (rows * cols, 1) codes, and back
    hf-janus       JanusVQVAE       image -> (rows * cols, 1) codes, and back
    hf-chameleon   ChameleonVQVAE   image -> codes only: upstream ships no decoder (`can_decode = False`)
    hf-encodec     EncodecModel     audio -> (frames, quantizers) codes, ragged, and back
    hf-mimi        MimiModel        audio -> (frames, quantizers) codes, ragged, and back
    hf-dac         DacModel         audio -> (frames, quantizers) codes, ragged, and back

The upstream model comes from a local Hugging Face directory (`model_dir`, read with
`from_pretrained(..., local_files_only=True)`; nothing is downloaded) or from its config dict
(`hf_config`). `get_config` stores that config dict, never the directory, and the weights travel
in the tokenizer's own `model.safetensors` as `model.*`: a saved adapter loads without the
original directory. A directory that is missing, holds another model type, or lacks weights
raises a one-line CheckpointError.

Preprocessing follows the upstream processors. Images are resized (bicubic, not cropped or
padded) to the model's square resolution and normalised as `(x * rescale - mean) / std`, with the
values of the directory's `preprocessor_config.json` when it has one; decoding inverts that.
Audio arrays arrive at 16 kHz (what `mmllm.data.media.read_media` and the toy world give) or as a
`(wave, sample_rate)` pair; they are resampled to the codec's rate, cut to `max_frames` frames
(the ragged limit, like Whisper's 30 s window), encoded one item at a time (zero padding would
change the codes of the non-causal layers; Mimi takes no padding mask at all) and decoded at the
codec's `sample_rate`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors import SafetensorError
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
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.mimi.modeling_mimi import MimiEuclideanCodebook

from mmllm.config import read_json_object
from mmllm.data.media import resample_audio, resize_image
from mmllm.errors import CheckpointError, ConfigError, MediaError
from mmllm.tokenizers.base import EncodedBatch, ModalityTokenizer, check_media_shape, register_tokenizer

UPSTREAM_CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
DEFAULT_MAX_SECONDS = 10.0  # the ragged audio limit: a spoken sentence or two
LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError)


def load_upstream(
    adapter: type[UpstreamAdapter], model_dir: str | Path | None, hf_config: dict[str, Any] | None
) -> PreTrainedModel:
    """The upstream model from a local directory (with its weights) or from a config dict (random weights)."""
    name, model_class = adapter.name, adapter.upstream_model
    if (model_dir is None) == (hf_config is None):
        raise ConfigError(f"{name}: give exactly one of model_dir (a local Hugging Face directory) or hf_config")
    if hf_config is not None:
        found = hf_config.get("model_type")
        if found != adapter.upstream_type:
            raise CheckpointError(f"{name}: hf_config is a {found!r} config, expected {adapter.upstream_type!r}")
        try:
            return model_class(adapter.upstream_config.from_dict(hf_config))
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{name}: hf_config does not build {model_class.__name__} ({err})") from None
    path = Path(model_dir)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory (a local {model_class.__name__} for {name})")
    model_type = read_json_object(path / UPSTREAM_CONFIG_FILE, CheckpointError, "Hugging Face config").get("model_type")
    if model_type != adapter.upstream_type:
        raise CheckpointError(
            f"{path}: holds a {model_type!r} model, {name} needs {adapter.upstream_type!r} ({model_class.__name__})"
        )
    try:
        model, info = model_class.from_pretrained(
            path, local_files_only=True, output_loading_info=True, dtype=torch.float32
        )
    except LOAD_ERRORS as err:
        problem = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: cannot load {model_class.__name__} ({problem})") from None
    for kind in ("missing_keys", "mismatched_keys"):
        if info.get(kind):
            names = ", ".join(sorted(str(key) for key in info[kind])[:3])
            raise CheckpointError(f"{path}: {kind.replace('_', ' ')} {names} for {model_class.__name__}")
    return model


class UpstreamAdapter(ModalityTokenizer):
    """Shared part: owns the frozen upstream model as `model` and keeps its config dict for `get_config`."""

    upstream_model: ClassVar[type[PreTrainedModel]]
    upstream_config: ClassVar[type[PretrainedConfig]]
    upstream_type: ClassVar[str]  # the `model_type` of the upstream config.json

    def __init__(self, model_dir: str | Path | None, hf_config: dict[str, Any] | None) -> None:
        super().__init__()
        self.model = load_upstream(type(self), model_dir, hf_config).eval().requires_grad_(False)
        self.hf_config = self.model.config.to_dict()

    def base_config(self) -> dict[str, Any]:
        return {"hf_config": self.hf_config}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


# ---------------------------------------------------------------- images


def preprocessor_values(model_dir: str | Path | None) -> dict[str, Any]:
    """`rescale_factor`, `image_mean` and `image_std` from the directory's preprocessor config, if any."""
    if model_dir is None or not (Path(model_dir) / PREPROCESSOR_FILE).is_file():
        return {}
    data = read_json_object(Path(model_dir) / PREPROCESSOR_FILE, CheckpointError, "image preprocessor config")
    return {key: data[key] for key in ("rescale_factor", "image_mean", "image_std") if key in data}


def per_channel(value: float | list[float], what: str, name: str) -> list[float]:
    values = [float(value)] * 3 if isinstance(value, int | float) else [float(v) for v in value]
    if len(values) != 3:
        raise ConfigError(f"{name}: {what} needs 3 values (RGB), got {len(values)}")
    return values


class UpstreamImageAdapter(UpstreamAdapter):
    """A square-image VQ-VAE: one code per latent grid cell, cells listed row-major."""

    modality = "image"
    # (rescale_factor, mean, std) of the upstream processor when the directory gives none
    default_normalization: ClassVar[tuple[float, float, float]] = (1 / 255, 0.5, 0.5)  # pixels to [-1, 1]

    def __init__(
        self,
        model_dir: str | Path | None = None,
        hf_config: dict[str, Any] | None = None,
        image_size: int | None = None,
        rescale_factor: float | None = None,
        image_mean: float | list[float] | None = None,
        image_std: float | list[float] | None = None,
    ) -> None:
        super().__init__(model_dir, hf_config)
        given = {"rescale_factor": rescale_factor, "image_mean": image_mean, "image_std": image_std}
        values = dict(zip(given, self.default_normalization, strict=True))
        values.update(preprocessor_values(model_dir))
        values.update({key: value for key, value in given.items() if value is not None})
        self.rescale_factor = float(values["rescale_factor"])
        self.image_mean = per_channel(values["image_mean"], "image_mean", self.name)
        self.image_std = per_channel(values["image_std"], "image_std", self.name)
        factor = 2 ** (len(self.model.config.channel_multiplier) - 1)  # one downsampling per extra level
        self.image_size = int(image_size if image_size is not None else self.default_image_size(factor))
        if self.image_size <= 0 or self.image_size % factor:
            raise ConfigError(f"{self.name}: image_size {self.image_size} is not a positive multiple of {factor}")
        side = self.image_size // factor
        self.check_grid(side)
        self.codebook_size = self.upstream_codebook_size()
        self.levels = 1
        self.grid = (side, side)
        self.max_frames = None

    def default_image_size(self, factor: int) -> int:
        raise NotImplementedError

    def check_grid(self, side: int) -> None:
        """Raise a ConfigError when the upstream model cannot code a side x side grid."""

    def upstream_codebook_size(self) -> int:
        return self.model.config.num_embeddings

    def get_config(self) -> dict[str, Any]:
        return {
            **self.base_config(),
            "image_size": self.image_size,
            "rescale_factor": self.rescale_factor,
            "image_mean": self.image_mean,
            "image_std": self.image_std,
        }

    def prepare(self, item: Any, where: str = "input") -> np.ndarray:
        image = np.asarray(item)
        check_media_shape(image, 3, 3, where, "image")
        if image.dtype != np.uint8 or 0 in image.shape:
            raise MediaError(f"{where}: image must be non-empty uint8 (H, W, 3), got {image.dtype} {image.shape}")
        return resize_image(image, (self.image_size, self.image_size))

    def mean_and_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, 3, 1, 1)  # per channel of (batch, 3, H, W)
        mean = torch.tensor(self.image_mean, device=self.device).view(shape)
        return mean, torch.tensor(self.image_std, device=self.device).view(shape)

    def normalize(self, images: list[np.ndarray]) -> torch.Tensor:
        """uint8 (H, W, 3) images as the upstream model's (batch, 3, H, W) float input."""
        pixels = torch.from_numpy(np.stack(images)).to(self.device).permute(0, 3, 1, 2).float()
        mean, std = self.mean_and_std()
        return (pixels * self.rescale_factor - mean) / std

    def denormalize(self, pixels: torch.Tensor) -> list[np.ndarray]:
        """The upstream model's (batch, 3, H, W) output as uint8 (H, W, 3) images."""
        mean, std = self.mean_and_std()
        values = (pixels.float() * std + mean) / self.rescale_factor
        return list(values.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())

    def _encode(self, items: list[np.ndarray]) -> EncodedBatch:
        codes = self.upstream_encode(self.normalize(items)).cpu()  # (batch, rows, cols)
        batch, cells = codes.shape[0], codes.shape[1] * codes.shape[2]
        return EncodedBatch(codes.reshape(batch, cells, 1).long(), torch.full((batch,), cells, dtype=torch.long))

    def _decode(self, codes: list[np.ndarray]) -> list[np.ndarray]:
        grid = torch.from_numpy(np.stack(codes)).to(self.device).view(len(codes), *self.grid)
        return self.denormalize(self.upstream_decode(grid))

    def upstream_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Codes (batch, rows, cols) of normalised pixels (batch, 3, H, W)."""
        raise NotImplementedError

    def upstream_decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (batch, 3, H, W) of codes (batch, rows, cols)."""
        raise NotImplementedError

    def blank(self) -> np.ndarray:
        return np.zeros((self.image_size, self.image_size, 3), dtype=np.uint8)


@register_tokenizer
class Emu3Adapter(UpstreamImageAdapter):
    """Emu3's VQ-VAE. Upstream codes an image as a 4-frame still clip (its temporal factor) and
    decodes the first frame; any multiple of 8 works as `image_size` (512 by default, the side
    of the upstream processor's `min_pixels`)."""

    name = "hf-emu3"
    upstream_model = Emu3VQVAE
    upstream_config = Emu3VQVAEConfig
    upstream_type = "emu3_vqgan"
    default_side = 512  # Emu3ImageProcessor's min_pixels is 512 * 512

    def default_image_size(self, factor: int) -> int:
        return self.default_side

    def upstream_codebook_size(self) -> int:
        return self.model.config.codebook_size

    def upstream_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        sizes = torch.tensor([[self.image_size, self.image_size]] * len(pixels))
        return torch.stack(self.model.encode(pixels, image_sizes=sizes).image_tokens)

    def upstream_decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode(codes)


@register_tokenizer
class JanusAdapter(UpstreamImageAdapter):
    """Janus's generation VQ-VAE; its decoder takes exactly `num_patches` x `num_patches` codes,
    so the image size is fixed by the config (384 for Janus-Pro: 24 patches of 16 pixels)."""

    name = "hf-janus"
    upstream_model = JanusVQVAE
    upstream_config = JanusVQVAEConfig
    upstream_type = "janus_vqgan"

    def default_image_size(self, factor: int) -> int:
        return self.model.config.num_patches * factor

    def check_grid(self, side: int) -> None:
        patches = self.model.config.num_patches
        if side != patches:
            raise ConfigError(f"{self.name}: image_size gives a {side}x{side} grid, upstream takes {patches}x{patches}")

    def upstream_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        side = self.grid[0]
        return self.model.encode(pixels).image_tokens.view(len(pixels), side, side)

    def upstream_decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode(codes.flatten(1))


@register_tokenizer
class ChameleonAdapter(UpstreamImageAdapter):
    """Chameleon's VQ-VAE: transformers ships its encoder only, so this adapter is encode-only
    (`decode` gives blank images, each flagged). Pixels map to [-1, 1) as upstream (x * 0.0078 - 1)."""

    name = "hf-chameleon"
    can_decode = False
    upstream_model = ChameleonVQVAE
    upstream_config = ChameleonVQVAEConfig
    upstream_type = "chameleon_vqgan"
    default_normalization = (0.0078, 1.0, 1.0)  # ChameleonImageProcessor's rescale_factor, mean, std

    def default_image_size(self, factor: int) -> int:
        return self.model.config.resolution

    def upstream_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        side = self.grid[0]
        return self.model.encode(pixels).image_tokens.view(len(pixels), side, side)


# ---------------------------------------------------------------- audio


class UpstreamAudioAdapter(UpstreamAdapter):
    """A mono neural codec: `levels` residual codes per frame, items ragged up to `max_frames`."""

    modality = "audio"

    def __init__(
        self,
        model_dir: str | Path | None,
        hf_config: dict[str, Any] | None,
        max_frames: int | None,
    ) -> None:
        super().__init__(model_dir, hf_config)
        config = self.model.config
        if getattr(config, "audio_channels", 1) != 1:
            raise CheckpointError(f"{self.name}: a {config.audio_channels}-channel codec; only mono codecs are adapted")
        self.sample_rate = int(config.sampling_rate)
        self.samples_per_frame = self.frame_samples()
        self.frame_rate = self.sample_rate / self.samples_per_frame
        default_frames = math.ceil(DEFAULT_MAX_SECONDS * self.frame_rate)
        self.max_frames = int(max_frames if max_frames is not None else default_frames)
        if self.max_frames <= 0:
            raise ConfigError(f"{self.name}: max_frames must be positive")
        self.codebook_size = int(config.codebook_size)
        self.grid = None

    def frame_samples(self) -> int:
        """Waveform samples per code frame (the codec's hop)."""
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        return {**self.base_config(), "max_frames": self.max_frames}

    def prepare(self, item: Any, where: str = "input") -> np.ndarray:
        """Mono float32 at the codec's rate, at most `max_frames` frames long.

        `item` is samples at the codec's `sample_rate`, or a `(samples, sample_rate)` pair."""
        rate = self.sample_rate
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], int | np.integer):
            item, rate = item
        wave = np.asarray(item)
        check_media_shape(wave, 1, None, where, "audio")
        if wave.dtype.kind != "f" or wave.size == 0 or not np.isfinite(wave).all():
            raise MediaError(f"{where}: audio must be non-empty finite float samples, got {wave.dtype} {wave.shape}")
        wave = resample_audio(wave, int(rate), self.sample_rate)
        return wave[: self.max_frames * self.samples_per_frame]

    def _encode(self, items: list[np.ndarray]) -> EncodedBatch:
        waves = [torch.from_numpy(wave).to(self.device).view(1, 1, -1) for wave in items]
        per_item = [self.upstream_encode(wave).cpu() for wave in waves]  # (levels, frames) each
        lengths = torch.tensor([codes.shape[-1] for codes in per_item], dtype=torch.long)
        batch = torch.zeros(len(items), int(lengths.max()), self.levels, dtype=torch.long)
        for row, codes in enumerate(per_item):
            batch[row, : codes.shape[-1]] = codes.T
        return EncodedBatch(batch, lengths)

    def _decode(self, codes: list[np.ndarray]) -> list[np.ndarray]:
        waves = [self.upstream_decode(torch.from_numpy(item.T.copy()).to(self.device).unsqueeze(0)) for item in codes]
        return [wave.reshape(-1).float().cpu().numpy() for wave in waves]

    def upstream_encode(self, wave: torch.Tensor) -> torch.Tensor:
        """Codes (levels, frames) of one waveform (1, 1, samples)."""
        raise NotImplementedError

    def upstream_decode(self, codes: torch.Tensor) -> torch.Tensor:
        """The waveform of codes (1, levels, frames)."""
        raise NotImplementedError

    def blank(self) -> np.ndarray:
        return np.zeros(self.samples_per_frame, dtype=np.float32)  # one frame of silence


@register_tokenizer
class EncodecAdapter(UpstreamAudioAdapter):
    """EnCodec; `bandwidth` (kbps, one of the config's target bandwidths, the lowest by default as
    upstream) sets the residual levels: 1.5 kbps = 2 codebooks for the 24 kHz model. Codecs that
    rescale each chunk by its loudness (`normalize`, the 48 kHz model) are refused: their codes
    alone cannot be decoded."""

    name = "hf-encodec"
    upstream_model = EncodecModel
    upstream_config = EncodecConfig
    upstream_type = "encodec"

    def __init__(
        self,
        model_dir: str | Path | None = None,
        hf_config: dict[str, Any] | None = None,
        bandwidth: float | None = None,
        max_frames: int | None = None,
    ) -> None:
        super().__init__(model_dir, hf_config, max_frames)
        config = self.model.config
        if config.normalize or config.chunk_length_s is not None:
            raise CheckpointError(f"{self.name}: chunked or loudness-normalised EnCodec needs per-chunk scales")
        self.bandwidth = float(bandwidth if bandwidth is not None else config.target_bandwidths[0])
        if self.bandwidth not in config.target_bandwidths:
            raise ConfigError(f"{self.name}: bandwidth {self.bandwidth} is not one of {list(config.target_bandwidths)}")
        self.levels = self.model.quantizer.get_num_quantizers_for_bandwidth(self.bandwidth)

    def frame_samples(self) -> int:
        return self.model.config.hop_length

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "bandwidth": self.bandwidth}

    def upstream_encode(self, wave: torch.Tensor) -> torch.Tensor:
        return self.model.encode(wave, bandwidth=self.bandwidth).audio_codes[0, 0]  # one chunk, one item

    def upstream_decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode(codes.unsqueeze(0), [None]).audio_values


class QuantizerCountAdapter(UpstreamAudioAdapter):
    """A codec whose encoder takes the number of residual quantizers to use (Mimi, DAC)."""

    def __init__(
        self,
        model_dir: str | Path | None = None,
        hf_config: dict[str, Any] | None = None,
        num_quantizers: int | None = None,
        max_frames: int | None = None,
    ) -> None:
        super().__init__(model_dir, hf_config, max_frames)
        most = self.total_quantizers()
        self.levels = int(num_quantizers if num_quantizers is not None else most)
        if not self.lowest_quantizers() <= self.levels <= most:
            raise ConfigError(f"{self.name}: num_quantizers {self.levels} outside [{self.lowest_quantizers()}, {most}]")

    def total_quantizers(self) -> int:
        raise NotImplementedError

    def lowest_quantizers(self) -> int:
        return 1

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "num_quantizers": self.levels}


@register_tokenizer
class MimiAdapter(QuantizerCountAdapter):
    """Kyutai's Mimi (12.5 Hz frames at 24 kHz); the first level is its semantic codebook, all
    levels (32) by default as upstream, Moshi uses 8."""

    name = "hf-mimi"
    upstream_model = MimiModel
    upstream_config = MimiConfig
    upstream_type = "mimi"

    def frame_samples(self) -> int:
        return self.model.config.frame_size

    def total_quantizers(self) -> int:
        return self.model.config.num_quantizers

    def lowest_quantizers(self) -> int:
        return self.model.config.num_semantic_quantizers

    def upstream_encode(self, wave: torch.Tensor) -> torch.Tensor:
        self.forget_cached_codebooks()
        return self.model.encode(wave, num_quantizers=self.levels).audio_codes[0]

    def upstream_decode(self, codes: torch.Tensor) -> torch.Tensor:
        self.forget_cached_codebooks()
        return self.model.decode(codes).audio_values

    def forget_cached_codebooks(self) -> None:
        """Upstream caches each codebook (`embed_sum / cluster_usage`) in a plain attribute on first
        use, which neither `load_state_dict` nor `.to(device)` updates; recomputing it is cheap."""
        for module in self.model.modules():
            if isinstance(module, MimiEuclideanCodebook):
                module._embed = None


@register_tokenizer
class DacAdapter(QuantizerCountAdapter):
    """Descript's DAC. Waveforms are zero-padded to a whole number of hops, as the upstream
    feature extractor does (`pad_to_multiple_of=hop_length`): its encoder needs it."""

    name = "hf-dac"
    upstream_model = DacModel
    upstream_config = DacConfig
    upstream_type = "dac"

    def frame_samples(self) -> int:
        return self.model.config.hop_length

    def total_quantizers(self) -> int:
        return self.model.config.n_codebooks

    def upstream_encode(self, wave: torch.Tensor) -> torch.Tensor:
        padding = -wave.shape[-1] % self.samples_per_frame
        padded = torch.nn.functional.pad(wave, (0, padding))
        return self.model.encode(padded, n_quantizers=self.levels).audio_codes[0]

    def upstream_decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode(audio_codes=codes).audio_values
