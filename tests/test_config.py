"""YAML configs map onto dataclasses; malformed keys get one clear line."""

from __future__ import annotations

import pytest
import torch

from mmllm.errors import ConfigError
from mmllm.model.backbone import CausalLM
from mmllm.model.config import ModelConfig

from .conftest import REPO


@pytest.mark.parametrize(
    "name, parameters",
    [
        ("tiny", None),
        ("toy", None),
        ("1b", 1_235_814_400),  # Llama-3.2-1B's published count
        ("7b", 6_738_415_616),  # Llama-2-7B's published count
    ],
)
def test_reference_configs(name, parameters):
    config = ModelConfig.from_yaml(REPO / "configs" / "model" / f"{name}.yaml")
    with torch.device("meta"):
        model = CausalLM(config)
    counted = sum(p.numel() for p in model.parameters())
    assert counted == config.num_parameters()
    if parameters is not None:
        assert counted == parameters


@pytest.mark.parametrize(
    "name, last_logits, mean_abs",
    [
        ("tiny", [0.308323, 0.158969, 0.009289, -0.078614], 0.128669),
        ("toy", [-0.349513, -0.163474, 0.381713, 0.072674], 0.260131),
    ],
)
def test_golden_logits(name, last_logits, mean_abs):
    """Pins each config's outputs (fixed seed, fixed input) against unnoticed changes (open_clip style)."""
    config = ModelConfig.from_yaml(REPO / "configs" / "model" / f"{name}.yaml", ["vocab_size=256"])
    torch.manual_seed(1234)
    model = CausalLM(config).eval()
    with torch.no_grad():
        logits = model(torch.arange(16)[None] * 7 % 256).logits
    assert logits.shape == (1, 16, 256)
    torch.testing.assert_close(logits[0, -1, :4], torch.tensor(last_logits), atol=1e-4, rtol=0)
    assert abs(logits.abs().mean().item() - mean_abs) < 1e-4


def test_overrides_apply_and_are_typed():
    config = ModelConfig.from_yaml(REPO / "configs" / "model" / "tiny.yaml", ["num_hidden_layers=3", "z_loss=1e-4"])
    assert config.num_hidden_layers == 3 and config.z_loss == 1e-4


@pytest.mark.parametrize(
    "text, message",
    [
        ("hiden_size: 64\n", "unknown key 'hiden_size' for ModelConfig (did you mean 'hidden_size'?)"),
        ("hidden_size: big\n", "hidden_size: expected int, got 'big'"),
        ("hidden_size: [64\n", "not valid YAML"),
        ("- 1\n- 2\n", "expected a mapping"),
        ("num_attention_heads: 6\nnum_key_value_heads: 4\n", "must be a multiple"),
        ("layer_types: [sliding_attention]\n", "layer_types has 1 entries"),
    ],
)
def test_malformed_yaml_is_one_clear_line(tmp_path, text, message):
    path = tmp_path / "model.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_yaml(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        ModelConfig.from_yaml(tmp_path / "absent.yaml")


def test_bad_override():
    with pytest.raises(ConfigError, match="expected key=value"):
        ModelConfig.from_yaml(REPO / "configs" / "model" / "tiny.yaml", ["num_hidden_layers"])
