"""Self-contained checkpoints: save/load, sharding, atomic writes, vocab extension, HF export of
the tokenizer, and a clear one-line error for every broken checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from mmllm.errors import CheckpointError, LayoutError
from mmllm.model.mmllm import MMLLM
from mmllm.model.weights import INDEX_FILE, atomic_directory
from mmllm.vocab import ModalityRange, VocabLayout

from .conftest import save_tiny_hf


@pytest.fixture()
def model(tiny_config, toy_layout, text_tokenizer):
    torch.manual_seed(0)
    return MMLLM.from_config(tiny_config, toy_layout, text_tokenizer).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_native_round_trip_is_self_contained(model, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {
        "config.json",
        "model.safetensors",
        "vocab_layout.json",
        "text_tokenizer",
    }
    loaded = MMLLM.from_pretrained(tmp_path / "ckpt")
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    assert loaded.layout.to_dict() == model.layout.to_dict()
    assert len(loaded.text_tokenizer) == len(model.text_tokenizer)


def test_sharded_checkpoint_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path / "ckpt", max_shard_bytes=200_000)
    index = json.loads((tmp_path / "ckpt" / INDEX_FILE).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((tmp_path / "ckpt" / s).is_file() for s in shards)
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    assert torch.equal(logits(MMLLM.from_pretrained(tmp_path / "ckpt"), ids), logits(model, ids))


def test_failed_save_leaves_the_old_checkpoint(model, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    before = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "ckpt") as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp dirs left behind
    MMLLM.from_pretrained(tmp_path / "ckpt")


def test_extend_vocab_keeps_old_rows_and_starts_new_rows_near_the_mean(tmp_path, text_tokenizer):
    base_rows = len(text_tokenizer) + 40  # a pretrained model with unused padding rows
    save_tiny_hf(tmp_path / "hf", vocab_size=base_rows)
    model = MMLLM.from_pretrained(tmp_path / "hf", text_tokenizer=text_tokenizer)
    old_embed = model.model.embed_tokens.weight.clone()
    old_head = model.lm_head.weight.clone()
    layout = VocabLayout.build(len(text_tokenizer), [ModalityRange("image", 64, grid=(4, 4))], base_rows=base_rows)
    model.extend_vocab(layout)
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    assert embed.shape[0] == head.shape[0] == layout.padded_size == model.config.vocab_size
    assert torch.equal(embed[:base_rows], old_embed) and torch.equal(head[:base_rows], old_head)
    new = embed[base_rows:]
    mean = old_embed[: len(text_tokenizer)].mean(dim=0)
    assert (new - mean).abs().max() < 0.1 * old_embed.std()  # near the mean ...
    assert (new[0] - new[1]).abs().max() > 0  # ... but distinct
    model.save_pretrained(tmp_path / "extended")
    assert MMLLM.from_pretrained(tmp_path / "extended").layout.padded_size == layout.padded_size


def test_extend_vocab_on_tied_model_and_wrong_base(tiny_config, text_tokenizer):
    import dataclasses

    config = dataclasses.replace(tiny_config, vocab_size=len(text_tokenizer), tie_word_embeddings=True)
    model = MMLLM(config, text_tokenizer=text_tokenizer)
    layout = VocabLayout.build(len(text_tokenizer), [ModalityRange("image", 16, grid=(2, 2))])
    model.extend_vocab(layout)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.shape[0] == layout.padded_size
    wrong = VocabLayout.build(len(text_tokenizer), [ModalityRange("image", 16, grid=(2, 2))], base_rows=999)
    fresh = MMLLM(config, text_tokenizer=text_tokenizer)
    with pytest.raises(CheckpointError, match="rebuild it with --base-rows"):
        fresh.extend_vocab(wrong)


def test_exported_tokenizer_names_every_layout_id(model, tmp_path):
    model.export_hf(tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    layout = model.layout
    assert len(tokenizer) == layout.padded_size
    span = layout.span_ids("image", np.array([0, 1, 2, 31]))
    assert tokenizer.convert_ids_to_tokens(span) == [
        "<|boi|>",
        "<|image_00|>",
        "<|image_01|>",
        "<|image_02|>",
        "<|image_31|>",
        "<|eoi|>",
    ]
    assert tokenizer.convert_tokens_to_ids("<|end_of_turn|>") == layout.token_id("<|end_of_turn|>")
    text = "a red circle"
    assert (
        tokenizer(text, add_special_tokens=False)["input_ids"]
        == model.text_tokenizer(text, add_special_tokens=False)["input_ids"]
    )
    hf_config = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    assert hf_config.pad_token_id == layout.pad_id


def test_hooks_block_hf_export(model, tmp_path):
    from mmllm.model.hooks import InsertTokens

    model.attach_hook(InsertTokens(1, 2, model.config.hidden_size))
    with pytest.raises(CheckpointError, match="plug-ins are attached"):
        model.export_hf(tmp_path / "hf")


# ---------------------------------------------------------------------- broken checkpoints


def test_missing_dir(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint dir not found"):
        MMLLM.from_pretrained(tmp_path / "absent")


def test_dir_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        MMLLM.from_pretrained(tmp_path)


def test_partial_checkpoints(model, tmp_path):
    model.save_pretrained(tmp_path / "sharded", max_shard_bytes=200_000)
    index = json.loads((tmp_path / "sharded" / INDEX_FILE).read_text())
    (tmp_path / "sharded" / sorted(set(index["weight_map"].values()))[-1]).unlink()
    with pytest.raises(CheckpointError, match="is missing \\(partial checkpoint\\)"):
        MMLLM.from_pretrained(tmp_path / "sharded")

    model.save_pretrained(tmp_path / "noweights")
    (tmp_path / "noweights" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        MMLLM.from_pretrained(tmp_path / "noweights")


def test_corrupt_weights_file(model, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="unreadable safetensors file"):
        MMLLM.from_pretrained(tmp_path / "ckpt")


def test_missing_tensor(model, tmp_path):
    from safetensors.torch import load_file, save_file

    model.save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(path)
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing weights \\(1\\), e.g. model.layers.1.mlp.up_proj.weight"):
        MMLLM.from_pretrained(tmp_path / "ckpt")


def test_embedding_size_disagreeing_with_layout(model, tmp_path, toy_layout):
    model.save_pretrained(tmp_path / "ckpt")
    bigger = VocabLayout.build(
        toy_layout.text_size,
        [*toy_layout.modalities.values(), ModalityRange("depth", 512, grid=(4, 4))],
        text_tokenizer_fingerprint=toy_layout.text_tokenizer_fingerprint,
    )
    bigger.save(tmp_path / "ckpt" / "vocab_layout.json")
    with pytest.raises(CheckpointError, match=f"rows but vocab_layout.json says {bigger.padded_size}"):
        MMLLM.from_pretrained(tmp_path / "ckpt")


def test_layout_text_size_disagreeing_with_tokenizer(model, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    data = json.loads((tmp_path / "ckpt" / "vocab_layout.json").read_text())
    data["text_size"] -= 1
    (tmp_path / "ckpt" / "vocab_layout.json").write_text(json.dumps(data))
    with pytest.raises(LayoutError, match="text tokenizer has .* tokens but the vocab layout's text ends at"):
        MMLLM.from_pretrained(tmp_path / "ckpt")


def test_shape_disagreeing_with_config(model, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["model"]["intermediate_size"] = 256
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="has shape .* the config implies"):
        MMLLM.from_pretrained(tmp_path / "ckpt")
