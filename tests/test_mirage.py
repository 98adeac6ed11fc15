"""Mirage's latent visual tokens (issue 8): targets against a hand computation, decoding against the
plain model and one prompt at a time, the two training stages, save/load and one-line errors."""

from __future__ import annotations

import pytest
import torch

from mmllm.errors import ConfigError, InputError
from mmllm.generation import GenerationConfig, Generator
from mmllm.model.latent import MirageHead, attach_latent_head, latent_forward, latent_generate, visual_targets
from mmllm.model.latent.base import read_latent_head
from mmllm.model.latent.curriculum import coconut
from mmllm.model.latent.mirage import helper_codes, mirage, mirage_loss
from mmllm.model.mmllm import MMLLM

from .test_latent import one_document_per_row, perturbed, prompts, reference_decode, tiny_latent_model


@pytest.fixture()
def model(text_tokenizer):
    return tiny_latent_model(text_tokenizer)


def with_mirage(model, **options) -> MirageHead:
    """A mirage head moved off the identity, so a test sees the projection used."""
    head = perturbed(MirageHead(model.layout, model.config.hidden_size, **options))
    return attach_latent_head(model, head)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- decoding


def test_zero_latent_steps_reproduce_the_plain_model(model):
    span = [model.layout.begin_id("latent"), model.layout.end_id("latent")]
    ids = torch.tensor([[*p[:10], *span, *p[:4]] for p in prompts(model)])
    config = GenerationConfig(max_new_tokens=6)
    with torch.no_grad():
        plain_logits = model(ids).logits
    plain = Generator(model).generate([[*p, *span] for p in prompts(model)], config)
    with_mirage(model)
    with torch.no_grad():
        assert torch.equal(latent_forward(model, ids), plain_logits)
    assert [o.ids for o in latent_generate(model, prompts(model), 0, config)] == [o.ids for o in plain]


def test_batched_decoding_equals_one_prompt_at_a_time_and_the_uncached_reference(model):
    head = with_mirage(model)
    steps = [3, 1, 0]
    config = GenerationConfig(max_new_tokens=5)
    batched = latent_generate(model, prompts(model), steps, config)
    alone = [latent_generate(model, [p], n, config)[0] for p, n in zip(prompts(model), steps, strict=True)]
    assert [o.ids for o in batched] == [o.ids for o in alone]
    expected = [reference_decode(model, head, p, n, 5) for p, n in zip(prompts(model), steps, strict=True)]
    assert [o.ids for o in batched] == expected


# ---------------------------------------------------------------- targets


def test_visual_targets_equal_group_means_of_code_embeddings(model):
    image = model.layout.modality("image")
    codes = torch.arange(image.start, image.start + 5)
    table = model.model.embed_tokens.weight
    expected = torch.stack([table[codes[:3]].mean(0), table[codes[3:]].mean(0)])  # 5 codes, 2 groups: 3 + 2
    torch.testing.assert_close(visual_targets(model.model.embed_tokens, codes, 2), expected)
    head = MirageHead(model.layout, model.config.hidden_size)
    ids = torch.tensor([7, *codes.tolist(), 8, head.begin_id, head.latent_id, head.end_id, image.start + 9])
    assert helper_codes(ids, model.layout, head.latent_id).tolist() == codes.tolist()  # not the codes after


# ---------------------------------------------------------------- training


def visual_batch(model, steps=(2, 3)) -> dict[str, torch.Tensor]:
    """One document per row: text, an image's codes, text, a latent span of k slots, a scored answer."""
    layout = model.layout
    image = layout.modality("image")
    documents = []
    for row, k in enumerate(steps):
        prompt = prompts(model)[row]
        codes = list(range(image.start + 4 * row, image.start + 4 * row + 8))
        span = [layout.begin_id("latent"), *[layout.token_id("<|latent|>")] * k, layout.end_id("latent")]
        answer = prompt[1:5]
        ids = [*prompt[:3], layout.begin_id("image"), *codes, layout.end_id("image"), *prompt[3:], *span, *answer]
        documents.append((ids, [False] * (len(ids) - len(answer)) + [True] * len(answer)))
    width = max(len(ids) for ids, _ in documents) + 2
    return one_document_per_row(documents, width, layout.pad_id)


