"""CoLaR's compressed latent head (issue 8) against hand computations and slow references.

Compressed targets equal a hand sum; decoding with slots equals an uncached loop that feeds the
head's prediction as `inputs_embeds`; batched equals one at a time; zero steps equal the plain
model; the objective's latent loss equals a naive per-slot reference and reaches the head; the head
saves and loads; bad inputs are one-line errors.
"""

from __future__ import annotations

import math

import pytest
import torch

from mmllm.data.toy_tasks import generate
from mmllm.errors import ConfigError, InputError
from mmllm.evaluation.reasoning import parse_mode
from mmllm.generation import GenerationConfig
from mmllm.model.latent import ColarHead, PuzzleFormat, attach_latent_head, colar_generate, encode_puzzle
from mmllm.model.latent.base import read_latent_head
from mmllm.model.latent.colar import colar_loss, compress_span, compressed_embeddings

from .test_latent import one_document_per_row, perturbed, prompts, reference_decode, tiny_latent_model

TOLERANCE = {"atol": 1e-5, "rtol": 1e-4}  # float32 sums in another order


@pytest.fixture()
def model(text_tokenizer):
    return tiny_latent_model(text_tokenizer)


def with_colar(model, **options) -> ColarHead:
    """A colar head moved off its initialisation, so the factor embedding and the MLP both matter."""
    head = perturbed(ColarHead(model.layout, model.config.hidden_size, **options))
    return attach_latent_head(model, head)


def test_compressed_targets_equal_a_hand_computation(model):
    head = ColarHead(model.layout, model.config.hidden_size)
    ids = torch.tensor([7, head.begin_id, 10, 11, 12, 13, 14, head.end_id, 8])
    compressed, groups = compress_span(ids, head.begin_id, head.end_id, head.latent_id, 2)
    assert compressed.tolist() == [7, head.begin_id, *[head.latent_id] * 3, head.end_id, 8]  # ceil(5 / 2) slots
    assert [g.tolist() for g in groups] == [[10, 11], [12, 13], [14]]
    table = model.model.embed_tokens.weight
    expected = torch.stack([(table[10] + table[11]) / math.sqrt(2), (table[12] + table[13]) / math.sqrt(2), table[14]])
    torch.testing.assert_close(compressed_embeddings(model.model.embed_tokens, groups), expected)


@torch.no_grad()
def test_cached_batched_decoding_equals_the_uncached_reference(model):
    head = with_colar(model)
    steps = [3, 1, 0]
    outputs = colar_generate(model, prompts(model), steps, 2, GenerationConfig(max_new_tokens=5))
    factor = head.factor_embedding.weight[2]
    embed = model.model.embed_tokens
    original = embed.weight[head.begin_id].clone()
    embed.weight[head.begin_id] += factor  # the reference feeds the factor through the <|bolt|> embedding
    try:
        expected = [reference_decode(model, head, p, n, 5) for p, n in zip(prompts(model), steps, strict=True)]
    finally:
        embed.weight[head.begin_id] = original
    assert [o.ids for o in outputs] == expected
    alone = [
        colar_generate(model, [p], n, 2, GenerationConfig(max_new_tokens=5))[0]
        for p, n in zip(prompts(model), steps, strict=True)
    ]
    assert [o.ids for o in alone] == expected


@torch.no_grad()
def test_zero_steps_of_a_fresh_head_reproduce_the_plain_model(model):
    config = GenerationConfig(max_new_tokens=5)
    plain = [reference_decode_plain(model, p, 5) for p in prompts(model)]
    attach_latent_head(model, ColarHead(model.layout, model.config.hidden_size))
    assert [o.ids for o in colar_generate(model, prompts(model), 0, 3, config)] == plain


def reference_decode_plain(model, prompt, max_new_tokens):
    from mmllm.generation import Generator

    layout = model.layout
    span = [layout.begin_id("latent"), layout.end_id("latent")]
    return Generator(model).generate([[*prompt, *span]], GenerationConfig(max_new_tokens=max_new_tokens))[0].ids


