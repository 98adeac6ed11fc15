"""Latent-reasoning heads (issue 8): continuous thought (Coconut) against slow, obvious references.

Decoding with latent steps equals a loop that recomputes the whole sequence each step and feeds the
thoughts explicitly as `inputs_embeds`; batched equals one at a time; zero steps equal the plain
model; the training objective equals a per-document sequential reference, loss and gradients; the
head saves and loads; the data formats; the one-line errors of the issue's bad inputs.
"""

from __future__ import annotations

import pytest
import torch

from mmllm.chat_template import encode_conversation
from mmllm.data.toy_tasks import generate
from mmllm.errors import CheckpointError, ConfigError, InputError
from mmllm.generation import GenerationConfig, Generator, Guidance
from mmllm.generation.modality_state import ModalityStates
from mmllm.model.config import ModelConfig
from mmllm.model.latent import (
    LATENT_HEAD_FILE,
    CoconutCurriculum,
    CoconutHead,
    LatentHeadHooks,
    PuzzleFormat,
    attach_latent_head,
    encode_puzzle,
    find_latent_head,
    latent_forward,
    latent_generate,
    load_latent_head,
    write_puzzle_shards,
)
from mmllm.model.latent.curriculum import coconut
from mmllm.model.loss import IGNORE_INDEX
from mmllm.model.mmllm import MMLLM
from mmllm.vocab import END_OF_TURN, LATENT_TOKEN

from .conftest import REPO, toy_vocab_layout

TOLERANCE = {"atol": 1e-5, "rtol": 1e-4}  # float32 sums in another order (cached pieces vs whole sequence)
QUESTIONS = ("Is Tom a wumpus?", "Compute 3 + 4.", "Are there more circles in the first image?")


@pytest.fixture()
def model(text_tokenizer):
    """A random tiny model on the toy layout; a large init std makes greedy choices decisive."""
    return tiny_latent_model(text_tokenizer)


def tiny_latent_model(text_tokenizer) -> MMLLM:
    """The latent tests' model (also test_colar's and test_mirage's): seeded, so every test sees the same."""
    torch.manual_seed(0)
    config = ModelConfig.from_yaml(REPO / "configs" / "model" / "tiny.yaml", ["initializer_range=0.3"])
    return MMLLM.from_config(config, toy_vocab_layout(text_tokenizer), text_tokenizer).eval()


def with_head(model, projection: str = "linear", max_latent_steps: int = 8) -> CoconutHead:
    """A Coconut head whose projection is moved off the identity, so a test sees the map used."""
    head = perturbed(CoconutHead(model.layout, model.config.hidden_size, max_latent_steps, projection))
    return attach_latent_head(model, head)


def prompts(model, count: int = 3) -> list[list[int]]:
    """Chat prompts of different lengths, ending with `<|assistant|>`."""
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS[:count]]
    return [
        encode_conversation(c, model.layout, model.text_tokenizer, add_generation_prompt=True).input_ids for c in chats
    ]


@torch.no_grad()
def reference_decode(model, head: CoconutHead, prompt: list[int], steps: int, max_new_tokens: int) -> list[int]:
    """The obvious way: no cache, the whole sequence recomputed each step, thoughts as embeddings."""
    embed = model.model.embed_tokens
    allowed = ModalityStates(model.layout, (), torch.device("cpu")).table[0]  # text, as the generator masks it
    stops = {model.layout.token_id(END_OF_TURN), model.layout.token_id("<|eos|>")}
    embeds = embed(torch.tensor([[*prompt, head.begin_id]]))
    for _ in range(steps):
        state = model(inputs_embeds=embeds, output_hidden_states=True).hidden_states[:, -1:]
        embeds = torch.cat([embeds, head.projection(state) if head.projection is not None else state], dim=1)
    embeds = torch.cat([embeds, embed(torch.tensor([[head.end_id]]))], dim=1)
    ids: list[int] = []
    for _ in range(max_new_tokens):
        token = int(model(inputs_embeds=embeds).logits[0, -1].masked_fill(~allowed, float("-inf")).argmax())
        if token in stops:
            break
        ids.append(token)
        embeds = torch.cat([embeds, embed(torch.tensor([[token]]))], dim=1)
    return ids


# ---------------------------------------------------------------- decoding


@pytest.mark.parametrize("projection", ["none", "linear", "mlp"])
def test_cached_batched_latent_decoding_equals_the_uncached_reference(model, projection):
    head = with_head(model, projection)
    steps = [3, 1, 0]  # ragged: rows close their span and answer while others still think
    config = GenerationConfig(max_new_tokens=6)
    outputs = latent_generate(model, prompts(model), steps, config)
    for prompt, n, output in zip(prompts(model), steps, outputs, strict=True):
        assert output.ids == reference_decode(model, head, prompt, n, 6)
        assert output.latent_steps == n and output.generated_tokens == n + len(output.ids)


