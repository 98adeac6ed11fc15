"""Visual-token reducers: the protocol, the spec strings, and FastV and DART against references."""

from __future__ import annotations

import math
import random

import pytest
import torch

from mmllm.cli import main
from mmllm.data.media import write_image
from mmllm.data.toyworld import render_image, sample_scene
from mmllm.errors import ConfigError
from mmllm.generation import GenerationConfig, Generator, Prompt, encode_prompts
from mmllm.model.backbone import AttentionMasks, TokenState
from mmllm.model.reducers import attach_reducer, keep_tokens, parse_spec

IMAGE_TOKENS = 64  # the toy layout's 8x8 image grid


def image_prompts(model, count: int, images_per_prompt=(1,)) -> list[list[int]]:
    rng = random.Random(0)
    prompts = []
    for i in range(count):
        images = images_per_prompt[i % len(images_per_prompt)]
        content = [{"type": "image", "array": render_image(sample_scene(rng, 2))} for _ in range(images)]
        content.append({"type": "text", "text": "how many circles are there" + "?" * (i % 3)})
        prompts.append(Prompt([{"role": "user", "content": content}]))
    return [p.ids for p in encode_prompts(model, prompts)]


def logits_of(model, prompts: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(torch.tensor([prompt])).logits[:, -1] for prompt in prompts])


def test_spec_strings_and_bad_input(toy_model):
    assert parse_spec("fastv:layer=1,ratio=0.5,queries=text") == (
        "fastv",
        {"layer": 1, "ratio": 0.5, "queries": "text"},
    )
    with pytest.raises(ConfigError, match="unknown reducer 'nope'"):
        attach_reducer(toy_model, "nope")
    with pytest.raises(ConfigError, match=r"ratio must be in \[0, 1\), got 1.5"):
        attach_reducer(toy_model, "fastv:layer=1,ratio=1.5")
    with pytest.raises(ConfigError, match=r"layer must be in \[0, 2\), got 5"):
        attach_reducer(toy_model, "dart:layer=5")
    with pytest.raises(ConfigError, match="fastv: .*unexpected keyword argument 'depth'"):
        attach_reducer(toy_model, "fastv:layer=1,depth=2")
    with pytest.raises(ConfigError, match="option 'ratio' is not key=value"):
        parse_spec("fastv:ratio")


@pytest.mark.parametrize("spec", ["fastv:layer=1,ratio=0", "dart:layer=1,ratio=0", "pdrop:ratio=0"])
def test_ratio_zero_gives_identical_logits_and_ids(toy_model, spec):
    prompts = image_prompts(toy_model, 2)
    config = GenerationConfig(max_new_tokens=8, stop_ids=())
    plain_logits, plain_ids = (
        logits_of(toy_model, prompts),
        [o.ids for o in Generator(toy_model).generate(prompts, config)],
    )
    attach_reducer(toy_model, spec)
    assert torch.equal(logits_of(toy_model, prompts), plain_logits)
    assert [o.ids for o in Generator(toy_model).generate(prompts, config)] == plain_ids


@pytest.mark.parametrize(
    "spec",
    [
        "fastv:layer=1,ratio=0.75",
        "fastv:layer=1,ratio=0.5,queries=text",
        "dart:layer=1,ratio=0.75,pivots=4",
        "fastv:layer=0,ratio=0.5",
        "pdrop:layers=1,ratio=0.75",
    ],
)
def test_batched_equals_per_sample_and_the_cache_holds_what_was_kept(toy_model, spec):
    prompts = image_prompts(toy_model, 3, images_per_prompt=(1, 2, 1))  # rows with 64 and 128 image tokens
    reducer = attach_reducer(toy_model, spec)
    config = GenerationConfig(max_new_tokens=6, stop_ids=())
    generator = Generator(toy_model)
    batched = [o.ids for o in generator.generate(prompts, config)]
    alone = []
    for prompt in prompts:
        alone.append(generator.generate([prompt], config)[0].ids)
        visual = sum(1 for t in prompt if reducer.visual_id(t))
        kept = visual - math.floor(visual * reducer.ratio)
        assert reducer.kept_counts == [kept]
        cache = toy_model.new_kv_cache()
        with torch.no_grad():
            toy_model(torch.tensor([prompt]), kv_cache=cache)
        first = len(prompt)
        after = first - (visual - kept)
        lengths = [layer.length for layer in cache.layers]
        assert lengths == [first if i < reducer.layer else after for i in range(len(lengths))]
    assert batched == alone


