"""Token Assorted's discrete latent codes (Su et al. 2025): a VQ-VAE over chain-of-thought chunks.

A trace's text ids are cut into chunks of `chunk_len` tokens (L = 16 in the paper); each chunk is
encoded into `codes_per_chunk` discrete codes by a quantizer of `mmllm.tokenizers.quantizers`, and a
decoder rebuilds the chunk's tokens from them (cross-entropy, plus the quantizer's VQ losses). The
LLM then reads and writes these codes as ordinary vocabulary ids, so no latent head is needed: the
`assorted` PuzzleFormat (formats.py) replaces the first m chunks of a trace by their codes, m drawn
per example.

The codes are a modality range of the VocabLayout, `CODES_MODALITY` ("latent_codes"), with spans of
their own, `<|begin_latent_codes|> codes <|end_latent_codes|>`, not the `<|bolt|>..<|eolt|>` span:
that span holds Coconut's and CoLaR's continuous `<|latent|>` slots, fed from hidden states rather
than predicted, while codes are predicted tokens; their own range lets `split`, the logit masks and
`token_name` treat them like any other modality with no special case. Build a layout with the range
by listing it beside the others (`codes_range`, or `latent_codes: {codebook_size: K, max_frames: N}`
in a vocab YAML); `check_codes_fit` refuses a codebook the range cannot hold in one line.

The chunk encoder and decoder are position-aware MLPs over a small embedding (order matters in a
chunk; a mean-pooled bag of tokens would lose it), which trains on the toy traces in seconds on CPU.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmllm.chat_template import encode_text
from mmllm.errors import CheckpointError, ConfigError, InputError, LayoutError
from mmllm.tokenizers.quantizers import build_quantizer
from mmllm.vocab import ModalityRange, VocabLayout

logger = logging.getLogger(__name__)

CODES_MODALITY = "latent_codes"
VQVAE_FORMAT = "mmllm.cot_vqvae"


@dataclass
class CotVQVAEConfig:
    """The chunk VQ-VAE's shape; `quantizer` is a `build_quantizer` spec with one level."""

    text_vocab_size: int  # ids of the text tokenizer; one more row is the chunk pad
    chunk_len: int = 16  # L: text tokens per chunk (the paper's compression rate)
    codes_per_chunk: int = 1
    embed_dim: int = 32  # per-token embedding of the encoder and decoder
    hidden_size: int = 256
    latent_dim: int = 32
    quantizer: dict[str, Any] = field(default_factory=lambda: {"kind": "vq", "codebook_size": 64})

    def __post_init__(self) -> None:
        if min(self.text_vocab_size, self.chunk_len, self.codes_per_chunk) < 1:
            raise ConfigError("cot vq-vae: text_vocab_size, chunk_len and codes_per_chunk must be >= 1")


