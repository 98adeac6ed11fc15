"""Code rows started from the codes' decoded look: which rows change, how, and what stays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmllm.errors import ConfigError
from mmllm.model.code_init import init_code_rows, standardised
from mmllm.tokenizers.base import APPEARANCE_FEATURES

from .conftest import REPO, random_toy_tokenizers, toy_vocab_layout


@pytest.fixture(scope="module")
def tokenizers():
    torch.manual_seed(0)
    return random_toy_tokenizers()


@pytest.fixture()
def fresh_model(text_tokenizer):
    from mmllm.model.config import ModelConfig
    from mmllm.model.mmllm import MMLLM

    torch.manual_seed(0)
    config = ModelConfig.from_yaml(REPO / "configs" / "model" / "tiny.yaml")
    return MMLLM.from_config(config, toy_vocab_layout(text_tokenizer), text_tokenizer)


def test_code_appearance_is_the_decoded_item_of_one_code(tokenizers):
    image = tokenizers["image"]
    looks = image.code_appearance()
    assert looks.shape == (image.codebook_size, APPEARANCE_FEATURES)  # 64x64x3 values, subsampled
    uniform = image.decode([np.full((64, 1), 5)]).media[0].astype(np.float32).reshape(-1)
    assert set(np.round(looks[5]).tolist()) <= set(uniform.tolist())  # code 5's look is read from its own image
    assert not np.allclose(looks[5], looks[6])
    actions = tokenizers["action"].code_appearance()  # 10 x 2 values: small enough to keep whole
    assert actions.shape == (256, 20) and np.allclose(actions[0], actions[0][0])  # a constant chunk
    assert tokenizers["audio"].code_appearance() is None  # two residual levels: a code alone means nothing


def test_rows_start_with_the_geometry_of_the_looks(fresh_model, tokenizers):
    model = fresh_model
    embed_before = model.model.embed_tokens.weight.detach().clone()
    head_before = model.lm_head.weight.detach().clone()
    changed = init_code_rows(model, {"image": tokenizers["image"], "audio": tokenizers["audio"]}, 2.0, seed=0)
    assert changed == ["image"]
    image = model.layout.modality("image")
    codes = slice(image.start, image.start + image.codebook_size)
    added = model.model.embed_tokens.weight.detach()[codes] - embed_before[codes]
    assert added.std().item() == pytest.approx(2.0 * model.config.initializer_range, rel=1e-3)
    # Codes that look alike get alike rows: pairwise distances follow those of the looks.
    looks = standardised(tokenizers["image"].code_appearance())
    look_distance, row_distance = torch.cdist(looks, looks).flatten(), torch.cdist(added, added).flatten()
    assert torch.corrcoef(torch.stack([look_distance, row_distance]))[0, 1] > 0.8
    head_added = model.lm_head.weight.detach()[codes] - head_before[codes]
    assert head_added.abs().sum() > 0 and not torch.allclose(head_added, added)  # the untied head too
    untouched = torch.ones(len(embed_before), dtype=torch.bool)
    untouched[codes] = False
    assert torch.equal(model.model.embed_tokens.weight.detach()[untouched], embed_before[untouched])  # text, audio


def test_same_seed_same_rows(text_tokenizer, tokenizers):
    from mmllm.model.config import ModelConfig
    from mmllm.model.mmllm import MMLLM

    rows = []
    for _ in range(2):
        torch.manual_seed(0)
        config = ModelConfig.from_yaml(REPO / "configs" / "model" / "tiny.yaml")
        model = MMLLM.from_config(config, toy_vocab_layout(text_tokenizer), text_tokenizer)
        init_code_rows(model, {"image": tokenizers["image"]}, 1.0, seed=3)
        rows.append(model.model.embed_tokens.weight.detach())
    assert torch.equal(rows[0], rows[1])


def test_constant_features_are_dropped():
    looks = np.array([[1.0, 0.0, 2.0], [3.0, 0.0, 2.0], [5.0, 0.0, 2.0]])
    features = standardised(looks)
    assert features.shape == (3, 1) and torch.allclose(features[:, 0], torch.tensor([-1.0, 0.0, 1.0]))


def test_a_negative_scale_is_refused(tmp_path):
    from mmllm.training.config import PretrainConfig, SourceConfig

    config = PretrainConfig(vocab=str(tmp_path), code_row_init=-1.0)
    config.data.sources = (SourceConfig(str(tmp_path)),)
    with pytest.raises(ConfigError, match="code_row_init must be >= 0"):
        config.check()
