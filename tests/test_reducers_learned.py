"""Learned compression reducers: Victor's registers (inserted, trained through finetuning, saved and
reloaded, KV cache per layer) and MQT-style matryoshka budgets on a 1D image tokenizer (with the
packer's nested dropout)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from mmllm.data.packing import Document, Packer, PackingConfig
from mmllm.data.toyworld import render_image, sample_scene
from mmllm.errors import ConfigError
from mmllm.generation import GenerationConfig, Generator, Prompt, encode_prompts
from mmllm.model.hooks import InsertTokens
from mmllm.model.loss import IGNORE_INDEX
from mmllm.model.mmllm import MMLLM
from mmllm.model.reducers import attach_reducer
from mmllm.model.reducers.learned import REGISTERS_FILE

from .conftest import REPO, random_toy_tokenizers, toy_vocab_layout, write_yaml

IMAGE_TOKENS = 64  # the toy layout's 8x8 image grid
TITOK_TOKENS = 8  # the tiny 1D tokenizer's K tokens per image
LOGIT_TOLERANCE = 1e-5  # batched rows are padded and masked, which reorders float sums (~1e-7)


def image_prompts(model, images_per_prompt: tuple[int, ...]) -> list[list[int]]:
    """One chat prompt per entry, with that many toy scenes and a question."""
    rng = random.Random(0)
    prompts = []
    for i, images in enumerate(images_per_prompt):
        content = [{"type": "image", "array": render_image(sample_scene(rng, 2))} for _ in range(images)]
        content.append({"type": "text", "text": "how many circles are there" + "?" * i})
        prompts.append(Prompt([{"role": "user", "content": content}]))
    return [p.ids for p in encode_prompts(model, prompts)]


def last_logits(model, prompts: list[list[int]], cache: bool = False) -> torch.Tensor:
    """Each prompt's next-token logits, one prompt at a time."""
    with torch.no_grad():
        return torch.cat(
            [model(torch.tensor([p]), kv_cache=model.new_kv_cache() if cache else None).logits[:, -1] for p in prompts]
        )


def batched_last_logits(model, prompts: list[list[int]]) -> torch.Tensor:
    """The prompts left-padded into one batch, prefilled into a KV cache, as the generator does."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        return model(ids, attention_mask=mask, kv_cache=model.new_kv_cache()).logits[:, -1]


def generated(model, prompts: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy ids of the prompts as one batch, and of each prompt alone."""
    config = GenerationConfig(max_new_tokens=6, stop_ids=())
    generator = Generator(model)
    batched = [o.ids for o in generator.generate(prompts, config)]
    return batched, [generator.generate([p], config)[0].ids for p in prompts]


# ---------------------------------------------------------------- registers


def test_registers_that_drop_nothing_equal_insert_tokens_alone(toy_model):
    prompts = image_prompts(toy_model, (1, 2))
    reducer = attach_reducer(toy_model, "registers:tokens=4,layer=2", train=True)  # layer 2 of 2: no drop
    with torch.no_grad():
        reduced = [toy_model(torch.tensor([p])).logits for p in prompts]
    assert not reducer.stages
    toy_model.detach_hook(reducer)
    eoi = toy_model.layout.end_id("image")
    inserter = toy_model.attach_hook(InsertTokens(eoi, 4, toy_model.config.hidden_size))
    inserter.embeddings.data.copy_(reducer.inserter.embeddings)
    with torch.no_grad():
        inserted = [toy_model(torch.tensor([p])).logits for p in prompts]
    assert all(torch.equal(a, b) for a, b in zip(reduced, inserted, strict=True))
    assert [r.shape[1] for r in reduced] == [len(p) + 4 * n for p, n in zip(prompts, (1, 2), strict=True)]


def test_registers_batched_equals_per_sample_and_the_cache_drops_the_image(toy_model):
    prompts = image_prompts(toy_model, (1, 2, 1))
    reducer = attach_reducer(toy_model, "registers:tokens=4,layer=1", train=True)
    batched, alone = generated(toy_model, prompts)
    assert batched == alone
    torch.testing.assert_close(
        batched_last_logits(toy_model, prompts),
        last_logits(toy_model, prompts, cache=True),
        atol=LOGIT_TOLERANCE,
        rtol=0,
    )
    for prompt, images in zip(prompts, (1, 2, 1), strict=True):
        cache = toy_model.new_kv_cache()
        with torch.no_grad():
            toy_model(torch.tensor([prompt]), kv_cache=cache)
        first = len(prompt) + 4 * images  # the prompt and each image's registers
        assert [layer.length for layer in cache.layers] == [first, first - IMAGE_TOKENS * images]
        assert cache.next_position.tolist() == [first]  # decoding goes on after the registers
        (stage,) = reducer.stages
        assert stage.layer == 1 and int((~stage.keep).sum()) == IMAGE_TOKENS * images
        assert reducer.kept_counts == [0]
    assert reducer.ideal_slice(reducer.stages) is reducer  # the cut is read off the ids: nothing to skip


