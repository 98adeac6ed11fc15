"""Parity with transformers (litgpt style): tiny random HF models of every supported family are
imported; our logits equal theirs within 1e-4 (fp32) on a full forward, over 8 KV-cached decode
steps, and after an export round trip."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

from mmllm.errors import CheckpointError
from mmllm.model.mmllm import MMLLM

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
CASES = {
    "llama": ("Llama", {}),
    "llama-bias-llama3-rope": ("Llama", {"attention_bias": True, "mlp_bias": True, "rope_parameters": LLAMA3_ROPE}),
    "llama-linear-rope": ("Llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}}),
    "llama-yarn-rope": (
        "Llama",
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "factor": 4.0,
                "rope_theta": 10000.0,
                "original_max_position_embeddings": 32,
            }
        },
    ),
    "llama-tied": ("Llama", {"tie_word_embeddings": True}),
    "qwen2": ("Qwen2", {}),
    "qwen2-sliding-layers": ("Qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    "mistral-sliding": ("Mistral", {"sliding_window": 4}),
    "qwen3-tied": ("Qwen3", {"tie_word_embeddings": True, "head_dim": 16}),
}
TOLERANCE = dict(atol=1e-4, rtol=0)


def make_hf_model(family: str, overrides: dict, seed: int = 0) -> torch.nn.Module:
    config = getattr(transformers, f"{family}Config")(**{**COMMON, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():  # larger than HF's 0.02 init, so a wrong op shows in the logits
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model


@pytest.fixture(params=list(CASES), ids=list(CASES))
def imported(request, tmp_path):
    family, overrides = CASES[request.param]
    hf_model = make_hf_model(family, overrides)
    hf_model.save_pretrained(tmp_path / "hf")
    ours = MMLLM.from_pretrained(tmp_path / "hf").eval()
    assert ours.text_tokenizer is None and ours.layout is None  # a HF dir without tokenizer files
    return hf_model, ours


def test_full_forward_matches(imported):
    hf_model, ours = imported
    ids = torch.randint(0, COMMON["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(ids).logits
        torch.testing.assert_close(ours(ids).logits, expected, **TOLERANCE)
    assert expected.abs().max() > 1.0  # the comparison is not between near-zero tensors


def test_cached_decode_matches(imported):
    hf_model, ours = imported
    ids = torch.randint(0, COMMON["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(2))
    cache = ours.new_kv_cache()
    with torch.no_grad():
        hf_out = hf_model(ids[:, :8], use_cache=True)
        torch.testing.assert_close(ours(ids[:, :8], kv_cache=cache).logits, hf_out.logits, **TOLERANCE)
        past = hf_out.past_key_values
        for t in range(8, 16):
            hf_out = hf_model(ids[:, t : t + 1], past_key_values=past, use_cache=True)
            past = hf_out.past_key_values
            torch.testing.assert_close(ours(ids[:, t : t + 1], kv_cache=cache).logits, hf_out.logits, **TOLERANCE)
    assert len(cache) == 16


def test_export_round_trip(imported, tmp_path):
    hf_model, ours = imported
    ours.export_hf(tmp_path / "export")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(reloaded) is type(hf_model)
    ids = torch.randint(0, COMMON["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, ours(ids).logits, **TOLERANCE)


def test_sliding_window_is_honoured(tmp_path):
    """Mistral's window changes the logits beyond it, so parity above is not by accident."""
    hf_model = make_hf_model("Mistral", {"sliding_window": 4})
    hf_model.save_pretrained(tmp_path)
    windowed = MMLLM.from_pretrained(tmp_path).eval()
    unwindowed = MMLLM(dataclasses.replace(windowed.config, sliding_window=None)).eval()
    unwindowed.load_state_dict(windowed.state_dict())
    ids = torch.randint(0, COMMON["vocab_size"], (1, 12))
    with torch.no_grad():
        a, b = windowed(ids).logits, unwindowed(ids).logits
    torch.testing.assert_close(a[:, :4], b[:, :4], **TOLERANCE)
    assert (a[:, 4:] - b[:, 4:]).abs().max() > 1e-3


def test_unsupported_rope_type_is_refused(tmp_path):
    hf_model = make_hf_model("Llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}})
    hf_model.save_pretrained(tmp_path)
    with pytest.raises(Exception, match="rope_type 'dynamic' is not supported"):
        MMLLM.from_pretrained(tmp_path)


def test_unsupported_architecture_is_refused(tmp_path):
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="unsupported architecture GPT2LMHeadModel"):
        MMLLM.from_pretrained(tmp_path)


def test_partial_rotary_is_refused(tmp_path):
    hf_model = make_hf_model(
        "Llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}
    )
    hf_model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="partial rotary embeddings"):
        MMLLM.from_pretrained(tmp_path)


def test_configs_no_hf_class_represents_are_refused_on_export(tmp_path, tiny_config):
    cases = [
        (dataclasses.replace(tiny_config, qkv_bias=True, head_dim=32), "Qwen2 derives head_dim"),
        (dataclasses.replace(tiny_config, qkv_bias=True, mlp_bias=True), "no mlp bias"),
        (dataclasses.replace(tiny_config, o_proj_bias=True), "attention_bias"),
        (dataclasses.replace(tiny_config, sliding_window=4, mlp_bias=True), "sliding window exports"),
    ]
    for config, message in cases:
        with pytest.raises(CheckpointError, match=message):
            MMLLM(config).export_hf(tmp_path / "out")
    assert not (tmp_path / "out").exists()
