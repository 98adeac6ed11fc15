"""A TiTok-style 1D image tokenizer: K learned latent tokens, any prefix decodable ("image-titok").

    image (H, W, 3) -> patches (P, p*p*3) -> encoder ViT over [P patches + K latent tokens]
        -> the K latent outputs -> quantizer (FSQ by default) -> codes (K, levels)
    codes (n <= K, levels) -> decoder ViT over [n latent tokens + P mask tokens] -> patches -> image

TiTok (Yu et al. 2024) drops the 2D grid: K learned tokens read the whole image through
attention, so a token can describe anything, anywhere. We add nested (tail-token) dropout from
FlexTok and One-D-Piece: each training image keeps a random prefix of 1..K tokens and the decoder
never sees the tail (attention masks it out, exactly as if it were removed). The first tokens
must then carry the coarse content on their own and later ones refine it, so any prefix decodes
and reconstruction error does not grow with the prefix length. The tokenizer is ragged
(`grid` None, `max_frames` K): `encode` gives all K tokens, and a caller wanting a smaller
budget keeps a prefix. Like `image-conv` there is no perceptual loss (no weights offline); the
losses are L1 and L2 on pixels in [-1, 1] plus the quantizer's own.

Images are resized to `image_size` square (the same convention and input checks as image-conv),
and inference runs on fixed-size micro-batches so codes and pixels do not depend on the batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmllm.data.media import resize_image
from mmllm.errors import ConfigError
from mmllm.tokenizers.base import EncodedBatch, ModalityTokenizer, register_tokenizer
from mmllm.tokenizers.image import (
    DEFAULT_QUANTIZER,
    images_to_tensor,
    run_in_chunks,
    tensor_to_images,
    to_rgb_uint8,
)
from mmllm.tokenizers.quantizers import build_quantizer

POSITION_INIT_STD = 0.02  # ViT's initialisation of learned embeddings


class TransformerBlock(nn.Module):
    """Pre-norm ViT block: masked multi-head self-attention, then a GELU MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        if width % heads:
            raise ConfigError(f"image-titok: width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: Tensor, visible: Tensor | None = None) -> Tensor:
        """`visible` (B, 1, 1, N) bool: the keys each query may attend to (None: all)."""
        batch, tokens, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, tokens, width))
        return x + self.mlp(self.norm2(x))


def learned_embedding(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) * POSITION_INIT_STD)


class TiTokEncoder(nn.Module):
    """Pixels (B, 3, H, W) to K latent vectors (B, K, latent_dim)."""

    def __init__(self, patches: int, patch_dim: int, tokens: int, width: int, depth: int, heads: int, latent_dim: int):
        super().__init__()
        self.patch_embed = nn.Linear(patch_dim, width)
        self.patch_position = learned_embedding(patches, width)
        self.latent_tokens = learned_embedding(tokens, width)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, 4) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.to_latent = nn.Linear(width, latent_dim)

    def forward(self, patches: Tensor) -> Tensor:
        x = self.patch_embed(patches) + self.patch_position
        x = torch.cat([x, self.latent_tokens.expand(x.shape[0], -1, -1)], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.to_latent(self.norm(x[:, -self.latent_tokens.shape[0] :]))


class TiTokDecoder(nn.Module):
    """The first `keep[b]` of K latent vectors (B, K, latent_dim) to patches (B, P, patch_dim)."""

    def __init__(self, patches: int, patch_dim: int, tokens: int, width: int, depth: int, heads: int, latent_dim: int):
        super().__init__()
        self.from_latent = nn.Linear(latent_dim, width)
        self.latent_position = learned_embedding(tokens, width)
        self.mask_token = learned_embedding(width)
        self.patch_position = learned_embedding(patches, width)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, 4) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.to_patches = nn.Linear(width, patch_dim)

    def forward(self, latents: Tensor, keep: Tensor) -> Tensor:
        batch, tokens = latents.shape[:2]
        patches = (self.mask_token + self.patch_position).expand(batch, -1, -1)
        x = torch.cat([self.from_latent(latents) + self.latent_position, patches], dim=1)
        kept = torch.arange(tokens, device=keep.device)[None, :] < keep[:, None]
        visible = torch.cat([kept, kept.new_ones(batch, patches.shape[1])], dim=1)[:, None, None, :]
        for block in self.blocks:
            x = block(x, visible)
        return self.to_patches(self.norm(x[:, tokens:]))


