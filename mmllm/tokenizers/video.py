"""Video tokenizers: a causal 3D conv autoencoder, and a per-frame wrapper around an image tokenizer.

`CausalVideoTokenizer` ("video-causal3d") follows the causal video tokenizers of MAGVIT-v2,
Emu3 and VidTok:

- Every convolution is causal in time: it pads only the past, with copies of the first frame,
  so an output frame never sees a later input frame.
- The first frame is therefore coded alone, and each later latent frame covers the next
  `temporal_downsample` frames. A clip of 1 + 4k frames gives 1 + k latent frames: 9 -> 3.
- Space is reduced per frame by patch-merging convolutions, one stage per entry of `channels`
  with its stride in `strides`: the default single 8x8 stage gives 64x64 -> 8x8. Time is then
  folded on that coarse grid by causal convs of kernel 2 and stride 2, and the residual blocks
  run on the few latent frames. 3x3 convolutions
  at full resolution would cost a CPU several times more and, as the image tokenizer measured,
  learn these flat shapes' edges no faster.
- The latent grid (latent frames, rows, cols) is quantized, with FSQ by default, as VidTok does
  to avoid VQ's codebook collapse.

The decoder mirrors the encoder. Each time upsampling is a causal convolution whose extra
channels unfold into 2 frames per latent frame (depth-to-time), and the first surplus frame is
dropped, as MAGVIT-v2 does. So 3 latent frames decode to 5 and then 9 frames, and output frame 0
depends on latent frame 0 only. 2x2 stride-2 transposed convolutions then restore each frame's
pixels. Normalisation is per frame (GroupNorm over channels and space, never time) to keep
causality.

The loss is L2 on pixels in [-1, 1] (`l1_weight` adds L1; off by default, as for images),
plus the quantizer's loss. No perceptual or
adversarial loss is used: there are no pretrained perceptual weights offline, and the toy
world's flat shapes do not need one.

`PerFrameVideoTokenizer` ("video-per-frame") codes each of `num_frames` frames with an image
tokenizer. That tokenizer is held as a submodule, so a saved per-frame tokenizer carries the
image tokenizer's weights and config and needs nothing else to load.

Input convention (`prepare`), shared by both tokenizers:

- A video is uint8 (T, H, W, 3).
- A clip with T != `num_frames` is resampled in time to `num_frames` frames at uniformly spaced
  times, keeping the first and last frame and taking the nearest frame in between.
- Frames of another size are resized to the tokenizer's size with `mmllm.data.media.resize_image`
  (bicubic, aspect not kept).
- Anything else (wrong rank, channel count, dtype, no frames) raises a one-line MediaError.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mmllm.errors import ConfigError, MediaError
from mmllm.tokenizers.base import (
    EncodedBatch,
    ModalityTokenizer,
    check_media_shape,
    load_tokenizer,
    register_tokenizer,
)
from mmllm.tokenizers.image import run_in_chunks
from mmllm.tokenizers.quantizers import build_quantizer

DEFAULT_QUANTIZER = {"kind": "fsq", "bins": [8, 8, 8]}  # 512 codes: the toy layout's video codebook
NORM_GROUPS = 8  # GroupNorm groups (per frame); every width must be divisible by it
IMAGE_EXTRA_DIR = "image_tokenizer_extra"  # where a per-frame tokenizer keeps its image tokenizer's extra files


# ---------------------------------------------------------------- media conventions


def resample_frames(frames: np.ndarray, num_frames: int) -> np.ndarray:
    """`num_frames` frames at uniformly spaced times over the clip (nearest frame; first and last kept)."""
    if len(frames) == num_frames:
        return frames
    index = np.rint(np.linspace(0, len(frames) - 1, num_frames)).astype(np.int64)
    return frames[index]


def prepare_video(item: Any, num_frames: int, size: tuple[int, int], where: str) -> np.ndarray:
    """uint8 (num_frames, *size, 3): the documented resampling and resizing, or a one-line MediaError."""
    from mmllm.data.media import resize_image  # media imports Pillow and soundfile: load on first use

    array = np.asarray(item)
    check_media_shape(array, 4, 3, where, "video")
    if array.dtype != np.uint8:
        raise MediaError(f"{where}: video has dtype {array.dtype}, expected uint8 pixels")
    if 0 in array.shape:
        raise MediaError(f"{where}: video has shape {tuple(array.shape)}, with no frames or pixels")
    array = resample_frames(array, num_frames)
    if array.shape[1:3] != tuple(size):
        array = np.stack([resize_image(frame, size) for frame in array])
    return np.ascontiguousarray(array)


def video_to_tensor(items: list[np.ndarray]) -> Tensor:
    """Prepared uint8 videos (T, H, W, 3) as float (B, 3, T, H, W) in [-1, 1]."""
    batch = torch.from_numpy(np.stack(items)).permute(0, 4, 1, 2, 3).float()
    return batch / 127.5 - 1.0


def tensor_to_video(batch: Tensor) -> list[np.ndarray]:
    """Float (B, 3, T, H, W) in [-1, 1] as uint8 videos (T, H, W, 3), clipped."""
    pixels = ((batch.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return list(pixels.permute(0, 2, 3, 4, 1).numpy())


# ---------------------------------------------------------------- causal building blocks


class CausalConv3d(nn.Module):
    """A 3D convolution that sees only the past: time is padded in front with copies of the first
    frame (kt - 1 of them), space with zeros. With temporal stride s, output frame t covers input
    frames s*t - kt + 1 .. s*t, so T frames give (T - 1) // s + 1 and frame 0 stays alone."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int, int], stride=(1, 1, 1)):
        super().__init__()
        self.time_pad = kernel[0] - 1
        padding = (0, (kernel[1] - 1) // 2, (kernel[2] - 1) // 2)  # 'same' for odd kernels, none for 2x2 patches
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        if self.time_pad:
            x = torch.cat([x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1), x], dim=2)
        return self.conv(x)