def test_batched_latent_decoding_equals_one_prompt_at_a_time(model):
    with_head(model)
    steps = [4, 0, 2]
    config = GenerationConfig(max_new_tokens=5)
    batched = latent_generate(model, prompts(model), steps, config)
    alone = [latent_generate(model, [p], n, config)[0] for p, n in zip(prompts(model), steps, strict=True)]
    assert [o.ids for o in batched] == [o.ids for o in alone]
    assert [o.finish_reason for o in batched] == [o.finish_reason for o in alone]


def test_zero_latent_steps_reproduce_the_plain_model(model):
    layout = model.layout
    span = [layout.begin_id("latent"), layout.end_id("latent")]
    ids = torch.tensor([[*p[:10], *span, *p[:4]] for p in prompts(model)])
    config = GenerationConfig(max_new_tokens=6)
    with torch.no_grad():
        plain_logits = model(ids).logits
    plain = Generator(model).generate([[*p, *span] for p in prompts(model)], config)
    with_head(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain_logits)  # the head leaves a span without slots alone
        assert torch.equal(latent_forward(model, ids), plain_logits)
    latent = latent_generate(model, prompts(model), 0, config)
    assert [o.ids for o in latent] == [o.ids for o in plain]


# ---------------------------------------------------------------- training


def reasoning_documents(model) -> list[tuple[list[int], list[bool]]]:
    """Arithmetic puzzles as Coconut stages 2 and 1, stage 0 (an empty span) and plain CoT."""
    formats = [PuzzleFormat("coconut", stage=2), PuzzleFormat("coconut", stage=1)]
    formats += [PuzzleFormat("coconut", stage=0), PuzzleFormat("cot")]
    documents = []
    for index, fmt in enumerate(formats):
        record = generate("toy-arith", index, seed=0).record
        encoded = encode_puzzle(record, fmt, model.layout, model.text_tokenizer)
        documents.append((encoded.input_ids, encoded.loss_mask))
    return documents


def packed_batch(model, documents) -> dict[str, torch.Tensor]:
    """Two packed rows (documents 0, 1 | 2, 3) with the packer's padding document at each end."""
    rows = [documents[:2], documents[2:]]
    width = max(sum(len(ids) for ids, _ in row) for row in rows) + 3  # every row ends with some padding
    batch = {
        "input_ids": torch.full((2, width), model.layout.pad_id),
        "labels": torch.full((2, width), IGNORE_INDEX),
        "position_ids": torch.zeros(2, width, dtype=torch.long),
        "document_ids": torch.full((2, width), 2),
        "loss_weights": torch.zeros(2, width),
        "modality": torch.zeros(2, width, dtype=torch.long),
    }
    for r, row in enumerate(rows):
        start = 0
        for number, (ids, mask) in enumerate(row):
            stop = start + len(ids)
            batch["input_ids"][r, start:stop] = torch.tensor(ids)
            batch["labels"][r, start:stop] = torch.where(torch.tensor(mask), torch.tensor(ids), IGNORE_INDEX)
            batch["position_ids"][r, start:stop] = torch.arange(len(ids))
            batch["document_ids"][r, start:stop] = number
            batch["loss_weights"][r, start:stop] = torch.tensor(mask, dtype=torch.float32)
            start = stop
    return batch


def reference_loss(model, head: CoconutHead, documents) -> tuple[torch.Tensor, int]:
    """Summed next-token loss, one document at a time; each slot's embedding from a full forward."""
    embed = model.model.embed_tokens
    total, count = torch.zeros(()), 0
    for ids, mask in documents:
        embeds = list(embed(torch.tensor(ids)))
        for t, token in enumerate(ids):
            if token == head.latent_id:
                state = model(inputs_embeds=torch.stack(embeds[:t])[None], output_hidden_states=True).hidden_states
                embeds[t] = head.projection(state[0, -1]) if head.projection is not None else state[0, -1]
        logits = model(inputs_embeds=torch.stack(embeds)[None]).logits[0, :-1]
        targets = torch.tensor(ids[1:])
        scored = torch.tensor(mask[1:])
        total = total + torch.nn.functional.cross_entropy(logits[scored], targets[scored], reduction="sum")
        count += int(scored.sum())
    return total, count


