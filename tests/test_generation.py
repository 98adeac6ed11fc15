"""The generator: modality state machine, sampling, guidance, batching, streaming, media I/O."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mmllm.data.toyworld import render_image, sample_scene
from mmllm.errors import ConfigError, LayoutError
from mmllm.generation import (
    GenerationConfig,
    Generator,
    Guidance,
    Prompt,
    SamplingParams,
    decode_replies,
    encode_prompts,
)
from mmllm.generation.modality_state import TEXT, ModalityStates
from mmllm.generation.sampling import BatchSampler, parse_sampling
from mmllm.vocab import END_OF_TURN

SPANS_PER_MODALITY = 200  # the count: enough rows that a rare mask slip would show
SAMPLED = SamplingParams(temperature=1.0)  # a random model sampled at T=1 tries every allowed id


def chat(text: str, reply: str = "text", image: np.ndarray | None = None) -> Prompt:
    content = [{"type": "text", "text": text}]
    if image is not None:
        content.insert(0, {"type": "image", "array": image})
    return Prompt([{"role": "user", "content": content}], reply_modality=reply)


@pytest.mark.parametrize("modality", ["image", "audio", "video", "action"])
def test_random_model_generates_well_formed_spans_of_every_modality(toy_model, modality):
    layout = toy_model.layout
    m = layout.modality(modality)
    encoded = encode_prompts(toy_model, [chat(f"make {modality} number {i}", modality) for i in range(8)])
    prompts = [encoded[i % 8].ids for i in range(SPANS_PER_MODALITY)]
    config = GenerationConfig(max_new_tokens=m.max_length + 1, default=SAMPLED, stop_after_span=True, seed=1)
    outputs = Generator(toy_model).generate(prompts, config)
    replies = [[layout.begin_id(modality), *o.ids] for o in outputs]
    assert all(o.finish_reason == "span" for o in outputs)
    for reply in replies:
        (segment,) = layout.split(reply, strict=True).segments  # raises on any misplaced id
        assert segment.complete
        if m.fixed_length is not None:
            assert len(reply) - 2 == m.fixed_length
        else:
            assert 1 <= len(segment.codes) <= m.max_frames
    parts = decode_replies(toy_model, replies)
    assert sum(bool(p.flag) for reply in parts for p in reply) == 0
    assert all(len(reply) == 1 and reply[0].kind == modality and reply[0].media is not None for reply in parts)
    if modality == "audio":  # a random model should not always stop at the first frame
        assert len({len(o.ids) for o in outputs}) > 5


def test_state_machine_follows_delay_patterns_first_k_levels_and_interleaving(toy_layout):
    """Every structure of the conftest layout: a sampled stream always splits strictly."""
    states = ModalityStates(toy_layout, toy_layout.modalities, torch.device("cpu"))
    rng = torch.Generator().manual_seed(0)
    rows = 64
    states.start([[toy_layout.token_id("<|bos|>")]] * rows)
    streams: list[list[int]] = [[] for _ in range(rows)]
    for _ in range(120):
        masks = states.masks()
        assert bool(masks.any(dim=1).all()), "a row with nothing allowed"
        logits = torch.randn(rows, toy_layout.padded_size, generator=rng)
        begins = torch.tensor([toy_layout.begin_id(n) for n in toy_layout.modalities])
        logits[:, begins] += 6  # open spans often, so every modality is visited
        tokens = logits.masked_fill(~masks, float("-inf")).argmax(dim=1)
        states.advance(tokens)
        for stream, token in zip(streams, tokens.tolist(), strict=True):
            stream.append(token)
    kinds = set()
    for stream, modality in zip(streams, states.modality.tolist(), strict=True):
        if modality != TEXT:  # cut mid-span at the end of the loop: close it by its own rule
            continue
        segments = toy_layout.split(stream, strict=True).segments
        kinds |= {s.name for s in segments if s.kind == "span"}
        assert all(s.complete for s in segments if s.kind == "span")
    assert kinds == set(toy_layout.modalities)


def test_image_span_is_exactly_the_grid_then_end_is_forced(toy_model):
    layout = toy_model.layout
    image = layout.modality("image")
    states = ModalityStates(layout, ["image"], torch.device("cpu"))
    states.start([[layout.token_id("<|bos|>"), layout.begin_id("image")]])
    for step in range(image.fixed_length):
        allowed = states.masks()[0].nonzero().squeeze(1)
        assert allowed.min() >= image.start and allowed.max() < image.end
        states.advance(torch.tensor([image.start + step % image.codebook_size]))
    assert states.masks()[0].nonzero().squeeze(1).tolist() == [layout.end_id("image")]
    states.advance(torch.tensor([layout.end_id("image")]))
    assert states.modality.item() == TEXT
    text_mask = states.masks()[0]
    assert text_mask[: layout.text_size].all() and text_mask[layout.begin_id("image")]
    assert not text_mask[layout.begin_id("audio")]  # not generatable here
    too_long = [layout.begin_id("image"), *range(image.start, image.start + image.fixed_length + 1)]
    with pytest.raises(LayoutError, match="open image span already has"):
        states.start([too_long])


def test_encode_only_tokenizer_is_never_generated(toy_model):
    class EncodeOnly(type(toy_model.modality_tokenizers["image"])):
        can_decode = False

    toy_model.modality_tokenizers["image"].__class__ = EncodeOnly
    generator = Generator(toy_model)
    assert "image" not in generator.generatable
    states = ModalityStates(toy_model.layout, generator.generatable, torch.device("cpu"))
    states.start([[1]])
    assert not states.masks()[0, toy_model.layout.begin_id("image")]


def test_greedy_is_deterministic_and_batched_equals_one_at_a_time(toy_model):
    prompts = encode_prompts(
        toy_model,
        [chat("a red circle"), chat("draw it", "image"), chat("what moves and where is the large blue star")],
    )
    ids = [p.ids for p in prompts]
    generator = Generator(toy_model)
    config = GenerationConfig(max_new_tokens=24, stop_ids=())
    batched = [o.ids for o in generator.generate(ids, config)]
    again = [o.ids for o in generator.generate(ids, GenerationConfig(max_new_tokens=24, stop_ids=(), seed=99))]
    alone = [generator.generate([p], config)[0].ids for p in ids]
    assert batched == again == alone
    assert len({tuple(b) for b in batched}) == 3


def test_kv_cached_decoding_equals_a_full_recompute_each_step(toy_model):
    layout = toy_model.layout
    (prompt,) = encode_prompts(toy_model, [chat("say something", "text")])
    generated = Generator(toy_model).generate([prompt.ids], GenerationConfig(max_new_tokens=16, stop_ids=()))[0].ids
    states = ModalityStates(layout, ["image", "audio", "video", "action"], torch.device("cpu"))
    sequence = list(prompt.ids)
    states.start([sequence])
    with torch.no_grad():
        for _ in range(16):
            logits = toy_model(torch.tensor([sequence])).logits[:, -1]
            token = logits.masked_fill(~states.masks(), float("-inf")).argmax(dim=1)
            states.advance(token)
            sequence.append(int(token))
    assert generated == sequence[len(prompt.ids) :]


def guided_reference(model, cond: list[int], uncond: list[int], scale: float, steps: int) -> list[int]:
    """Two separate full forwards per step, combined by the formula of LlamaGen / Emu3."""
    states = ModalityStates(model.layout, ["image"], torch.device("cpu"))
    states.start([cond])
    out = []
    with torch.no_grad():
        for _ in range(steps):
            c = model(torch.tensor([cond])).logits[:, -1]
            u = model(torch.tensor([uncond])).logits[:, -1]
            logits = u + scale * (c - u) if states.modality.item() != TEXT else c
            token = int(logits.masked_fill(~states.masks(), float("-inf")).argmax())
            states.advance(torch.tensor([token]))
            out.append(token)
            cond, uncond = [*cond, token], [*uncond, token]
    return out


def test_guidance_scale_one_is_no_guidance_and_scale_s_matches_two_passes(toy_model):
    layout = toy_model.layout
    prompts = encode_prompts(toy_model, [chat("draw a large red circle", "image"), chat("a blue star please", "image")])
    ids = [p.ids for p in prompts]
    uncond = [p.unconditional(layout) for p in prompts]
    assert layout.null_id in uncond[0] and len(uncond[0]) < len(ids[0])
    generator = Generator(toy_model)
    steps = layout.modality("image").fixed_length + 1
    plain = [o.ids for o in generator.generate(ids, GenerationConfig(max_new_tokens=steps))]
    scale_one = GenerationConfig(max_new_tokens=steps, guidance=Guidance({"image": 1.0}))
    assert [o.ids for o in generator.generate(ids, scale_one, uncond)] == plain
    for mode in ("batched", "sequential"):
        config = GenerationConfig(max_new_tokens=steps, guidance=Guidance({"image": 3.0}, mode=mode))
        guided = [o.ids for o in generator.generate(ids, config, uncond)]
        assert guided == [guided_reference(toy_model, c, u, 3.0, steps) for c, u in zip(ids, uncond, strict=True)]
        assert generator.stats.forwards == (2 if mode == "sequential" else 1) * steps
    assert guided != plain


def test_guidance_rejects_bad_settings():
    with pytest.raises(ConfigError, match="not 'text'"):
        Guidance({"text": 2.0})
    with pytest.raises(ConfigError, match="mode"):
        Guidance({"image": 2.0}, mode="parallel")


def test_sampling_settings_per_modality():
    sampler = BatchSampler([SamplingParams(), SamplingParams(temperature=1.0, top_k=1)], torch.device("cpu"), 0)
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    modality = torch.tensor([0, 1] * 32)
    assert torch.equal(sampler.sample(logits, modality, None), logits.argmax(dim=1))  # top-k 1 is greedy

    nucleus = BatchSampler([SamplingParams(temperature=1.0, top_p=0.5)], torch.device("cpu"), 0)
    peaked = torch.zeros(1000, 5)
    peaked[:, 2] = 5.0  # 97% of the mass: the nucleus of p=0.5 is this id alone
    assert bool((nucleus.sample(peaked, torch.zeros(1000, dtype=torch.long), None) == 2).all())

    free = BatchSampler([SamplingParams(temperature=1.0)], torch.device("cpu"), 0)
    flat = torch.zeros(4000, 4)
    counts = torch.bincount(free.sample(flat, torch.zeros(4000, dtype=torch.long), None), minlength=4)
    assert counts.min() > 850  # uniform over 4 ids: 1000 each, 4 sigma is ~110

    penalised = BatchSampler([SamplingParams(repetition_penalty=4.0)], torch.device("cpu"), 0)
    logits = torch.tensor([[3.0, 2.0, -1.0]])
    seen = torch.tensor([[True, False, False]])
    assert penalised.sample(logits, torch.zeros(1, dtype=torch.long), seen).item() == 1  # 3/4 < 2

    assert parse_sampling("temperature=0.7,top_k=50") == SamplingParams(temperature=0.7, top_k=50)
    with pytest.raises(ConfigError, match="top_q"):
        parse_sampling("top_q=1")
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_seeded_sampling_is_reproducible(toy_model):
    (prompt,) = encode_prompts(toy_model, [chat("draw", "image")])
    generator = Generator(toy_model)
    config = GenerationConfig(max_new_tokens=65, default=SAMPLED, seed=5)
    first = generator.generate([prompt.ids], config)[0].ids
    assert generator.generate([prompt.ids], config)[0].ids == first
    other = GenerationConfig(max_new_tokens=65, default=SAMPLED, seed=6)
    assert generator.generate([prompt.ids], other)[0].ids != first


def test_streaming_callback_and_stop_conditions(toy_model):
    layout = toy_model.layout
    prompts = [p.ids for p in encode_prompts(toy_model, [chat("hello"), chat("draw", "image")])]
    seen: dict[int, list[int]] = {0: [], 1: []}
    config = GenerationConfig(max_new_tokens=70, stop_ids=(), stop_after_span=True)
    outputs = Generator(toy_model).generate(prompts, config, on_token=lambda row, token: seen[row].append(token))
    assert seen[0] == outputs[0].ids and seen[1] == outputs[1].ids
    assert outputs[1].finish_reason == "span" and outputs[1].ids[-1] == layout.end_id("image")
    assert outputs[0].finish_reason == "length" and len(outputs[0].ids) == 70

    first = outputs[0].ids[0]  # make the model's first choice a stop id: it ends before emitting anything
    (out,) = Generator(toy_model).generate(prompts[:1], GenerationConfig(max_new_tokens=70, stop_ids=(first,)))
    assert out.ids == [] and out.finish_reason == "stop"
    (out,) = Generator(toy_model).generate(prompts[:1], GenerationConfig(max_new_tokens=70))  # default stops
    assert not {layout.token_id(END_OF_TURN), layout.token_id("<|eos|>")} & set(out.ids)
    text = toy_model.text_tokenizer.decode([t for t in outputs[0].ids[:6] if t < layout.text_size])
    assert text.strip()
    by_string = GenerationConfig(max_new_tokens=70, stop_ids=(), stop_strings=(text.strip()[-1],))
    (out,) = Generator(toy_model).generate(prompts[:1], by_string)
    assert out.finish_reason == "stop" and len(out.ids) <= 6


def test_prompt_media_are_encoded_and_reply_media_decoded(toy_model):
    image = render_image(sample_scene(random.Random(0), 1))
    (prompt,) = encode_prompts(toy_model, [chat("describe", "text", image=image)])
    layout = toy_model.layout
    begin = prompt.ids.index(layout.begin_id("image"))
    assert prompt.ids[begin + 65] == layout.end_id("image")
    codes = toy_model.modality_tokenizers["image"].encode([image]).items()[0]
    assert prompt.ids[begin + 1 : begin + 65] == layout.codes_to_ids("image", codes).tolist()
    assert not any(prompt.condition[begin : begin + 66])  # media are never dropped for guidance

    reply = [5, 6, *layout.span_ids("image", codes), 7]
    (parts,) = decode_replies(toy_model, [reply])
    assert [p.kind for p in parts] == ["text", "image", "text"]  # interleaved output
    assert parts[1].media.shape == (64, 64, 3) and parts[1].flag == ""
    (cut,) = decode_replies(toy_model, [reply[:20]])
    assert cut[1].flag.startswith("incomplete image span")


def test_sampling_settings_for_a_modality_the_model_lacks_are_refused(toy_model):
    config = GenerationConfig(max_new_tokens=2, sampling={"picture": SamplingParams(temperature=1.0)})
    with pytest.raises(ConfigError, match="sampling settings for picture: the model's modalities are text, image"):
        Generator(toy_model).generate([[toy_model.layout.special_tokens["<|bos|>"]]], config)


def test_prompt_with_a_modality_the_model_lacks_is_refused(toy_model):
    del toy_model.modality_tokenizers["image"]
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    with pytest.raises(LayoutError, match="no image tokenizer"):
        encode_prompts(toy_model, [chat("describe", image=image)])


def test_text_stream_prints_text_as_it_forms_and_marks_media(toy_model):
    import io

    from mmllm.generation.streaming import TextStream

    layout, tokenizer = toy_model.layout, toy_model.text_tokenizer
    first = tokenizer("a large red circle", add_special_tokens=False)["input_ids"]
    second = tokenizer(" is é drawn", add_special_tokens=False)["input_ids"]  # é: byte-fallback pieces
    codes = np.zeros((8, 8), dtype=np.int64)
    out = io.StringIO()
    stream = TextStream(layout, tokenizer, out)
    for token in [*first, *layout.span_ids("image", codes), *second]:
        stream(0, token)
        assert "\ufffd" not in out.getvalue()  # half a character is never printed
    stream(1, first[0])  # another row's ids are not this stream's
    stream.close()
    assert out.getvalue() == f"{tokenizer.decode(first)}[image ...]{tokenizer.decode(second)}\n"