def test_registers_errors_are_one_line(toy_model, tmp_path):
    toy_model.save_pretrained(tmp_path / "plain")
    model = MMLLM.from_pretrained(tmp_path / "plain")
    built = MMLLM.from_config(model.config, model.layout, model.text_tokenizer, model.modality_tokenizers)
    with pytest.raises(ConfigError, match="does not say which checkpoint dir it came from; give registers:path=DIR"):
        attach_reducer(built, "registers")
    for spec, message in [
        (f"registers:path={tmp_path / 'plain'}", "has no trained registers"),
        ("registers", "plain has no trained registers"),  # the dir the model was loaded from
        ("registers:layer=3", r"layer must be in \[1, 2\], got 3"),
        ("registers:tokens=0", "tokens must be an integer >= 1"),
    ]:
        with pytest.raises(ConfigError, match=message) as caught:
            attach_reducer(model, spec)
        assert "\n" not in str(caught.value)
    reducer = attach_reducer(model, "registers:tokens=4,layer=1", train=True)
    reducer.save(tmp_path / "plain")
    with pytest.raises(ConfigError, match="trained with tokens=4,layer=1, not tokens=8"):
        attach_reducer(model, f"registers:tokens=8,path={tmp_path / 'plain'}")
    loaded = attach_reducer(model, f"registers:path={tmp_path / 'plain'}")
    assert (loaded.tokens, loaded.layer) == (4, 1)
    assert torch.equal(loaded.inserter.embeddings, reducer.inserter.embeddings)


# ---------------------------------------------------------------- registers through the finetune path


@pytest.fixture(scope="module")
def vision_sft(tmp_path_factory, text_tokenizer_dir):
    """A tiny base checkpoint and SFT shards of image-question tasks (images are inputs only)."""
    from mmllm.data.interleaved import read_jsonl
    from mmllm.data.pretokenize import pretokenize
    from mmllm.data.toy_tasks import write_toyworld
    from mmllm.model.config import ModelConfig
    from mmllm.text_tokenizer import load_text_tokenizer

    root = tmp_path_factory.mktemp("registers_ft")
    text_tokenizer = load_text_tokenizer(text_tokenizer_dir)
    torch.manual_seed(0)
    config = ModelConfig.from_yaml(REPO / "configs" / "model" / "tiny.yaml")
    layout = toy_vocab_layout(text_tokenizer)
    MMLLM.from_config(config, layout, text_tokenizer, random_toy_tokenizers()).save_pretrained(root / "base")
    world = write_toyworld(root / "world", 4, seed=0, tasks=["toy-vqa", "toy-caption"])
    pretokenize(read_jsonl(world["path"]), Path(world["path"]).parent, root / "base", root / "shards")
    return root


def run_finetune(root: Path, out: Path, **overrides):
    """A 2-step finetune with registers, in this process (one rank, ZeRO-0), and the registers it started from."""
    from mmllm.training.finetune import finetune, finetune_hooks, load_finetune_config
    from mmllm.training.loop import initial_model

    config = {
        "finetune": {"base_model": str(root / "base"), "method": "full", "reducer": "registers:tokens=4,layer=1"},
        "out": str(out),
        "data": {"sources": [{"path": str(root / "shards")}], "packing": {"seq_len": 512, "condition_dropout": 0.0}},
        "optim": {"lr": 1e-2, "warmup_steps": 1, "weight_decay": 0.0},  # a high rate: 2 steps visibly move
        "steps": 2,
        "micro_batch_size": 2,
        "log_every": 100,
        "threads": 1,
    }
    config = load_finetune_config(write_yaml(out / "config.yaml", config, overrides))
    hooks = finetune_hooks(config.finetune)
    initial_model(config, hooks)  # seeded as the run seeds it
    initial = hooks.reducer.inserter.embeddings.detach().clone()
    return finetune(config, progress=False), initial