def to_frames(x: Tensor) -> Tensor:
    """(B, C, T, H, W) -> (B * T, C, H, W): each frame an image, for per-frame 2D layers."""
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def from_frames(x: Tensor, frames: int) -> Tensor:
    """(B * T, C, H, W) -> (B, C, T, H, W), the inverse of `to_frames`."""
    bt, c, h, w = x.shape
    return x.view(bt // frames, frames, c, h, w).transpose(1, 2)


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm of each frame separately (over a group's channels and H, W): no statistic crosses
    time, so normalisation keeps the convolutions' causality (and batch items stay independent)."""

    def __init__(self, channels: int):
        super().__init__(NORM_GROUPS, channels, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return from_frames(super().forward(to_frames(x)), x.shape[2])


class CausalResBlock(nn.Module):
    """(norm, SiLU, conv) twice plus the input. The first conv is factorised (R(2+1)D, Tran et al.
    2018): a causal (kt, 1, 1) conv over time, then a (1, 3, 3) conv over space; the second is
    spatial. Factorising costs 12 taps instead of 27 for the same receptive field."""

    def __init__(self, channels: int, temporal_kernel: int):
        super().__init__()
        self.body = nn.Sequential(
            FrameGroupNorm(channels),
            nn.SiLU(),
            CausalConv3d(channels, channels, (temporal_kernel, 1, 1)),
            CausalConv3d(channels, channels, (1, 3, 3)),
            FrameGroupNorm(channels),
            nn.SiLU(),
            CausalConv3d(channels, channels, (1, 3, 3)),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def norm_act(channels: int, per_frame: bool = False) -> list[nn.Module]:
    """GroupNorm and SiLU, for (B, C, T, H, W) video or, `per_frame`, for (B * T, C, H, W) frames."""
    return [nn.GroupNorm(NORM_GROUPS, channels, eps=1e-6) if per_frame else FrameGroupNorm(channels), nn.SiLU()]


class CausalEncoder(nn.Module):
    """Video (B, 3, T, H, W) -> latent grid (B, latent_dim, 1 + (T - 1) / 2^time_levels, H / 2^n, W / 2^n).

    Per frame (2D layers on (B * T, C, H, W): a temporal kernel of 1, causal by construction),
    patch-merging stages (s x s stride-s convs, s = strides[i]) bring each patch of side
    prod(strides) to one position. Then causal convs of kernel 2 and stride 2 in time fold frames (2t - 1, 2t) into one,
    frame 0 alone, and residual blocks run on the latent grid. The expensive blocks run on the few
    latent frames, which keeps a CPU fast.
    """

    def __init__(self, channels, strides, time_levels, encoder_blocks, temporal_kernel, latent_dim):
        super().__init__()
        layers: list[nn.Module] = []
        for stage, (width_in, width) in enumerate(itertools.pairwise([3, *channels])):
            stride = strides[stage]
            layers += [
                *(norm_act(width_in, per_frame=True) if stage else []),
                nn.Conv2d(width_in, width, stride, stride=stride),
            ]
        self.per_frame = nn.Sequential(*layers)
        layers = []
        for _ in range(time_levels):
            layers += [*norm_act(channels[-1]), CausalConv3d(channels[-1], channels[-1], (2, 1, 1), (2, 1, 1))]
        layers += [CausalResBlock(channels[-1], temporal_kernel) for _ in range(encoder_blocks)]
        layers += [*norm_act(channels[-1]), CausalConv3d(channels[-1], latent_dim, (1, 1, 1))]
        self.temporal = nn.Sequential(*layers)

    def forward(self, video: Tensor) -> Tensor:
        return self.temporal(from_frames(self.per_frame(to_frames(video)), video.shape[2]))


class CausalUnfold(nn.Module):
    """A causal (2, 1, 1) conv to twice the channels, unfolded into 2 frames per frame, the first
    dropped: T frames -> 2T - 1, and output frame 0 comes from input frame 0 alone."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = CausalConv3d(channels, 2 * channels, (2, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        pairs = self.conv(x).view(b, c, 2, t, h, w).transpose(2, 3).reshape(b, c, 2 * t, h, w)
        return pairs[:, :, 1:]


class CausalDecoder(nn.Module):
    """The encoder mirrored: residual blocks on the latent grid, causal temporal unfolding, residual
    blocks at the full frame rate, then per frame s x s stride-s transposed convolutions (patch
    splitting) back to pixels.

    The unfolding is pointwise in space, so without the full-rate blocks each output frame's
    patches would be a per-position function of the latent: a shape moving across patches within
    one latent frame could only be drawn from features prepared for every frame in advance.
    """

    def __init__(self, channels, strides, time_levels, decoder_blocks, frame_blocks, temporal_kernel, latent_dim):
        super().__init__()
        width = channels[-1]
        layers: list[nn.Module] = [CausalConv3d(latent_dim, width, (temporal_kernel, 3, 3))]
        layers += [CausalResBlock(width, temporal_kernel) for _ in range(decoder_blocks)]
        for _ in range(time_levels):
            layers += [*norm_act(width), CausalUnfold(width)]
        layers += [CausalResBlock(width, temporal_kernel) for _ in range(frame_blocks)]
        self.temporal = nn.Sequential(*layers)
        layers = []
        for stage in reversed(range(len(channels))):
            out = channels[stage - 1] if stage else 3
            layers += [
                *norm_act(channels[stage], per_frame=True),
                nn.ConvTranspose2d(channels[stage], out, strides[stage], stride=strides[stage]),
            ]
        self.per_frame = nn.Sequential(*layers)

    def forward(self, latent: Tensor) -> Tensor:
        features = self.temporal(latent)
        return from_frames(self.per_frame(to_frames(features)), features.shape[2])


def _power_of_two_log(value: int, what: str) -> int:
    if value < 1 or value & (value - 1):
        raise ConfigError(f"video tokenizer: {what} must be a power of 2, got {value}")
    return int(math.log2(value))


# ---------------------------------------------------------------- the causal 3D tokenizer


@register_tokenizer
class CausalVideoTokenizer(ModalityTokenizer):
    """Causal 3D conv autoencoder with a quantized (latent frames, rows, cols) grid; see the module doc."""

    name = "video-causal3d"
    modality = "video"
    trainable = True

    def __init__(
        self,
        num_frames: int = 9,  # the toy world's clips: 1 + 4k frames
        size: int = 64,  # frame side in pixels
        channels: list[int] | tuple[int, ...] = (128,),  # width after each spatial patch-merging stage
        strides: list[int] | tuple[int, ...] = (8,),  # each stage's spatial downsampling: 64x64 -> 8x8
        temporal_downsample: int = 4,  # 1 + 4k frames -> 1 + k latent frames
        encoder_blocks: int = 1,  # residual blocks on the latent grid
        decoder_blocks: int = 1,  # residual blocks on the latent grid
        decoder_frame_blocks: int = 1,  # residual blocks at the full frame rate (CausalDecoder's docstring)
        temporal_kernel: int = 3,  # latent frames a residual block's causal conv sees (itself + 2 past)
        latent_dim: int = 3,  # channels of the latent grid (3 = FSQ's channels for bins [8, 8, 8])
        quantizer: dict[str, Any] | None = None,
        l1_weight: float = 0.0,  # off by default, as for the image tokenizer (image.py's docstring)
        l2_weight: float = 1.0,
    ):
        super().__init__()
        downsample = math.prod(strides)
        time_levels = _power_of_two_log(temporal_downsample, "temporal_downsample")
        if (num_frames - 1) % temporal_downsample:
            raise ConfigError(f"video tokenizer: num_frames {num_frames} is not 1 + k * {temporal_downsample}")
        if not channels or any(c % NORM_GROUPS for c in channels) or len(strides) != len(channels):
            raise ConfigError(
                f"video tokenizer: channels {list(channels)} must be widths that are multiples of {NORM_GROUPS}, "
                f"one per entry of strides {list(strides)}"
            )
        if min(strides) < 1 or size % downsample:
            raise ConfigError(f"video tokenizer: strides {list(strides)} must be >= 1 and divide size {size}")
        self.num_frames, self.size = num_frames, size
        self.config = {
            "num_frames": num_frames,
            "size": size,
            "channels": list(channels),
            "strides": list(strides),
            "temporal_downsample": temporal_downsample,
            "encoder_blocks": encoder_blocks,
            "decoder_blocks": decoder_blocks,
            "decoder_frame_blocks": decoder_frame_blocks,
            "temporal_kernel": temporal_kernel,
            "latent_dim": latent_dim,
            "quantizer": dict(quantizer or DEFAULT_QUANTIZER),
            "l1_weight": l1_weight,
            "l2_weight": l2_weight,
        }
        self.encoder = CausalEncoder(channels, strides, time_levels, encoder_blocks, temporal_kernel, latent_dim)
        self.decoder = CausalDecoder(
            channels, strides, time_levels, decoder_blocks, decoder_frame_blocks, temporal_kernel, latent_dim
        )
        self.quantizer = build_quantizer(latent_dim, self.config["quantizer"])
        self.codebook_size = self.quantizer.codebook_size
        self.levels = self.quantizer.levels
        self.grid = (1 + (num_frames - 1) // temporal_downsample, size // downsample, size // downsample)
        self.max_frames = None

    def get_config(self) -> dict[str, Any]:
        return dict(self.config)

    def prepare(self, item: Any, where: str = "input") -> np.ndarray:
        return prepare_video(item, self.num_frames, (self.size, self.size), where)

    def blank(self) -> np.ndarray:
        return np.zeros((self.num_frames, self.size, self.size, 3), dtype=np.uint8)

    # ------------------------------------------------------------ network

    def quantize(self, video: Tensor):
        """Encoder and quantizer: (B, 3, T, H, W) -> QuantizerOutput over the channels-last latent grid."""
        latent = self.encoder(video).permute(0, 2, 3, 4, 1)  # (B, t, h, w, dim)
        return self.quantizer(latent)

    def reconstruct(self, quantized: Tensor) -> Tensor:
        """Decoder: a channels-last quantized grid (B, t, h, w, dim) -> video (B, 3, T, H, W)."""
        return self.decoder(quantized.permute(0, 4, 1, 2, 3))

    def forward(self, video: Tensor) -> tuple[Tensor, Any]:
        out = self.quantize(video)
        return self.reconstruct(out.quantized), out

    # ------------------------------------------------------------ encode / decode

    def encode_codes(self, video: Tensor) -> Tensor:
        """Video (B, 3, T, H, W) -> codes (B, latent frames, rows, cols, levels)."""
        return self.quantizer.encode(self.encoder(video).permute(0, 2, 3, 4, 1))

    def decode_codes(self, codes: Tensor) -> Tensor:
        """Codes (B, latent frames, rows, cols, levels) -> video (B, 3, T, H, W) in about [-1, 1]."""
        return self.reconstruct(self.quantizer.decode(codes))

    def _encode(self, items: list[np.ndarray]) -> EncodedBatch:
        codes = run_in_chunks(self.encode_codes, video_to_tensor(items)).reshape(len(items), -1, self.levels)
        return EncodedBatch(codes, torch.full((len(items),), codes.shape[1], dtype=torch.long))

    def _decode(self, codes: list[np.ndarray]) -> list[np.ndarray]:
        grid = torch.from_numpy(np.stack(codes)).view(len(codes), *self.grid, self.levels)
        return tensor_to_video(run_in_chunks(self.decode_codes, grid))

    # ------------------------------------------------------------ training

    def collate(self, items: list[np.ndarray]) -> Tensor:
        return video_to_tensor(items)

    def training_loss(self, batch: Tensor) -> tuple[Tensor, dict[str, float]]:
        reconstruction, out = self(batch)
        l1 = (reconstruction - batch).abs().mean()
        l2 = (reconstruction - batch).pow(2).mean()
        loss = self.config["l1_weight"] * l1 + self.config["l2_weight"] * l2 + out.loss
        usage = self.quantizer.usage(out.codes)
        return loss, {"l1": l1.item(), "l2": l2.item(), "quantizer_loss": out.loss.item(), **usage}


# ---------------------------------------------------------------- per-frame image tokenizer


@register_tokenizer
class PerFrameVideoTokenizer(ModalityTokenizer):
    """Each of `num_frames` frames coded by an image tokenizer: a (num_frames, *image grid) grid.

    `image_tokenizer` is a saved image tokenizer directory or a registry name (then built from
    `image_config`). The image tokenizer is a submodule; `get_config` stores its registry name
    and config, so a saved per-frame tokenizer loads without the original directory.
    """

    name = "video-per-frame"
    modality = "video"

    def __init__(self, image_tokenizer: str = "image-conv", image_config: dict[str, Any] | None = None, num_frames=9):
        super().__init__()
        if num_frames < 1:
            raise ConfigError(f"video-per-frame: num_frames must be >= 1, got {num_frames}")
        image = load_tokenizer(image_tokenizer, **(image_config or {}))
        if image.modality != "image":
            raise ConfigError(f"video-per-frame: {image_tokenizer} is a {image.modality} tokenizer, not an image one")
        if image.grid is None:
            raise ConfigError(f"video-per-frame: {image_tokenizer} has no fixed grid (ragged codes per image)")
        self.image = image
        self.num_frames = num_frames
        self.codebook_size = image.codebook_size
        self.levels = image.levels
        self.grid = (num_frames, *image.grid)
        self.max_frames = None
        self.can_decode = image.can_decode

    def get_config(self) -> dict[str, Any]:
        return {
            "image_tokenizer": self.image.name,
            "image_config": self.image.get_config(),
            "num_frames": self.num_frames,
        }

    def save_extra(self, directory: Path) -> None:
        extra = directory / IMAGE_EXTRA_DIR
        extra.mkdir()
        self.image.save_extra(extra)

    def load_extra(self, directory: Path) -> None:
        self.image.load_extra(directory / IMAGE_EXTRA_DIR)

    def prepare(self, item: Any, where: str = "input") -> np.ndarray:
        """Resample to `num_frames` (see the module doc), then each frame through the image tokenizer's `prepare`."""
        array = np.asarray(item)
        check_media_shape(array, 4, 3, where, "video")
        if array.shape[0] == 0:
            raise MediaError(f"{where}: video has shape {tuple(array.shape)}, with no frames")
        frames = resample_frames(array, self.num_frames)
        return np.stack([self.image.prepare(frame, f"{where} frame {t}") for t, frame in enumerate(frames)])

    def blank(self) -> np.ndarray:
        return np.stack([self.image.blank()] * self.num_frames)

    def code_appearance(self) -> np.ndarray | None:
        """The image tokenizer's: a code looks the same in every frame."""
        return self.image.code_appearance()

    def _encode(self, items: list[np.ndarray]) -> EncodedBatch:
        frames = [frame for video in items for frame in video]
        codes = self.image._encode(frames).codes  # (B * T, frames per image, levels)
        codes = codes.reshape(len(items), -1, self.levels)
        return EncodedBatch(codes, torch.full((len(items),), codes.shape[1], dtype=torch.long))

    def _decode(self, codes: list[np.ndarray]) -> list[np.ndarray]:
        per_image = int(np.prod(self.image.grid))
        frames = [frame for item in codes for frame in item.reshape(self.num_frames, per_image, self.levels)]
        images = self.image._decode(frames)
        return [np.stack(images[i : i + self.num_frames]) for i in range(0, len(images), self.num_frames)]
