"""Latent-reasoning heads at the backbone's hook points: continuous thought (Coconut), its curriculum,
compressed latents (CoLaR), latent visual tokens (Mirage), Token Assorted's discrete latent codes (a
chunk VQ-VAE, assorted.py), the baselines' data formats, and batched KV-cached latent decoding. See
base.py for the contract; train.py drives a curriculum through the finetuning loop (`mmllm latent-train`)."""

from mmllm.model.latent.assorted import (
    CODES_MODALITY,
    CotVQVAE,
    CotVQVAEConfig,
    check_codes_fit,
    codes_range,
    train_cot_vqvae,
)
from mmllm.model.latent.base import (
    HEADS,
    LATENT_HEAD_FILE,
    LatentHead,
    attach_latent_head,
    build_head,
    find_latent_head,
    latent_forward,
    load_latent_head,
    read_latent_head,
)
from mmllm.model.latent.coconut import CoconutHead
from mmllm.model.latent.colar import ColarHead, colar_generate
from mmllm.model.latent.curriculum import CoconutCurriculum, LatentHeadHooks
from mmllm.model.latent.formats import PuzzleFormat, encode_puzzle, prompt_suffix, write_puzzle_shards
from mmllm.model.latent.generate import LatentOutput, latent_generate
from mmllm.model.latent.mirage import MirageHead, visual_targets

__all__ = [
    "CODES_MODALITY",
    "HEADS",
    "LATENT_HEAD_FILE",
    "CoconutCurriculum",
    "CoconutHead",
    "ColarHead",
    "CotVQVAE",
    "CotVQVAEConfig",
    "LatentHead",
    "LatentHeadHooks",
    "LatentOutput",
    "MirageHead",
    "PuzzleFormat",
    "attach_latent_head",
    "build_head",
    "check_codes_fit",
    "codes_range",
    "colar_generate",
    "encode_puzzle",
    "find_latent_head",
    "latent_forward",
    "latent_generate",
    "load_latent_head",
    "prompt_suffix",
    "read_latent_head",
    "train_cot_vqvae",
    "visual_targets",
    "write_puzzle_shards",
]