def eager_fastv_keep(model, prompt: list[int], layer: int, ratio: float, visual_ids) -> set[int]:
    """FastV by the book: the full eager attention matrix at `layer`, last row, mean over heads."""
    backbone = model.model
    with torch.no_grad():
        ids = torch.tensor([prompt])
        hidden = backbone.embed_tokens(ids)
        positions = torch.arange(len(prompt))[None]
        rope = backbone.rotary_emb(positions, hidden.dtype)
        state = TokenState(hidden, positions, ids, None, None, positions)
        for block in backbone.layers[:layer]:
            hidden = block(hidden, rope, AttentionMasks(state), None)
        attention = backbone.layers[layer].self_attn
        q, k, _ = attention.project(backbone.layers[layer].input_layernorm(hidden), rope)
        k = k.repeat_interleave(attention.num_heads // attention.num_kv_heads, dim=1)
        weights = torch.softmax(
            (q @ k.transpose(-1, -2)) / math.sqrt(attention.head_dim)
            + torch.full((len(prompt), len(prompt)), float("-inf")).triu(1),
            dim=-1,
        )
        received = weights[0, :, -1].mean(dim=0)
    visual = [i for i, t in enumerate(prompt) if visual_ids(t)]
    keep = len(visual) - math.floor(len(visual) * ratio)
    return set(sorted(visual, key=lambda i: -float(received[i]))[:keep])


def test_fastv_keeps_the_tokens_a_naive_eager_reference_keeps(toy_model):
    (prompt,) = image_prompts(toy_model, 1, images_per_prompt=(2,))
    reducer = attach_reducer(toy_model, "fastv:layer=1,ratio=0.75")
    with torch.no_grad():
        toy_model(torch.tensor([prompt]))
    (stage,) = reducer.stages
    assert stage.layer == 1
    visual_kept = {i for i in stage.keep[0].nonzero()[:, 0].tolist() if reducer.visual_id(prompt[i])}
    assert visual_kept == eager_fastv_keep(toy_model, prompt, 1, 0.75, reducer.visual_id)
    assert len(visual_kept) == 2 * IMAGE_TOKENS - math.floor(2 * IMAGE_TOKENS * 0.75)


def test_keep_tokens_pads_shorter_rows_with_invalid_slots():
    hidden = torch.arange(12, dtype=torch.float32).view(2, 6, 1)
    positions = torch.arange(6).expand(2, 6)
    state = TokenState(hidden, positions, positions.clone(), None, None, positions)
    keep = torch.tensor([[1, 0, 1, 0, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    reduced = keep_tokens(state, keep)
    assert reduced.source_index.tolist() == [[0, 2, 4, 5], [0, 1, 1, 1]]
    assert reduced.valid.tolist() == [[True] * 4, [True, True, False, False]]
    assert reduced.position_ids.tolist() == [[0, 2, 4, 5], [0, 1, 1, 1]]


def test_a_prompt_without_images_is_left_alone(toy_model, caplog):
    (prompt,) = [p.ids for p in encode_prompts(toy_model, [Prompt([{"role": "user", "content": "hello there"}])])]
    plain = logits_of(toy_model, [prompt])
    attach_reducer(toy_model, "fastv:layer=1,ratio=0.5")
    with caplog.at_level("INFO"):
        assert torch.equal(logits_of(toy_model, [prompt]), plain)
    assert "no image or video tokens; nothing to reduce" in caplog.text


def test_generate_and_eval_take_a_reducer_spec(toy_model, tmp_path):
    toy_model.save_pretrained(tmp_path / "model")
    image = tmp_path / "scene.png"
    write_image(image, render_image(sample_scene(random.Random(1), 2)))
    common = ["--model", str(tmp_path / "model"), "--reducer", "fastv:layer=1,ratio=0.5"]
    assert (
        main(["generate", *common, "--prompt", "Describe it.", "--image", str(image), "--out", str(tmp_path / "g")])
        == 0
    )
    assert (
        main(
            ["eval", *common, "--tasks", "toy-vqa", "--limit", "2", "--no-untrained", "--out", str(tmp_path / "r.json")]
        )
        == 0
    )
    assert (
        main(
            [
                "eval",
                "--model",
                str(tmp_path / "model"),
                "--reducer",
                "fastv:layer=9",
                "--tasks",
                "toy-vqa",
                "--out",
                str(tmp_path / "x.json"),
            ]
        )
        == 2
    )


def test_pyramid_drop_shrinks_the_cache_stage_by_stage(text_tokenizer):
    from mmllm.model.config import ModelConfig
    from mmllm.model.mmllm import MMLLM

    from .conftest import REPO, random_toy_tokenizers, toy_vocab_layout

    torch.manual_seed(0)
    config = ModelConfig.from_yaml(
        REPO / "configs" / "model" / "tiny.yaml", ["num_hidden_layers=4", "initializer_range=0.3"]
    )
    model = MMLLM.from_config(config, toy_vocab_layout(text_tokenizer), text_tokenizer, random_toy_tokenizers()).eval()
    prompts = image_prompts(model, 3, images_per_prompt=(2, 1, 2))
    reducer = attach_reducer(model, "pdrop:layers=1/3,ratio=0.75")  # half of what is left, twice
    assert reducer.boundaries == [1, 3]
    generator = Generator(model)
    config = GenerationConfig(max_new_tokens=5, stop_ids=())
    batched = [o.ids for o in generator.generate(prompts, config)]
    assert batched == [generator.generate([p], config)[0].ids for p in prompts]
    (prompt,) = prompts[:1]
    cache = model.new_kv_cache()
    with torch.no_grad():
        model(torch.tensor([prompt]), kv_cache=cache)
    visual = 2 * IMAGE_TOKENS
    first = visual - visual // 2
    second = first - first // 2
    full = len(prompt)
    assert [layer.length for layer in cache.layers] == [
        full,
        full - (visual - first),
        full - (visual - first),
        full - (visual - second),
    ]
    assert reducer.kept_counts == [second]
    with pytest.raises(ConfigError, match="layers must be increasing"):
        attach_reducer(model, "pdrop:layers=3/1")
    with pytest.raises(ConfigError, match="stage boundaries are layers >= 1"):
        attach_reducer(model, "pdrop:layers=0/2")


@pytest.mark.parametrize("spec", ["fastv:layer=1,ratio=0.75", "pdrop:layers=1,ratio=0.5", "dart:layer=0,ratio=0.5"])
def test_ideal_slice_replays_the_cut_exactly(toy_model, spec):
    prompts = image_prompts(toy_model, 3, images_per_prompt=(1, 2, 1))
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    reducer = attach_reducer(toy_model, spec)
    with torch.no_grad():
        reduced = toy_model(ids, attention_mask=mask).logits[:, -1]
    assert reducer.stages and all(stage.keep.shape == (3, width) or stage.layer > 0 for stage in reducer.stages)
    toy_model.detach_hook(reducer)
    toy_model.attach_hook(reducer.ideal_slice())
    with torch.no_grad():
        replayed = toy_model(ids, attention_mask=mask).logits[:, -1]
    assert torch.equal(replayed, reduced)