@pytest.mark.parametrize("distill_loss", ["cosine", "mse"])
def test_stage_one_distillation_is_finite_reaches_the_projection_and_falls(model, distill_loss):
    head = with_mirage(model, distill_loss=distill_loss)
    batch = visual_batch(model)
    names = tuple(model.layout.modalities)
    out = mirage(model.train(), batch, names)
    assert out.sums["loss/distill_tokens"] == 5 and torch.isfinite(out.sums["loss/distill"])
    out.loss_sum.backward()
    assert head.projection.up.weight.grad is not None and head.projection.up.weight.grad.abs().sum() > 0
    first = float(out.sums["loss/distill"])
    batch["loss_weights"].zero_()  # the distillation term alone, on the head alone (the targets stay put)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(5):
        optimizer.zero_grad()
        mirage(model, batch, names).loss_sum.backward()
        optimizer.step()
    assert float(mirage(model, batch, names).sums["loss/distill"]) < 0.8 * first


def test_distillation_equals_a_per_document_uncached_reference(model):
    head = with_mirage(model)
    batch = visual_batch(model)
    with torch.no_grad():
        out = mirage(model, batch, tuple(model.layout.modalities))
        embed, total = model.model.embed_tokens, torch.zeros(())
        for row in range(2):
            ids = batch["input_ids"][row][batch["document_ids"][row] == 0]
            slots = (ids == head.latent_id).nonzero().flatten().tolist()
            targets = visual_targets(embed, helper_codes(ids, model.layout, head.latent_id), len(slots))
            embeds = embed(ids).clone()
            for k, position in enumerate(slots):  # each slot from a full forward over everything before it
                state = model(inputs_embeds=embeds[None, :position], output_hidden_states=True).hidden_states
                embeds[position] = head.projection(state[0, -1])
                total += 1 - torch.nn.functional.cosine_similarity(embeds[position], targets[k], dim=0)
    torch.testing.assert_close(out.sums["loss/distill"], total, atol=1e-5, rtol=1e-4)


def test_stage_two_is_the_text_loss_alone(model):
    head = with_mirage(model, stage=2)
    batch = visual_batch(model)
    names = tuple(model.layout.modalities)
    with torch.no_grad():
        out = mirage(model, batch, names)
        text = coconut(model, batch, names)
    assert not any(key.startswith("loss/distill") for key in out.sums)
    torch.testing.assert_close(out.loss_sum, text.loss_sum)
    assert out.tokens == text.tokens
    with torch.no_grad():  # the same batch at stage 1 adds the distillation term on top
        assert mirage_loss(model, head, batch, names, 1).loss_sum > out.loss_sum


def test_save_load_round_trip(model, tmp_path):
    head = with_mirage(model, projection="linear", stage=2, distill_loss="mse", max_latent_steps=4)
    head.save(tmp_path)
    loaded = read_latent_head(tmp_path / "latent_head.safetensors", model.layout, model.config.hidden_size)
    assert isinstance(loaded, MirageHead) and loaded.options() == head.options()
    for key, value in head.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


def test_bad_inputs_are_one_line_errors(model):
    size = model.config.hidden_size
    for options, word in (
        ({"stage": 3}, "stage"),
        ({"projection": "conv"}, "projection"),
        ({"distill_loss": "kl"}, "distill_loss"),
    ):
        with pytest.raises(ConfigError) as error:
            MirageHead(model.layout, size, **options)
        assert word in one_line(error)
    with pytest.raises(ConfigError) as error:
        mirage(model, visual_batch(model), ())
    assert "mirage latent head" in one_line(error)
    with pytest.raises(InputError) as error:
        visual_targets(model.model.embed_tokens, torch.arange(3), 4)
    assert "3 image codes" in one_line(error)
    with_mirage(model, max_latent_steps=2)
    with pytest.raises(ConfigError) as error:
        mirage(model, visual_batch(model), ())
    assert "at most 2" in one_line(error)


def test_stage_two_continues_from_the_saved_stage_one_head(model, tmp_path):
    from mmllm.model.latent import LatentHeadHooks, find_latent_head
    from mmllm.training.loop import ModelHooks

    model.name_or_path = ""
    first = LatentHeadHooks(ModelHooks(), "mirage", stage=1, max_latent_steps=4)
    trained = first.prepare(model, None)
    with torch.no_grad():
        first.head.projection.down.weight.add_(1.0)  # "trained" in stage 1
    first.saved(trained).save_pretrained(tmp_path / "stage1" / "model")
    loaded = MMLLM.from_pretrained(tmp_path / "stage1" / "model")
    second = LatentHeadHooks(ModelHooks(), "mirage", stage=2, max_latent_steps=4)
    second.prepare(loaded, None)
    head = find_latent_head(loaded)
    assert head.stage == 2  # this run's knob
    torch.testing.assert_close(head.state_dict(), first.head.state_dict(), rtol=0, atol=0)  # stage 1's weights