@pytest.mark.parametrize("projection", ["none", "mlp"])
def test_coconut_objective_equals_a_per_document_sequential_reference(model, projection):
    # float64: the gradients of a loss summed over ~2000 nats differ by 1e-5 relative in float32
    # between any two orders of summation; in float64 the two computations agree to 1e-7.
    model.double()
    head = with_head(model, projection)
    documents = reasoning_documents(model)
    assert [ids.count(head.latent_id) for ids, _ in documents] == [2, 1, 0, 0]
    forwards = []
    counter = model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    out = coconut(model.train(), packed_batch(model, documents), tuple(model.layout.modalities))
    counter.remove()
    assert len(forwards) == 2 + 1  # n + 1 forwards for at most n = 2 thoughts: the slots share columns
    expected, count = reference_loss(model, head, documents)
    assert int(out.tokens) == count
    torch.testing.assert_close(out.loss_sum.double(), expected, **TOLERANCE)  # the loss is taken in float32
    torch.testing.assert_close(out.sums["loss/text"].double(), expected.detach(), **TOLERANCE)
    parameters = [model.model.layers[0].self_attn.q_proj.weight, *head.parameters()]
    got = torch.autograd.grad(out.loss_sum, parameters)
    want = torch.autograd.grad(expected, parameters)
    assert all(g.abs().sum() > 0 for g in got)  # gradients reach the model and the projection head
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOLERANCE)


def test_latent_head_hooks_attach_save_beside_the_model_and_continue(model, tmp_path):
    from mmllm.training.loop import ModelHooks

    model.name_or_path = ""
    hooks = LatentHeadHooks(ModelHooks(), "coconut", projection="mlp", max_latent_steps=4)
    trained = hooks.prepare(model, None)
    head = find_latent_head(trained)
    assert head is hooks.head and all(p.requires_grad for p in head.parameters())
    with torch.no_grad():
        head.projection.down.weight.add_(1.0)  # "trained"
    hooks.saved(trained).save_pretrained(tmp_path / "checkpoint" / "model")
    loaded = MMLLM.from_pretrained(tmp_path / "checkpoint" / "model")  # no head weights among the model's
    assert (tmp_path / "checkpoint" / "model" / LATENT_HEAD_FILE).is_file() and find_latent_head(loaded) is None
    again = LatentHeadHooks(ModelHooks(), "coconut", projection="mlp", max_latent_steps=4)
    again.prepare(loaded, None)
    torch.testing.assert_close(again.head.state_dict(), head.state_dict(), rtol=0, atol=0)


def one_document_per_row(documents: list[tuple[list[int], list[bool]]], width: int, pad_id: int) -> dict:
    """A loop batch of one (ids, loss mask) document per row, right-padded to `width`."""
    rows = len(documents)
    batch = {
        "input_ids": torch.full((rows, width), pad_id),
        "labels": torch.full((rows, width), IGNORE_INDEX),
        "document_ids": torch.ones(rows, width, dtype=torch.long),
        "loss_weights": torch.zeros(rows, width),
        "modality": torch.zeros(rows, width, dtype=torch.long),
    }
    for r, (ids, mask) in enumerate(documents):
        n = len(ids)
        batch["input_ids"][r, :n] = torch.tensor(ids)
        batch["labels"][r, :n] = torch.where(torch.tensor(mask), torch.tensor(ids), IGNORE_INDEX)
        batch["document_ids"][r, :n] = 0
        batch["loss_weights"][r, :n] = torch.tensor(mask, dtype=torch.float32)
    return batch


def perturbed(head):
    """`head` with every parameter moved off its initialisation (seeded), so a test sees each one used."""
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return head


# ---------------------------------------------------------------- save / load


def test_head_save_load_round_trip(model, tmp_path):
    head = with_head(model, "mlp", max_latent_steps=5)
    config = GenerationConfig(max_new_tokens=5)
    before = latent_generate(model, prompts(model), [5, 2, 1], config)
    model.detach_hook(head)
    model.save_pretrained(tmp_path / "model")
    head.save(tmp_path / "model")
    loaded = MMLLM.from_pretrained(tmp_path / "model").eval()
    restored = load_latent_head(loaded)
    assert isinstance(restored, CoconutHead) and restored.options() == {"max_latent_steps": 5, "projection": "mlp"}
    torch.testing.assert_close(restored.state_dict(), head.state_dict(), rtol=0, atol=0)
    after = latent_generate(loaded, prompts(model), [5, 2, 1], config)
    assert [o.ids for o in after] == [o.ids for o in before]


# ---------------------------------------------------------------- data formats