class CotVQVAE(nn.Module):
    """Chunks of text ids (n, chunk_len) <-> codes (n, codes_per_chunk); the pad id is `text_vocab_size`."""

    def __init__(self, config: CotVQVAEConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.pad_id = c.text_vocab_size
        self.quantizer = build_quantizer(c.latent_dim, c.quantizer)
        if self.quantizer.levels != 1:
            raise ConfigError(f"cot vq-vae: the quantizer must have one level, got {self.quantizer.levels}")
        self.embed = nn.Embedding(c.text_vocab_size + 1, c.embed_dim)
        self.position = nn.Parameter(0.02 * torch.randn(c.chunk_len, c.embed_dim))
        self.encoder = nn.Sequential(
            nn.Linear(c.chunk_len * c.embed_dim, c.hidden_size),
            nn.GELU(),
            nn.Linear(c.hidden_size, c.codes_per_chunk * c.latent_dim),
        )
        self.decoder = nn.Sequential(
            nn.Linear(c.codes_per_chunk * c.latent_dim, c.hidden_size),
            nn.GELU(),
            nn.Linear(c.hidden_size, c.chunk_len * c.embed_dim),
        )
        self.unembed = nn.Linear(c.embed_dim, c.text_vocab_size + 1)

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    def _latents(self, chunks: Tensor) -> Tensor:
        x = self.embed(chunks) + self.position
        return self.encoder(x.flatten(1)).view(len(chunks), self.config.codes_per_chunk, self.config.latent_dim)

    def _logits(self, quantized: Tensor) -> Tensor:
        h = self.decoder(quantized.flatten(1)).view(len(quantized), self.config.chunk_len, self.config.embed_dim)
        return self.unembed(F.gelu(h))

    def forward(self, chunks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Reconstruction cross-entropy, the quantizer's loss, and the codes (n, codes_per_chunk)."""
        out = self.quantizer(self._latents(chunks))
        logits = self._logits(out.quantized)
        reconstruction = F.cross_entropy(logits.flatten(0, 1), chunks.flatten())
        return reconstruction, out.loss, out.codes.squeeze(-1)

    @torch.no_grad()
    def encode(self, chunks: Tensor) -> Tensor:
        """Codes (n, codes_per_chunk) of chunks (n, chunk_len) of text ids (pad: `pad_id`)."""
        return self.quantizer.encode(self._latents(chunks)).squeeze(-1)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """The most likely chunk ids (n, chunk_len) of codes (n, codes_per_chunk); pad is `pad_id`."""
        return self._logits(self.quantizer.decode(codes.unsqueeze(-1))).argmax(-1)

    def chunk(self, ids: Sequence[int]) -> Tensor:
        """`ids` cut into chunks (ceil(len / chunk_len), chunk_len), the last one padded."""
        size = self.config.chunk_len
        chunks = torch.full((math.ceil(len(ids) / size), size), self.pad_id, dtype=torch.long)
        chunks.view(-1)[: len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
        return chunks

    def unchunk(self, chunks: Tensor) -> list[int]:
        """The text ids of decoded chunks, pads dropped."""
        return [int(i) for i in chunks.reshape(-1).tolist() if i != self.pad_id]

    def save(self, path: str | Path) -> None:
        """One safetensors file: the tensors, and the config as metadata."""
        from safetensors.torch import save_file

        tensors = {name: t.detach().contiguous() for name, t in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"format": VQVAE_FORMAT, "config": json.dumps(asdict(self.config))})

    @classmethod
    def load(cls, path: str | Path) -> CotVQVAE:
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
        if metadata.get("format") != VQVAE_FORMAT:
            raise CheckpointError(f"{path}: not a cot vq-vae (format is {metadata.get('format')!r})")
        model = cls(CotVQVAEConfig(**json.loads(metadata["config"])))
        model.load_state_dict(load_file(str(path)))
        return model.eval()


def trace_ids(meta: dict[str, Any], text_tokenizer) -> list[int]:
    """A puzzle's chain-of-thought text ids, one step per line (what the chunks cut)."""
    steps = list(meta["steps"])
    return encode_text("".join(f"{step}\n" for step in steps), text_tokenizer) if steps else []


def train_cot_vqvae(
    records: Iterable[dict[str, Any]],
    text_tokenizer,
    config: CotVQVAEConfig | None = None,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
) -> tuple[CotVQVAE, list[float]]:
    """Train a chunk VQ-VAE on the traces of puzzle `records`; returns it (in eval mode) and the
    reconstruction loss of each step."""
    config = config or CotVQVAEConfig(text_vocab_size=len(text_tokenizer))
    if config.text_vocab_size < len(text_tokenizer):
        raise ConfigError(
            f"cot vq-vae: text_vocab_size {config.text_vocab_size} < the text tokenizer's {len(text_tokenizer)}"
        )
    torch.manual_seed(seed)
    model = CotVQVAE(config)
    pieces = [model.chunk(trace_ids(r.get("meta") or r, text_tokenizer)) for r in records]
    chunks = torch.cat([p for p in pieces if len(p)]) if any(len(p) for p in pieces) else None
    if chunks is None:
        raise InputError("cot vq-vae: the records have no chain-of-thought steps to train on")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    history = []
    model.train()
    for _ in range(steps):
        batch = chunks[torch.randint(len(chunks), (min(batch_size, len(chunks)),), generator=generator)]
        reconstruction, vq_loss, _ = model(batch)
        optimizer.zero_grad()
        (reconstruction + vq_loss).backward()
        optimizer.step()
        history.append(reconstruction.item())
    logger.info("cot vq-vae: %d chunks, reconstruction loss %.3f -> %.3f", len(chunks), history[0], history[-1])
    return model.eval(), history


def codes_range(codebook_size: int, max_codes: int) -> ModalityRange:
    """The layout range of a codebook of `codebook_size`, at most `max_codes` codes per span;
    pass it to `VocabLayout.build` beside the other modalities."""
    return ModalityRange(CODES_MODALITY, codebook_size, max_frames=max_codes)


def check_codes_fit(layout: VocabLayout, vqvae: CotVQVAE, codes: int = 0) -> ModalityRange:
    """The layout's codes range, after checking that `vqvae`'s codebook (and a span of `codes`
    codes) fits it; a one-line LayoutError otherwise."""
    if CODES_MODALITY not in layout.modalities:
        raise LayoutError(f"the vocab layout has no '{CODES_MODALITY}' range for Token Assorted's codes")
    m = layout.modalities[CODES_MODALITY]
    if vqvae.codebook_size > m.codebook_size or m.levels != 1:
        raise LayoutError(
            f"the cot vq-vae's codebook of {vqvae.codebook_size} codes does not fit the layout's "
            f"'{CODES_MODALITY}' range ({m.codebook_size} codes x {m.levels} levels)"
        )
    if codes > m.max_length:
        raise LayoutError(f"{codes} latent codes do not fit the '{CODES_MODALITY}' range (at most {m.max_length})")
    return m