@register_tokenizer
class TiTokTokenizer(ModalityTokenizer):
    """TiTok-style 1D tokenizer with nested dropout; see the module docstring."""

    name = "image-titok"
    modality = "image"
    trainable = True

    def __init__(
        self,
        image_size: int = 64,
        patch_size: int = 8,  # 64x64 -> 8x8 = 64 patches
        num_tokens: int = 32,  # K latent tokens (TiTok's 32 for 256x256; the toy budget is 64)
        width: int = 128,
        encoder_depth: int = 4,
        decoder_depth: int = 4,
        heads: int = 4,
        latent_dim: int = 8,  # channels fed to the quantizer (FSQ projects them to len(bins))
        quantizer: dict[str, Any] | None = None,  # build_quantizer spec; default FSQ [8, 8, 8]
        l1_weight: float = 1.0,
        l2_weight: float = 1.0,
        min_tokens: int = 1,  # shortest prefix nested dropout keeps
    ):
        super().__init__()
        if image_size % patch_size:
            raise ConfigError(f"image-titok: image_size {image_size} is not a multiple of patch_size {patch_size}")
        if not 1 <= min_tokens <= num_tokens:
            raise ConfigError(f"image-titok: min_tokens {min_tokens} must be in [1, num_tokens={num_tokens}]")
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_tokens = num_tokens
        self.width = width
        self.encoder_depth = encoder_depth
        self.decoder_depth = decoder_depth
        self.heads = heads
        self.latent_dim = latent_dim
        self.quantizer_spec = dict(quantizer or DEFAULT_QUANTIZER)
        self.l1_weight = l1_weight
        self.l2_weight = l2_weight
        self.min_tokens = min_tokens

        side = image_size // patch_size
        shape = (side * side, 3 * patch_size * patch_size, num_tokens, width)
        self.encoder = TiTokEncoder(*shape, encoder_depth, heads, latent_dim)
        self.quantizer = build_quantizer(latent_dim, self.quantizer_spec)
        self.decoder = TiTokDecoder(*shape, decoder_depth, heads, latent_dim)

        self.codebook_size = self.quantizer.codebook_size
        self.levels = self.quantizer.levels
        self.grid = None
        self.max_frames = num_tokens

    def get_config(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "num_tokens": self.num_tokens,
            "width": self.width,
            "encoder_depth": self.encoder_depth,
            "decoder_depth": self.decoder_depth,
            "heads": self.heads,
            "latent_dim": self.latent_dim,
            "quantizer": dict(self.quantizer_spec),
            "l1_weight": self.l1_weight,
            "l2_weight": self.l2_weight,
            "min_tokens": self.min_tokens,
        }

    # ------------------------------------------------------------ media

    def prepare(self, item: Any, where: str = "input") -> np.ndarray:
        """uint8 RGB (image_size, image_size, 3): resized (stretched) when it is another size."""
        image = to_rgb_uint8(item, where)
        return resize_image(image, (self.image_size, self.image_size))

    def blank(self) -> np.ndarray:
        return np.zeros((self.image_size, self.image_size, 3), dtype=np.uint8)

    def collate(self, items: list[np.ndarray]) -> Tensor:
        return images_to_tensor(items)

    def patchify(self, pixels: Tensor) -> Tensor:
        """(B, 3, H, W) to (B, P, p*p*3), patches row-major."""
        batch, channels, height, width = pixels.shape
        p = self.patch_size
        x = pixels.reshape(batch, channels, height // p, p, width // p, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(batch, (height // p) * (width // p), p * p * channels)

    def unpatchify(self, patches: Tensor) -> Tensor:
        """(B, P, p*p*3) to (B, 3, H, W)."""
        batch, p, side = patches.shape[0], self.patch_size, self.image_size // self.patch_size
        x = patches.reshape(batch, side, side, p, p, 3)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(batch, 3, self.image_size, self.image_size)

    # ------------------------------------------------------------ encode / decode

    def encode_latents(self, pixels: Tensor) -> Tensor:
        """Pixels (B, 3, H, W) to codes (B, K, levels)."""
        return self.quantizer.encode(self.encoder(self.patchify(pixels)))

    def decode_prefixes(self, codes: Tensor) -> Tensor:
        """Codes (B, K, levels), -1 past each item's prefix, to pixels (B, 3, H, W) in about [-1, 1]."""
        keep = (codes[..., 0] >= 0).sum(dim=1)
        latents = self.quantizer.decode(codes.clamp(min=0))
        return self.unpatchify(self.decoder(latents, keep))

    def _encode(self, items: list[np.ndarray]) -> EncodedBatch:
        codes = run_in_chunks(self.encode_latents, images_to_tensor(items))
        return EncodedBatch(codes, torch.full((len(items),), self.num_tokens, dtype=torch.long))

    def _decode(self, codes: list[np.ndarray]) -> list[np.ndarray]:
        padded = torch.full((len(codes), self.num_tokens, self.levels), -1, dtype=torch.long)
        for row, item in zip(padded, codes, strict=True):
            row[: len(item)] = torch.from_numpy(item)
        return tensor_to_images(run_in_chunks(self.decode_prefixes, padded))

    def repair(self, item: Any) -> tuple[np.ndarray, str]:
        """The base repair (clamp, levels, at most K tokens, at least one); never raises."""
        try:
            return super().repair(item)
        except Exception as err:  # e.g. a 0-d array; malformed codes must never take decoding down
            return np.zeros((1, self.levels), dtype=np.int64), f"unusable codes ({type(err).__name__}: {err})"

    # ------------------------------------------------------------ training

    def training_loss(self, batch: Tensor) -> tuple[Tensor, dict[str, float]]:
        """L1 + L2 + quantizer loss, each image decoded from a random prefix (nested dropout)."""
        quantized = self.quantizer(self.encoder(self.patchify(batch)))
        keep = torch.randint(self.min_tokens, self.num_tokens + 1, (batch.shape[0],))
        reconstruction = self.unpatchify(self.decoder(quantized.quantized, keep))
        l1 = (reconstruction - batch).abs().mean()
        l2 = (reconstruction - batch).pow(2).mean()
        loss = self.l1_weight * l1 + self.l2_weight * l2 + quantized.loss
        # PSNR of pixels in [0, 1]: the [-1, 1] error is twice as large, its square four times
        logs = {"l1": float(l1.detach()), "psnr": float(10 * torch.log10(4 / l2.detach().clamp(min=1e-10)))}
        return loss, {**logs, **self.quantizer.usage(quantized.codes)}