def test_formats_build_every_baseline_and_stage_from_one_record(model):
    layout, tokenizer = model.layout, model.text_tokenizer
    record = generate("toy-prosqa", 0, seed=0).record
    steps, answer = record["meta"]["steps"], record["meta"]["answer"]
    latent, begin, end = layout.token_id(LATENT_TOKEN), layout.begin_id("latent"), layout.end_id("latent")

    def reply(fmt: PuzzleFormat) -> tuple[list[int], list[bool]]:
        encoded = encode_puzzle(record, fmt, layout, tokenizer)
        start = encoded.input_ids.index(layout.role_id("assistant")) + 1
        return encoded.input_ids[start:], encoded.loss_mask[start:]

    cot = encode_puzzle(record, PuzzleFormat("cot"), layout, tokenizer)
    plain = encode_conversation(record["messages"], layout, tokenizer)  # what `mmllm pretokenize` makes of it
    assert (cot.input_ids, cot.loss_mask) == (plain.input_ids, plain.loss_mask)
    ids, mask = reply(PuzzleFormat("no-cot"))
    assert tokenizer.decode(ids[:-1]) == f"answer: {answer}" and all(mask)
    ids, mask = reply(PuzzleFormat("pause", pause=6))
    pauses = [layout.token_id(f"<|pause_{i % 4}|>") for i in range(6)]  # the layout's 4 pause tokens, cycled
    assert ids[:6] == pauses and not any(mask[:6]) and all(mask[6:])
    curriculum = CoconutCurriculum(c_thought=2, max_latent_stage=2)
    for stage, thoughts, kept in ((0, 0, steps), (2, 4, steps[2:]), (3, 4, [])):
        ids, mask = reply(PuzzleFormat("coconut", stage=stage, curriculum=curriculum))
        assert ids[: thoughts + 2] == [begin, *[latent] * thoughts, end] and not any(mask[: thoughts + 2])
        assert tokenizer.decode(ids[thoughts + 2 : -1]) == "\n".join([*kept, f"answer: {answer}"])
        assert all(mask[thoughts + 2 :])
    assert curriculum.inference_steps(curriculum.final_stage) == 4


def test_puzzle_shards_load_in_the_finetuning_data_path(model, tmp_path):
    from mmllm.data.pretokenize import ShardDocuments, TokenizerBundle, load_shards

    TokenizerBundle(model.layout, model.text_tokenizer).save(tmp_path / "bundle")
    records = [generate("toy-arith", i, seed=0).record for i in range(3)]
    fmt = PuzzleFormat("coconut", stage=1)
    assert write_puzzle_shards(records, tmp_path / "bundle", tmp_path / "shards", fmt) == 3
    documents = ShardDocuments(load_shards(tmp_path / "shards", model.layout))
    for i, record in enumerate(records):
        encoded = encode_puzzle(record, fmt, model.layout, model.text_tokenizer)
        assert documents[i].input_ids.tolist() == encoded.input_ids
        assert documents[i].loss_mask.tolist() == encoded.loss_mask


# ---------------------------------------------------------------- bad input


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_more_latent_steps_than_the_configured_maximum(model):
    with_head(model, max_latent_steps=2)
    with pytest.raises(ConfigError, match="3 latent steps asked for.*at most 2") as error:
        latent_generate(model, prompts(model, 2), [1, 3])
    one_line(error)
    with pytest.raises(ConfigError, match="guidance"):
        latent_generate(model, prompts(model, 1), 1, GenerationConfig(guidance=Guidance({"image": 3.0})))
    documents = [
        encode_puzzle(
            generate("toy-arith", 0, seed=0).record, PuzzleFormat("coconut", 3), model.layout, model.text_tokenizer
        )
    ]
    with pytest.raises(ConfigError, match="at most 2"):
        coconut(model, packed_batch(model, [(d.input_ids, d.loss_mask) for d in documents] * 2), ())


def test_a_checkpoint_without_a_head(model, tmp_path):
    model.save_pretrained(tmp_path / "model")
    loaded = MMLLM.from_pretrained(tmp_path / "model")
    with pytest.raises(CheckpointError, match=f"no latent head \\({LATENT_HEAD_FILE}\\)") as error:
        load_latent_head(loaded)
    one_line(error)


def test_a_latent_span_for_a_model_without_a_head(model):
    latent = model.layout.token_id(LATENT_TOKEN)
    prompt = prompts(model, 1)[0]
    for call in (
        lambda: latent_generate(model, [prompt], 2),
        lambda: Generator(model).generate([[*prompt, model.layout.begin_id("latent"), latent]]),
        lambda: Generator(model).generate([prompt], forced=[[latent]]),
        lambda: latent_forward(model, torch.tensor([[*prompt, latent]])),
    ):
        with pytest.raises(InputError, match="needs a model with a latent head") as error:
            call()
        one_line(error)
    with_head(model)  # with a head, a step inside a prompt is refused too: each step is a forward of its own
    with pytest.raises(InputError, match="cannot be part of a prompt"):
        Generator(model).generate([[*prompt, latent]])
