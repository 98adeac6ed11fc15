"""CUDA paths: bf16, SDPA's flash backend, and cached decoding on the GPU.

Marked `gpu`: deselected on machines without CUDA, run by `make test-gpu`.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from mmllm.model.backbone import CausalLM

pytestmark = pytest.mark.gpu


@pytest.fixture()
def models(tiny_config):
    config = dataclasses.replace(
        tiny_config, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32
    )
    torch.manual_seed(0)
    fp32 = CausalLM(config).cuda().eval()
    bf16 = CausalLM(config).cuda().eval()
    bf16.load_state_dict(fp32.state_dict())
    return fp32, bf16.to(torch.bfloat16)


def test_bf16_forward_matches_fp32(models):
    fp32, bf16 = models
    ids = torch.randint(0, 256, (4, 64), device="cuda")
    with torch.no_grad():
        reference, low = fp32(ids).logits, bf16(ids).logits.float()
    assert (low - reference).abs().max() < 0.05 * reference.abs().max()


def test_causal_path_runs_on_the_flash_backend(models):
    """Plain causal batches take SDPA's mask-free path, which the flash kernel accepts."""
    _, bf16 = models
    ids = torch.randint(0, 256, (2, 128), device="cuda")
    with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        logits = bf16(ids).logits
    assert torch.isfinite(logits).all()


def test_cached_decode_matches_full_forward_on_cuda(models):
    fp32, _ = models
    ids = torch.randint(0, 256, (2, 24), device="cuda")
    cache = fp32.new_kv_cache(capacity=24)
    with torch.no_grad():
        full = fp32(ids).logits
        steps = [fp32(ids[:, :16], kv_cache=cache).logits]
        steps += [fp32(ids[:, t : t + 1], kv_cache=cache).logits for t in range(16, 24)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-3, rtol=1e-3)
