"""SparseVLM, ToMe and PreLLM (VisionZip) against naive references; the key bias that gives ToMe its
proportional attention; and every training-free reducer on a model with a LoRA adapter."""

from __future__ import annotations

import math

import pytest
import torch

from mmllm.errors import ConfigError
from mmllm.generation import GenerationConfig, Generator
from mmllm.model.backbone import AttentionMasks, BackboneHook, CausalLM, TokenState
from mmllm.model.config import ModelConfig
from mmllm.model.reducers import attach_reducer, build_reducer
from mmllm.model.reducers.base import registry
from mmllm.model.reducers.methods import SparseVLM

from .conftest import REPO, random_toy_tokenizers, toy_vocab_layout
from .test_reducers import IMAGE_TOKENS, image_prompts, logits_of

LEARNED = {"registers", "matryoshka"}  # trained reducers, tested with their training path
TOY_OPTIONS = {"fastv": ":layer=1", "dart": ":layer=1"}  # their default layer 2 is past the toy's depth


@pytest.fixture()
def deep_model(text_tokenizer):
    """The toy model with four layers, room for stages at several depths."""
    from mmllm.model.mmllm import MMLLM

    torch.manual_seed(0)
    config = ModelConfig.from_yaml(
        REPO / "configs" / "model" / "tiny.yaml", ["num_hidden_layers=4", "initializer_range=0.3"]
    )
    return MMLLM.from_config(config, toy_vocab_layout(text_tokenizer), text_tokenizer, random_toy_tokenizers()).eval()


def cache_lengths(model, prompt: list[int]) -> list[int]:
    cache = model.new_kv_cache()
    with torch.no_grad():
        model(torch.tensor([prompt]), kv_cache=cache)
    return [layer.length for layer in cache.layers]


def images_in(reducer, prompt: list[int]) -> int:
    return sum(1 for t in prompt if reducer.visual_id(t)) // IMAGE_TOKENS


def kept_visual(reducer, prompt: list[int], stage: int = 0) -> set[int]:
    keep = reducer.stages[stage].keep[0]
    return {i for i in keep.nonzero()[:, 0].tolist() if reducer.visual_id(prompt[i])}


def hidden_before(model, prompt: list[int], layer: int) -> torch.Tensor:
    """(T, C): the hidden states entering decoder layer `layer`, with no reducer, layer by layer."""
    backbone = model.model
    ids = torch.tensor([prompt])
    hidden = backbone.embed_tokens(ids)
    positions = torch.arange(len(prompt))[None]
    rope = backbone.rotary_emb(positions, hidden.dtype)
    state = TokenState(hidden, positions, ids, None, None, positions)
    for block in backbone.layers[:layer]:
        hidden = block(hidden, rope, AttentionMasks(state), None)
    return hidden[0]


def eager_attention(model, hidden: torch.Tensor, layer: int) -> torch.Tensor:
    """(T, T): layer `layer`'s causal attention probabilities of `hidden` (T, C), mean over heads."""
    backbone = model.model
    attention = backbone.layers[layer].self_attn
    t = hidden.shape[0]
    rope = backbone.rotary_emb(torch.arange(t)[None], hidden.dtype)
    q, k, _ = attention.project(backbone.layers[layer].input_layernorm(hidden[None]), rope)
    k = k.repeat_interleave(attention.num_heads // attention.num_kv_heads, dim=1)
    causal = torch.full((t, t), float("-inf")).triu(1)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(attention.head_dim) + causal, dim=-1)[0].mean(dim=0)


def head_mean_keys(model, hidden: torch.Tensor, layer: int) -> torch.Tensor:
    block = model.model.layers[layer]
    attention = block.self_attn
    keys = attention.k_proj(block.input_layernorm(hidden))
    return keys.view(hidden.shape[0], attention.num_kv_heads, attention.head_dim).mean(dim=1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def by_score(indices, score) -> list[int]:
    """Indices by descending score, ties to the earlier one."""
    return sorted(indices, key=lambda i: (-float(score[i]), i))


def image_runs(reducer, prompt: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for i, token in enumerate(prompt):
        if reducer.visual_id(token):
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
    return runs


# ---------------------------------------------------------------- options and the no-op ratio


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("sparsevlm:recycle=2", r"reducer sparsevlm: recycle must be in \[0, 1\], got 2"),
        ("sparsevlm:layers=0/1", "reducer sparsevlm: stage boundaries are layers >= 1"),
        ("sparsevlm:ratio=1", r"reducer sparsevlm: ratio must be in \[0, 1\), got 1"),
        ("sparsevlm:queries=last", "sparsevlm: .*unexpected keyword argument 'queries'"),
        ("tome:by=value", "reducer tome: by must be 'key' or 'hidden', got 'value'"),
        ("tome:layers=1/0", "reducer tome: layers must be increasing, e.g. layers=2/4/6, got '1/0'"),
        ("tome:layers=a/b", "reducer tome: layers must be increasing"),
        ("tome:layers=2", r"reducer tome: layer must be in \[0, 2\), got 2"),
        ("prellm:contextual=1.5", r"reducer prellm: contextual must be in \[0, 1\], got 1.5"),
        ("prellm:layer=1", "prellm: .*unexpected keyword argument 'layer'"),
    ],
)
def test_bad_options_are_one_line_config_errors(toy_model, spec, message):
    with pytest.raises(ConfigError, match=message) as caught:
        attach_reducer(toy_model, spec)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("spec", ["sparsevlm:ratio=0", "tome:layers=0/1,ratio=0", "prellm:ratio=0"])