def colar_batch(model) -> dict[str, torch.Tensor]:
    """Two colar-format arithmetic puzzles, one per row, right-padded."""
    documents = []
    for index in range(2):
        record = generate("toy-arith", index, seed=0).record
        encoded = encode_puzzle(record, PuzzleFormat("colar"), model.layout, model.text_tokenizer)
        documents.append((encoded.input_ids, encoded.loss_mask))
    width = max(len(ids) for ids, _ in documents) + 2
    return one_document_per_row(documents, width, model.layout.pad_id)


@pytest.mark.parametrize("latent_loss", ["nll", "mse"])
def test_latent_loss_is_finite_reaches_the_head_and_equals_a_naive_reference(model, latent_loss):
    head = with_colar(model, latent_loss=latent_loss, max_latent_steps=64)  # a whole arithmetic trace at c=2
    batch = colar_batch(model)
    out = colar_loss(model, head, batch, (), 2)
    assert torch.isfinite(out.loss_sum)
    out.loss_sum.backward()
    assert head.projection.up.weight.grad is not None and head.projection.up.weight.grad.abs().sum() > 0
    assert head.factor_embedding.weight.grad[2].abs().sum() > 0
    # The naive reference: per document, inputs_embeds with the gold compressed embeddings, one slot at a time.
    embed = model.model.embed_tokens
    total, slots = torch.zeros(()), 0
    with torch.no_grad():
        for row in range(2):
            ids = batch["input_ids"][row][batch["document_ids"][row] == 0]
            compressed, groups = compress_span(ids, head.begin_id, head.end_id, head.latent_id, 2)
            embeds = embed(compressed).clone()
            embeds[compressed == head.begin_id] += head.factor_embedding.weight[2]
            targets = torch.stack([embed(g).sum(0) / math.sqrt(len(g)) for g in groups])
            embeds[compressed == head.latent_id] = targets
            hidden = model(inputs_embeds=embeds[None], output_hidden_states=True).hidden_states[0]
            for k, position in enumerate((compressed == head.latent_id).nonzero().flatten().tolist()):
                mean, log_std = head.projection.distribution(hidden[position - 1])
                if latent_loss == "mse":
                    total += (mean - targets[k]).pow(2).mean()
                else:
                    z = (targets[k] - mean) / log_std.exp()
                    total += (0.5 * z.pow(2) + log_std + 0.5 * math.log(2 * math.pi)).mean()
                slots += 1
    assert out.sums["loss/latent_tokens"] == slots
    torch.testing.assert_close(out.sums["loss/latent"], total, **TOLERANCE)


def test_save_load_round_trip(model, tmp_path):
    head = with_colar(model, compression_factors=[1, 3], latent_loss="mse", max_latent_steps=4)
    head.save(tmp_path)
    loaded = read_latent_head(tmp_path / "latent_head.safetensors", model.layout, model.config.hidden_size)
    assert isinstance(loaded, ColarHead) and loaded.options() == head.options()
    for key, value in head.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_bad_inputs_are_one_line_errors(model):
    with pytest.raises(ConfigError) as error:
        ColarHead(model.layout, model.config.hidden_size, compression_factors=[0])
    assert "compression_factors" in one_line(error)
    with pytest.raises(ConfigError) as error:
        ColarHead(model.layout, model.config.hidden_size, latent_loss="kl")
    assert "latent_loss" in one_line(error)
    with pytest.raises(ConfigError) as error:
        colar_generate(model, prompts(model), 1, 2)
    assert "colar latent head" in one_line(error)
    with_colar(model, max_latent_steps=2)
    with pytest.raises(ConfigError) as error:
        colar_generate(model, prompts(model), 1, 9)
    assert "compression factor 9" in one_line(error)
    with pytest.raises(ConfigError) as error:
        colar_generate(model, prompts(model), 3, 2)
    assert "at most 2" in one_line(error)
    head = ColarHead(model.layout, model.config.hidden_size)
    bad = torch.tensor([head.begin_id, 5, head.begin_id, head.end_id])
    with pytest.raises(InputError) as error:
        compress_span(bad, head.begin_id, head.end_id, head.latent_id, 2)
    assert "one <|bolt|>" in one_line(error)
    for spec in ("colar:steps=3", "colar:steps=3,c=0", "colar:c=2"):
        with pytest.raises(InputError) as error:
            parse_mode(spec)
        assert "colar:steps=N,c=K" in one_line(error)
    assert parse_mode("colar:steps=3,c=2").label == "colar:steps=3,c=2"