def test_a_full_finetune_trains_the_registers_and_the_model_dir_reloads_them(vision_sft, one_rank, tmp_path):
    result, initial = run_finetune(vision_sft, tmp_path / "run")
    assert all(math.isfinite(record["loss"]) for record in result.history)
    trained = result.engine.module.cpu().eval()
    (reducer,) = trained.model.hooks
    assert not torch.equal(reducer.inserter.embeddings.detach(), initial)  # the registers learned
    model_dir = result.model_dir
    assert (model_dir / REGISTERS_FILE).is_file()
    model = MMLLM.from_pretrained(model_dir).eval()  # the registers are not among the model's weights
    loaded = attach_reducer(model, "registers")
    assert (loaded.tokens, loaded.layer) == (4, 1)
    prompts = image_prompts(model, (1, 2))
    torch.testing.assert_close(last_logits(model, prompts), last_logits(trained, prompts), atol=0, rtol=0)


def test_a_lora_finetune_trains_the_registers_with_the_adapter(vision_sft, one_rank, tmp_path):
    from mmllm.training.finetune import merge_lora

    overrides = {"finetune.method": "lora", "finetune.lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    result, initial = run_finetune(vision_sft, tmp_path / "run", **overrides)
    assert all(math.isfinite(record["loss"]) for record in result.history)
    adapter = result.model_dir
    assert adapter.name == "adapter" and (adapter / REGISTERS_FILE).is_file()
    trained = result.engine.module.cpu().eval()
    assert not torch.equal(trained.model.hooks[0].inserter.embeddings.detach(), initial)
    merged = merge_lora(vision_sft / "base", adapter, tmp_path / "merged")
    model = MMLLM.from_pretrained(merged).eval()
    attach_reducer(model, f"registers:path={merged}")  # merge-lora carried the registers over
    prompts = image_prompts(model, (1,))
    torch.testing.assert_close(last_logits(model, prompts), last_logits(trained, prompts), atol=1e-4, rtol=0)


def test_finetune_refuses_a_reducer_with_nothing_to_train_and_zero3(vision_sft, tmp_path):
    from mmllm.training.finetune import finetune, load_finetune_config

    config = {"finetune": {"base_model": str(vision_sft / "base"), "reducer": "fastv:layer=1"}, "out": str(tmp_path)}
    path = write_yaml(tmp_path / "c.yaml", config, {"data.sources": [{"path": str(vision_sft / "shards")}]})
    with pytest.raises(ConfigError, match="reducer 'fastv' has nothing to train .*registers"):
        load_finetune_config(path)
    registers = load_finetune_config(path, ["finetune.reducer=registers"])
    with pytest.raises(ConfigError, match="finetune.reducer runs with ZeRO-0/1/2"):
        finetune(registers, str(REPO / "configs" / "deepspeed" / "zero3.json"))


# ---------------------------------------------------------------- matryoshka on a 1D tokenizer


@pytest.fixture()
def titok_model(text_tokenizer):
    """A random tiny MMLLM whose image tokenizer is image-titok: K = 8 tokens, any prefix decodable."""
    from mmllm.model.config import ModelConfig
    from mmllm.text_tokenizer import fingerprint
    from mmllm.tokenizers import load_tokenizer
    from mmllm.vocab import VocabLayout

    torch.manual_seed(0)
    titok = load_tokenizer(
        "image-titok", num_tokens=TITOK_TOKENS, width=32, encoder_depth=1, decoder_depth=1, heads=2
    ).eval()
    layout = VocabLayout.build(
        len(text_tokenizer), [titok.modality_range("image")], text_tokenizer_fingerprint=fingerprint(text_tokenizer)
    )
    config = ModelConfig.from_yaml(REPO / "configs" / "model" / "tiny.yaml", ["initializer_range=0.3"])
    return MMLLM.from_config(config, layout, text_tokenizer, {"image": titok}).eval()


def truncated(model, prompt: list[int], tokens: int) -> list[int]:
    """The prompt as a `tokens`-token encoding of each image gives it: codes past the budget removed."""
    layout = model.layout
    image = layout.modalities["image"]
    out, index = [], 0
    for token in prompt:
        if token == layout.begin_id("image"):
            index = 0
        elif image.start <= token < image.end:
            index += 1
            if index > tokens:
                continue
        out.append(token)
    return out


def test_matryoshka_with_every_token_changes_nothing(titok_model):
    prompts = image_prompts(titok_model, (1, 2))
    plain = last_logits(titok_model, prompts)
    reducer = attach_reducer(titok_model, f"matryoshka:tokens={TITOK_TOKENS}")
    assert torch.equal(last_logits(titok_model, prompts), plain)
    assert not reducer.stages and reducer.kept_counts == [2 * TITOK_TOKENS]


def test_matryoshka_is_the_shorter_encoding_and_shortens_the_cache(titok_model):
    prompts = image_prompts(titok_model, (1, 2))
    shorter = [truncated(titok_model, p, 3) for p in prompts]
    expected = last_logits(titok_model, shorter)
    reducer = attach_reducer(titok_model, "matryoshka:tokens=3")
    torch.testing.assert_close(last_logits(titok_model, prompts), expected, atol=LOGIT_TOLERANCE, rtol=0)
    for prompt, images in zip(prompts, (1, 2), strict=True):
        cache = titok_model.new_kv_cache()
        with torch.no_grad():
            titok_model(torch.tensor([prompt]), kv_cache=cache)
        length = len(prompt) - (TITOK_TOKENS - 3) * images
        assert [layer.length for layer in cache.layers] == [length, length]
        assert cache.next_position.tolist() == [length]  # positions as the shorter encoding numbers them
        assert reducer.kept_counts == [3 * images]
        (stage,) = reducer.stages
        assert stage.layer == 0


def test_matryoshka_batched_equals_per_sample(titok_model):
    prompts = image_prompts(titok_model, (1, 2, 1))
    attach_reducer(titok_model, "matryoshka:tokens=2")
    batched, alone = generated(titok_model, prompts)
    assert batched == alone
    torch.testing.assert_close(
        batched_last_logits(titok_model, prompts),
        last_logits(titok_model, prompts, cache=True),
        atol=LOGIT_TOLERANCE,
        rtol=0,
    )


def test_matryoshka_needs_a_1d_image_tokenizer(toy_model, titok_model):
    with pytest.raises(ConfigError, match="image range is a 8x8 grid; it needs a 1D prefix image tokenizer"):
        attach_reducer(toy_model, "matryoshka:tokens=4")
    with pytest.raises(ConfigError, match=r"tokens must be in \[1, 8\], got 9"):
        attach_reducer(titok_model, "matryoshka:tokens=9")
    del titok_model.modality_tokenizers["image"]
    with pytest.raises(ConfigError, match="image tokenizer is none, not a 1D prefix tokenizer"):
        attach_reducer(titok_model, "matryoshka:tokens=4")


def test_nested_dropout_packs_spans_of_the_sampled_budgets_that_the_layout_reads(titok_model):
    layout = titok_model.layout
    image = layout.modalities["image"]
    boi, eoi = layout.begin_id("image"), layout.end_id("image")
    rng = np.random.default_rng(0)
    documents = []
    for _ in range(20):  # image in the prompt, image as the answer (both with loss in a document)
        parts = [[5], layout.span_ids("image", rng.integers(0, image.codebook_size, TITOK_TOKENS)), [7, 8]]
        parts += [layout.span_ids("image", rng.integers(0, image.codebook_size, TITOK_TOKENS)), [9]]
        ids = np.concatenate(parts).astype(np.int64)
        modality = np.concatenate([np.full(len(part), i % 2, dtype=np.int8) for i, part in enumerate(parts)])
        documents.append(Document(ids, np.ones(len(ids), dtype=bool), modality, np.zeros(len(ids), bool), False))
    budgets = [2, 5, TITOK_TOKENS]
    config = PackingConfig(seq_len=64, condition_dropout=0.0, nested_dropout={"image": budgets})
    packer = Packer(config, layout)
    lengths = []
    for row in packer.rows(iter(documents)):
        for document in np.unique(row.document_ids[: row.real_tokens]):
            where = np.flatnonzero(row.document_ids == document)
            segments = layout.split(row.input_ids[where].tolist(), strict=True).segments  # the layout accepts them
            for segment in (s for s in segments if s.kind == "span"):
                lengths.append(len(segment.codes))
        for end in np.flatnonzero(row.input_ids == eoi):
            span = end - np.flatnonzero(row.input_ids[:end] == boi)[-1] - 1
            assert (row.labels[end] == IGNORE_INDEX) == (span < TITOK_TOKENS)  # an early end is no target
    assert set(lengths) == set(budgets) and len(lengths) == 2 * len(documents)
    assert packer.stats.spans_shortened == sum(n < TITOK_TOKENS for n in lengths)


def test_nested_dropout_needs_a_ragged_range(toy_model, titok_model):
    with pytest.raises(ConfigError, match="image has a fixed grid; budgets need a 1D prefix tokenizer"):
        Packer(PackingConfig(nested_dropout={"image": [4]}), toy_model.layout)
    with pytest.raises(ConfigError, match=r"budgets must be at most 8, got \[4, 16\]"):
        Packer(PackingConfig(nested_dropout={"image": [4, 16]}), titok_model.layout)
    with pytest.raises(ConfigError, match="must be a list of token budgets >= 1"):
        PackingConfig(nested_dropout={"image": [0]}).check()