def test_ratio_zero_gives_identical_logits_and_ids(toy_model, spec):
    prompts = image_prompts(toy_model, 2, images_per_prompt=(1, 2))
    config = GenerationConfig(max_new_tokens=6, stop_ids=())
    plain_logits = logits_of(toy_model, prompts)
    plain_ids = [o.ids for o in Generator(toy_model).generate(prompts, config)]
    attach_reducer(toy_model, spec)
    assert torch.equal(logits_of(toy_model, prompts), plain_logits)
    assert [o.ids for o in Generator(toy_model).generate(prompts, config)] == plain_ids


# ---------------------------------------------------------------- batches, caches, ideal slices


def promised_lengths(spec: str, full: int, images: int, num_layers: int) -> list[int]:
    """The cache length of each layer each method promises for a prompt of `full` tokens."""
    visual = images * IMAGE_TOKENS
    if spec.startswith("sparsevlm"):  # layers=1, one stage removing 3/4 of the row's visual slots
        return [full, full - math.floor(visual * 0.75)]
    if spec.startswith("tome:layers=1,"):  # half of each image
        return [full, full - images * (IMAGE_TOKENS // 2)]
    if spec.startswith("tome:layers=0/1"):  # 3/4 of each image, an equal share per layer
        first = math.floor(IMAGE_TOKENS * 0.75 / 2)
        return [full - images * first, full - images * math.floor(IMAGE_TOKENS * 0.75)]
    return [full - images * math.floor(IMAGE_TOKENS * 0.75)] * num_layers  # prellm: 3/4 of each image


@pytest.mark.parametrize(
    "spec",
    [
        "sparsevlm:layers=1,ratio=0.75,recycle=0.1",
        "tome:layers=1,ratio=0.5",
        "tome:layers=0/1,ratio=0.75,by=hidden",
        "prellm:ratio=0.75",
    ],
)
def test_batched_equals_per_sample_and_the_cache_holds_what_was_promised(toy_model, spec):
    prompts = image_prompts(toy_model, 3, images_per_prompt=(1, 2, 1))  # rows with 64 and 128 image tokens
    reducer = attach_reducer(toy_model, spec)
    config = GenerationConfig(max_new_tokens=5, stop_ids=())
    generator = Generator(toy_model)
    batched = [o.ids for o in generator.generate(prompts, config)]
    alone = [generator.generate([prompt], config)[0].ids for prompt in prompts]
    assert batched == alone
    for prompt in prompts:
        lengths = cache_lengths(toy_model, prompt)
        images = images_in(reducer, prompt)
        assert lengths == promised_lengths(spec, len(prompt), images, len(lengths))
        assert reducer.kept_counts == [images * IMAGE_TOKENS - (len(prompt) - lengths[-1])]


def test_sparsevlm_prunes_progressively_stage_by_stage(deep_model):
    prompts = image_prompts(deep_model, 2, images_per_prompt=(2, 1))
    reducer = attach_reducer(deep_model, "sparsevlm:layers=1/3,ratio=0.75,recycle=0.1")
    assert reducer.stage_ratio == 0.5  # two stages of one half each: a quarter is left
    generator = Generator(deep_model)
    config = GenerationConfig(max_new_tokens=5, stop_ids=())
    assert [o.ids for o in generator.generate(prompts, config)] == [
        generator.generate([p], config)[0].ids for p in prompts
    ]
    (prompt,) = prompts[:1]
    full, visual = len(prompt), 2 * IMAGE_TOKENS
    assert cache_lengths(deep_model, prompt) == [full, full - visual // 2, full - visual // 2, full - 3 * visual // 4]
    assert reducer.kept_counts == [visual // 4]
    assert [stage.layer for stage in reducer.stages] == [1, 3]


def test_sparsevlm_default_layers_sit_at_the_papers_depths(deep_model):
    assert SparseVLM.default_layers(32) == [2, 6, 15]
    assert build_reducer("sparsevlm", deep_model).boundaries == [1, 2]


@pytest.mark.parametrize(
    "spec",
    ["sparsevlm:layers=1,ratio=0.5", "sparsevlm:layers=1,ratio=0.5,recycle=0", "tome:layers=0/1", "prellm:ratio=0.75"],
)
def test_ideal_slice_replays_the_same_token_count(toy_model, spec):
    prompts = image_prompts(toy_model, 3, images_per_prompt=(1, 2, 1))
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    reducer = attach_reducer(toy_model, spec)

    def prefill() -> tuple[torch.Tensor, list[int]]:
        cache = toy_model.new_kv_cache()
        with torch.no_grad():
            logits = toy_model(ids, attention_mask=mask, kv_cache=cache).logits[:, -1]
        return logits, [layer.length for layer in cache.layers]

    reduced, lengths = prefill()
    toy_model.detach_hook(reducer)
    toy_model.attach_hook(reducer.ideal_slice())
    replayed, replayed_lengths = prefill()
    assert replayed_lengths == lengths and lengths[-1] < width
    if "recycle=0" in spec:  # pure pruning: the replay is the same computation
        assert torch.equal(replayed, reduced)


# ---------------------------------------------------------------- naive references


def eager_sparsevlm_keep(model, reducer, prompt: list[int], layer: int, ratio: float, recycle: float) -> set[int]:
    """SparseVLM by the book, on one prompt with one stage at `layer`."""
    embeddings = model.model.embed_tokens(torch.tensor(prompt))
    visual = [i for i, t in enumerate(prompt) if reducer.visual_id(t)]
    text = [i for i in range(visual[0] + 1, len(prompt)) if i not in visual]
    relevance = torch.zeros(len(text))
    for v in visual:
        relevance += torch.softmax(torch.stack([embeddings[v] @ embeddings[j] for j in text]), dim=0) / len(visual)
    raters = [j for j, r in zip(text, relevance, strict=True) if r > relevance.mean()] or text
    hidden = hidden_before(model, prompt, layer)
    attention = eager_attention(model, hidden, layer)
    score = {i: sum(float(attention[j, i]) for j in raters) / len(raters) for i in visual}
    budget = len(visual) - math.floor(len(visual) * ratio)
    clusters = min(math.ceil((len(visual) - budget) * recycle), budget)
    order = by_score(visual, score)
    selected = order[: budget - clusters]
    pool = order[budget - clusters : budget - clusters + 10 * clusters]
    dim = hidden.shape[1]
    distance = [[float((hidden[a] - hidden[b]).norm()) / math.sqrt(dim) for b in pool] for a in pool]
    density = [math.exp(-sum(d**2 for d in sorted(row)[:clusters]) / clusters) for row in distance]
    largest = max(max(row) for row in distance)
    separation = [
        min([distance[a][b] for b in range(len(pool)) if density[b] > density[a]] or [largest])
        for a in range(len(pool))
    ]
    centers = by_score(range(len(pool)), [s * d for s, d in zip(separation, density, strict=True)])[:clusters]
    return set(selected) | {pool[c] for c in centers}


def test_sparsevlm_keeps_what_a_naive_eager_reference_keeps(toy_model):
    (prompt,) = image_prompts(toy_model, 1, images_per_prompt=(2,))
    reducer = attach_reducer(toy_model, "sparsevlm:layers=1,ratio=0.75,recycle=0.1")
    with torch.no_grad():
        toy_model(torch.tensor([prompt]))
        expected = eager_sparsevlm_keep(toy_model, reducer, prompt, 1, 0.75, 0.1)
    assert kept_visual(reducer, prompt) == expected
    assert len(expected) == 2 * IMAGE_TOKENS // 4


def eager_tome_keep(model, reducer, prompt: list[int], layer: int, ratio: float) -> tuple[set[int], dict[int, int]]:
    """ToMe by the book at one layer: the kept slots and the size of each."""
    keys = head_mean_keys(model, hidden_before(model, prompt, layer), layer)
    kept, sizes = set(), {}
    for run in image_runs(reducer, prompt):
        tokens = [{"slot": i, "size": 1.0, "key": keys[i]} for i in run]
        excess = math.floor(len(run) * ratio)
        while excess > 0 and len(tokens) > 1:
            side_a, side_b = tokens[0::2], tokens[1::2]
            edges = []
            for a, token in enumerate(side_a):
                similarities = [cosine(token["key"], other["key"]) for other in side_b]
                best = max(range(len(side_b)), key=lambda b: (similarities[b], -b))
                edges.append((similarities[best], a, best))
            chosen = sorted(edges, key=lambda e: (-e[0], e[1]))[: min(excess, len(side_a))]
            incoming = {b: [side_a[a] for _, a, bb in chosen if bb == b] for _, _, b in chosen}
            for b, sources in incoming.items():
                group = [side_b[b], *sources]
                total = sum(t["size"] for t in group)
                side_b[b]["key"] = sum(t["key"] * t["size"] for t in group) / total
                side_b[b]["size"] = total
            gone = {id(side_a[a]) for _, a, _ in chosen}
            tokens = [t for t in tokens if id(t) not in gone]
            excess -= len(chosen)
        kept |= {t["slot"] for t in tokens}
        sizes |= {t["slot"]: round(t["size"]) for t in tokens}
    return kept, sizes


@pytest.mark.parametrize("ratio", [0.25, 0.6])  # one matching round; two rounds (38 > 32 A tokens)
def test_tome_merges_what_a_naive_bipartite_reference_merges(toy_model, ratio):
    (prompt,) = image_prompts(toy_model, 1, images_per_prompt=(2,))
    reducer = attach_reducer(toy_model, f"tome:layers=1,ratio={ratio}")
    cache = toy_model.new_kv_cache()
    with torch.no_grad():
        toy_model(torch.tensor([prompt]), kv_cache=cache)
        expected, sizes = eager_tome_keep(toy_model, reducer, prompt, 1, ratio)
    assert kept_visual(reducer, prompt) == expected
    assert len(expected) == 2 * (IMAGE_TOKENS - math.floor(IMAGE_TOKENS * ratio))
    # proportional attention: the cache after the merge holds log(size) of each kept slot
    assert cache.layers[0].key_bias is None
    kept = reducer.stages[0].keep[0].nonzero()[:, 0].tolist()
    cached_sizes = cache.layers[1].key_bias[0, : cache.layers[1].length].exp().round().tolist()
    assert {slot: size for slot, size in zip(kept, cached_sizes, strict=True) if slot in sizes} == sizes
    assert sum(cached_sizes) == len(prompt)


def eager_prellm(model, reducer, prompt: list[int], ratio: float, contextual: float) -> tuple[set[int], dict]:
    """VisionZip by the book on the embeddings: the kept slots and each contextual target's group."""
    backbone = model.model
    embeddings = backbone.embed_tokens(torch.tensor([prompt]))
    attention = backbone.layers[0].self_attn
    rope = backbone.rotary_emb(torch.arange(len(prompt))[None], embeddings.dtype)
    q, k, _ = attention.project(backbone.layers[0].input_layernorm(embeddings), rope)
    k = k.repeat_interleave(attention.num_heads // attention.num_kv_heads, dim=1)
    keys = head_mean_keys(model, embeddings[0], 0)
    kept, groups = set(), {}
    for run in image_runs(reducer, prompt):
        block = q[0][:, run] @ k[0][:, run].transpose(-1, -2) / math.sqrt(attention.head_dim)
        received = torch.softmax(block, dim=-1).mean(dim=0).mean(dim=0)  # over heads, then queries
        budget = len(run) - math.floor(len(run) * ratio)
        count = max(1, math.floor(budget * contextual))
        dominant = [run[i] for i in by_score(range(len(run)), received)[: budget - count]]
        rest = [i for i in run if i not in dominant]
        targets = rest[:: max(1, len(rest) // count)][:count]
        groups |= {t: [t] for t in targets}
        for i in rest:
            if i not in targets:
                similarities = [cosine(keys[i], keys[t]) for t in targets]
                groups[targets[similarities.index(max(similarities))]].append(i)
        kept |= set(dominant) | set(targets)
    return kept, groups


class CaptureEmbeddings(BackboneHook):
    """Keeps the embeddings as the hooks before it left them (the layer loop updates the state in place)."""

    def on_embed(self, state, cache):
        self.hidden, self.source_index = state.hidden.clone(), state.source_index.clone()
        return state


def test_prellm_keeps_and_merges_what_a_naive_visionzip_reference_does(toy_model):
    (prompt,) = image_prompts(toy_model, 1, images_per_prompt=(2,))
    reducer = attach_reducer(toy_model, "prellm:ratio=0.75,contextual=0.25")
    capture = toy_model.attach_hook(CaptureEmbeddings())
    with torch.no_grad():
        toy_model(torch.tensor([prompt]))
        expected, groups = eager_prellm(toy_model, reducer, prompt, 0.75, 0.25)
        embeddings = toy_model.model.embed_tokens(torch.tensor(prompt))
    assert kept_visual(reducer, prompt) == expected
    assert len(expected) == 2 * (IMAGE_TOKENS // 4) and len(groups) == 2 * 4
    slot_of = {int(s): i for i, s in enumerate(capture.source_index[0])}
    for target, members in groups.items():
        torch.testing.assert_close(capture.hidden[0, slot_of[target]], embeddings[members].mean(dim=0))


# ---------------------------------------------------------------- proportional attention in the backbone


class Duplicate(BackboneHook):
    """In a prefill, token `slot` appears `copies` times (same embedding, same position)."""

    def __init__(self, slot: int, copies: int) -> None:
        super().__init__()
        self.slot, self.copies = slot, copies

    def on_embed(self, state, cache):
        t = state.hidden.shape[1]
        if t == 1:
            return state
        index = list(range(self.slot)) + [self.slot] * self.copies + list(range(self.slot + 1, t))
        return state.select(torch.tensor([index]))


class Bias(BackboneHook):
    """In a prefill, token `slot` carries key bias log(`copies`)."""

    def __init__(self, slot: int, copies: int) -> None:
        super().__init__()
        self.slot, self.copies = slot, copies

    def on_embed(self, state, cache):
        if state.hidden.shape[1] > 1:
            state.key_bias = torch.zeros(state.hidden.shape[:2])
            state.key_bias[:, self.slot] = math.log(self.copies)
        return state


def test_a_key_bias_of_log_s_attends_like_s_copies_of_the_key_in_prefill_and_decode():
    """Proportional attention: with one layer, s identical copies of a key (and value) and one key
    with bias log s give every later query the same output, in the prefill and from the KV cache."""
    torch.manual_seed(0)
    config = ModelConfig.from_yaml(REPO / "configs" / "model" / "tiny.yaml", ["vocab_size=256", "num_hidden_layers=1"])
    model = CausalLM(config).eval()
    prompt = torch.randint(0, 256, (1, 8))
    outputs = {}
    for hook in (Duplicate(slot=3, copies=3), Bias(slot=3, copies=3), None):
        if hook is not None:
            model.attach_hook(hook)
        cache = model.new_kv_cache()
        with torch.no_grad():
            prefill = model(prompt, kv_cache=cache).logits[0]
            decode = model(torch.tensor([[7]]), kv_cache=cache).logits[0, -1]
        outputs[type(hook).__name__] = (prefill, decode)
        if hook is not None:
            model.detach_hook(hook)
    (copies, copies_decode), (biased, biased_decode), (_, plain_decode) = outputs.values()
    torch.testing.assert_close(copies[[0, 1, 2, 5, 6, 7, 8, 9]], biased)
    torch.testing.assert_close(copies_decode, biased_decode)
    assert not torch.allclose(biased_decode, plain_decode)


def test_selecting_and_inserting_tokens_carry_the_key_bias():
    from mmllm.model.hooks import InsertTokens

    positions = torch.arange(4)[None]
    ids = torch.tensor([[5, 9, 6, 7]])
    bias = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    state = TokenState(torch.zeros(1, 4, 2), positions, ids, None, None, positions, bias)
    assert state.select(torch.tensor([[3, 1]])).key_bias.tolist() == [[3.0, 1.0]]
    inserted = InsertTokens(after_id=9, num_tokens=2, hidden_size=2).on_embed(state, None)
    assert inserted.key_bias.tolist() == [[0.0, 1.0, 0.0, 0.0, 2.0, 3.0]]


# ---------------------------------------------------------------- every reducer under LoRA


@pytest.mark.parametrize("name", sorted(set(registry()) - LEARNED))
def test_every_training_free_reducer_works_with_a_lora_adapter(toy_model, name):
    import peft

    prompts = image_prompts(toy_model, 2, images_per_prompt=(1, 2))
    wrapped = peft.get_peft_model(
        toy_model, peft.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    base = wrapped.get_base_model()
    reducer = attach_reducer(base, name + TOY_OPTIONS.get(name, ""))
    ids = torch.tensor(prompts[:1])
    with torch.no_grad():
        adapted = wrapped(ids).logits[:, -1]
        with wrapped.disable_adapter():
            plain = wrapped(ids).logits[:, -1]
    assert not torch.allclose(adapted, plain)
    lengths = cache_lengths(wrapped, prompts[0])
    assert lengths[-1] < len(prompts[0]) and reducer.stages
    outputs = Generator(base).generate(prompts, GenerationConfig(max_new_tokens=4, stop_ids=()))
    assert [len(o.ids) for o in outputs] == [4, 4]
