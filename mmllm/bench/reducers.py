"""`mmllm bench reducers`: what each visual-token reducer buys in wall-clock and costs in accuracy.

Every row comes from one run on the same held-out items of one task (toy-vqa-multi by default:
four two-shape images, 256 image tokens, and an attribute, relation or counting question):

* accuracy over all items, greedy, with its change against the unreduced model and McNemar's
  exact test on the paired right/wrong outcomes (a change is real when p is small);
* analytic prefill FLOPs per item, from the tokens each layer actually processed (a census hook
  after the reducer counts them): 2 FLOPs per weight per token, plus causal attention's
  QK^T and AV over the keys each query sees; the reducers' own scoring is left out;
* measured prefill wall-clock on the first `timing_batches` batches: the median of interleaved
  repeats per batch (`bench.timing.interleaved`), summed, as a ratio to the unreduced model;
* a "no image tokens" reference row: every image token removed before the LLM, so the
  accuracy columns can be read against what the model answers without looking;
* the **ideal slice** of each row: the same model cutting exactly the same tokens at the same
  layers with no scoring, similarity or merging computed (`IdealSlice`). A method's wall-clock
  ratio should be within 0.05 of its ideal's; more means its bookkeeping eats the saving;
* decode tokens/s after the reduced prefill, and the KV-cache memory the prefill left.

Spec per row: a method with a `ratio` knob runs at each `--ratios` value, and one with a `layer`
knob acts before `--layer`; a method without them (registers, matryoshka) runs once with its
own configuration. A learned method runs on the checkpoint trained for it (`method_models`,
e.g. registers on the model finetuned with them; it must have the same architecture), measured
against the same unreduced model. A method a model cannot run (e.g. registers it was not trained
with) is reported as skipped, with the reason.
"""

from __future__ import annotations

import functools
import inspect
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmllm.bench.timing import interleaved
from mmllm.errors import ConfigError, InputError
from mmllm.evaluation.tasks import get_task
from mmllm.generation import GenerationConfig, Generator, Prompt, decode_replies, encode_prompts
from mmllm.model.backbone import BackboneHook, KVCache, TokenState
from mmllm.model.mmllm import MMLLM
from mmllm.model.reducers import attach_reducer
from mmllm.model.reducers.base import VISUAL_MODALITIES, TokenReducer, build_reducer, keep_tokens, registry

HONEST_GAP = 0.05  # the bound: a method's wall-clock ratio within 0.05 of its ideal slice's
# The targets: (fraction removed, before which layer (0: before the LLM), prefill
# wall-clock bound as a ratio to the unreduced model, accuracy points the row may lose)
TARGETS = (
    (0.5, 2, 0.75, 1.0),
    (0.89, 2, 0.5, 5.0),
    (0.89, 0, 0.35, 5.0),
)


@dataclass
class Contender:
    label: str
    spec: str | None  # None: the unreduced model
    method: str = ""
    ratio: float | None = None
    layer: int | None = None
    model: MMLLM | None = None  # the checkpoint it runs on
    skipped: str = ""  # why the model cannot run it
    stages: list = field(default_factory=list)  # per timing batch: the reducer's recorded cuts
    census: list[list[int]] = field(default_factory=list)  # per item: valid tokens entering each layer


def contenders_for(
    model: MMLLM, methods: list[str], ratios: list[float], layer: int, method_models: dict[str, MMLLM]
) -> list[Contender]:
    """The baseline and one row per (method, ratio); a one-line error for an unknown method or bad ratio."""
    reducers = registry()
    rows = [
        Contender("none", None, model=model),
        Contender("no image tokens", WithoutImages.name, layer=0, model=model),
    ]
    for name in methods:
        if name not in reducers:
            raise ConfigError(f"unknown reducer {name!r} (reducers: {', '.join(sorted(reducers))})")
        knobs = inspect.signature(reducers[name].__init__).parameters
        at = layer if "layer" in knobs else (0 if name in ("prellm", "matryoshka") else None)
        runs_on = method_models.get(name, model)
        if runs_on.config != model.config:
            raise ConfigError(f"the model given for {name} has another architecture than the benchmarked model")
        if "ratio" not in knobs:
            rows.append(Contender(name, name, name, None, at, model=runs_on))
            continue
        for ratio in ratios:
            options = [f"ratio={ratio}"] + ([f"layer={layer}"] if "layer" in knobs else [])
            spec = f"{name}:{','.join(options)}"
            build_reducer(spec, model)  # bad ratios and layers fail here, before any timing
            rows.append(Contender(f"{name} {ratio:g}", spec, name, ratio, at, model=runs_on))
    return rows


class _Census(BackboneHook):
    """Counts the real tokens entering each layer of a prefill (attached after the reducer)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: list[list[int]] = []  # per layer: per row

    def on_embed(self, state: TokenState, cache: KVCache | None) -> TokenState:
        if state.hidden.shape[1] > 1:
            self.counts = [self._valid(state)]
        return state

    def on_layer_end(self, layer_idx: int, state: TokenState, cache: KVCache | None) -> TokenState:
        if state.hidden.shape[1] > 1:
            self.counts.append(self._valid(state))
        return state

    @staticmethod
    def _valid(state: TokenState) -> list[int]:
        b, t = state.hidden.shape[:2]
        return [t] * b if state.valid is None else state.valid.sum(dim=1).tolist()


class WithoutImages(TokenReducer):
    """The reference row: every image and video token removed before the LLM."""

    name = "no-image"

    def before_llm(self, state: TokenState, cache: KVCache | None) -> TokenState:
        if state.hidden.shape[1] == 1:
            return state
        keep = ~self.visual(state)
        self.kept_counts = [0] * keep.shape[0]
        self.record(0, keep)
        return keep_tokens(state, keep)


def prefill_flops(model: MMLLM, tokens_per_layer: list[int]) -> float:
    """Analytic FLOPs of one prompt's prefill: `tokens_per_layer[l]` real tokens enter layer l."""
    c = model.config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    layer_weights = c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
    flops = 2.0 * c.hidden_size * c.vocab_size  # the LM head, for the last token only
    for t in tokens_per_layer[: c.num_hidden_layers]:
        flops += 2.0 * layer_weights * t + 4.0 * q * t * (t + 1) / 2  # QK^T and AV over a causal triangle
    return flops


def mcnemar_p(baseline: list[float], other: list[float]) -> float:
    """Two-sided exact McNemar test on paired 0/1 outcomes: the binomial tail of the discordant pairs."""
    only_base = sum(1 for a, b in zip(baseline, other, strict=True) if a > b)
    only_other = sum(1 for a, b in zip(baseline, other, strict=True) if b > a)
    n = only_base + only_other
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_base, only_other) + 1)) / 2**n
    return min(1.0, 2 * tail)


class _Batches:
    """The items' prompts, encoded once and left-padded per batch as the generator pads them."""

    def __init__(self, model: MMLLM, items: list, batch_size: int) -> None:
        self.model = model
        self.items = items
        self.encoded = encode_prompts(model, [Prompt(i.prompt, i.prompt_kind, i.reply_modality) for i in items])
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.items) / self.batch_size)

    def rows(self, index: int) -> range:
        return range(index * self.batch_size, min(len(self.items), (index + 1) * self.batch_size))

    def padded(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [self.encoded[i].ids for i in self.rows(index)]
        width = max(len(p) for p in ids)
        pad = self.model.layout.pad_id
        tokens = torch.tensor([[pad] * (width - len(p)) + p for p in ids])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
        return tokens, mask


def _attached(model: MMLLM, hooks: list[BackboneHook], run: Callable[[], Any]) -> Any:
    for hook in hooks:
        model.attach_hook(hook)
    try:
        return run()
    finally:
        for hook in hooks:
            model.detach_hook(hook)


def _prefill(model: MMLLM, tokens: torch.Tensor, mask: torch.Tensor) -> KVCache:
    cache = model.new_kv_cache()
    with torch.inference_mode():
        model(tokens, attention_mask=mask, kv_cache=cache, logits_to_keep=1)
    return cache


def _kv_bytes(model: MMLLM, cache: KVCache) -> float:
    """Bytes of the real (valid) cached keys and values, per row."""
    c = model.config
    per_slot = 2 * c.num_key_value_heads * c.head_dim * model.lm_head.weight.element_size()
    slots = sum(int(layer.valid[:, : layer.length].sum()) for layer in cache.layers)
    return per_slot * slots / cache.layers[0].keys.shape[0]


def _decode_rate(model: MMLLM, tokens: torch.Tensor, mask: torch.Tensor, steps: int) -> tuple[float, float]:
    """(seconds, tokens) of `steps` greedy decode steps after a prefill of the batch."""
    cache = model.new_kv_cache()
    with torch.inference_mode():
        logits = model(tokens, attention_mask=mask, kv_cache=cache, logits_to_keep=1).logits[:, -1]
        began = time.perf_counter()
        for _ in range(steps):
            logits = model(logits.argmax(dim=-1, keepdim=True), kv_cache=cache).logits[:, -1]
        return time.perf_counter() - began, steps * tokens.shape[0]


def bench_reducers(
    model_dir: Path,
    task: str,
    methods: list[str],
    ratios: list[float],
    layer: int = 2,
    items: int = 500,
    batch_size: int = 8,
    timing_batches: int = 8,
    repeats: int = 3,
    decode_steps: int = 32,
    seed: int = 0,
    method_models: dict[str, Path] | None = None,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    model = MMLLM.from_pretrained(model_dir).eval()
    others = {name: MMLLM.from_pretrained(path).eval() for name, path in (method_models or {}).items()}
    evaluation = get_task(task)
    if "image" not in evaluation.input_modalities and "video" not in evaluation.input_modalities:
        raise InputError(f"task {task} has no image or video input: there is nothing for a reducer to remove")
    if items < 1 or batch_size < 1 or timing_batches < 1 or repeats < 1:
        raise InputError("--items, --batch-size, --timing-batches and --repeats must be >= 1")
    contenders = contenders_for(model, methods, ratios, layer, others)
    held_out = evaluation.items(items, seed)
    batches = _Batches(model, held_out, batch_size)
    timed = range(min(timing_batches, len(batches)))

    scores: dict[str, list[float]] = {}
    for contender in contenders:
        progress(f"[bench reducers] {contender.label}: accuracy on {items} items")
        runs_on = contender.model
        try:
            reducer = runs_on.attach_hook(_reducer(contender)) if contender.spec else None
        except ConfigError as err:
            contender.skipped = str(err)
            progress(f"[bench reducers] {contender.label}: skipped ({err})")
            continue
        census = runs_on.attach_hook(_Census())
        try:
            scores[contender.label] = _accuracy(runs_on, evaluation, batches, seed, census, contender.census)
            for index in timed if reducer is not None else ():
                _prefill(runs_on, *batches.padded(index))  # the cut of exactly the batch the timing runs
                contender.stages.append(list(reducer.stages))
        finally:
            runs_on.detach_hook(census)
            if reducer is not None:
                runs_on.detach_hook(reducer)

    live = [c for c in contenders if not c.skipped]
    prefill = {c.label: 0.0 for c in live}
    ideal = {c.label: 0.0 for c in live if c.spec}
    kv = {c.label: [] for c in live}
    for index in timed:
        progress(f"[bench reducers] timing batch {index + 1}/{len(timed)}")
        tokens, mask = batches.padded(index)
        runs: dict[str, Callable[[], Any]] = {}
        for c in live:
            hooks = _hooks(c)
            runs[c.label] = _runner(c.model, hooks, tokens, mask)
            if hooks:
                runs[f"{c.label} ideal"] = _runner(c.model, [hooks[0].ideal_slice(c.stages[index])], tokens, mask)
        timings = interleaved(runs, repeats, warmup=1)
        for c in live:
            prefill[c.label] += timings[c.label].median
            if c.spec is not None:
                ideal[c.label] += timings[f"{c.label} ideal"].median
            kv[c.label].append(_kv_bytes(c.model, runs[c.label]()))

    decode = {}
    for c in live:
        hooks = _hooks(c)
        seconds = count = 0.0
        for index in timed:
            decode_batch = functools.partial(_decode_rate, c.model, *batches.padded(index), decode_steps)
            s, n = _attached(c.model, hooks, decode_batch)
            seconds, count = seconds + s, count + n
        decode[c.label] = count / seconds

    baseline = contenders[0].label
    image_tokens = _visual_per_item(model, batches)
    tokens_in = statistics.fmean(counts[0] for counts in contenders[0].census)
    rows = []
    for c in contenders:
        row: dict[str, Any] = {"label": c.label, "spec": c.spec, "method": c.method, "ratio": c.ratio, "layer": c.layer}
        if c.model is not model:
            row["model"] = c.model.name_or_path
        if c.skipped:
            rows.append({**row, "skipped": c.skipped})
            continue
        accuracy = statistics.fmean(scores[c.label])
        flops = statistics.fmean(prefill_flops(model, counts) for counts in c.census)
        tokens_last = statistics.fmean(counts[-1] for counts in c.census)
        row.update(
            accuracy=accuracy,
            accuracy_delta_points=100 * (accuracy - statistics.fmean(scores[baseline])),
            p_value=mcnemar_p(scores[baseline], scores[c.label]),
            prefill_gflops=flops / 1e9,
            tokens_last_layer=tokens_last,
            image_tokens_removed=(tokens_in - tokens_last) / image_tokens,
            prefill_s=prefill[c.label],
            prefill_ratio=prefill[c.label] / prefill[baseline],
            decode_tokens_per_s=decode[c.label],
            kv_cache_kib=statistics.fmean(kv[c.label]) / 1024,
        )
        if c.spec is not None:
            row["ideal_ratio"] = ideal[c.label] / prefill[baseline]
            row["gap_to_ideal"] = row["prefill_ratio"] - row["ideal_ratio"]
            row["honest"] = row["gap_to_ideal"] <= HONEST_GAP
        row["target"] = _target(c, row)
        rows.append(row)
    return {
        "benchmark": "reducers",
        "model": str(model_dir),
        "layers": model.config.num_hidden_layers,
        "parameters": model.config.num_parameters(),
        "task": task,
        "items": items,
        "batch_size": batch_size,
        "timed_items": sum(len(batches.rows(i)) for i in timed),
        "repeats": repeats,
        "decode_steps": decode_steps,
        "image_tokens_per_item": image_tokens,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "rows": rows,
    }


def _runner(model: MMLLM, hooks: list[BackboneHook], tokens: torch.Tensor, mask: torch.Tensor) -> Callable[[], Any]:
    return lambda: _attached(model, hooks, lambda: _prefill(model, tokens, mask))


def _hooks(contender: Contender) -> list[BackboneHook]:
    """The contender's reducer, built and bound for its model but not attached (none for the baseline)."""
    return [] if contender.spec is None else [_reducer(contender)]


def _reducer(contender: Contender) -> TokenReducer:
    model = contender.model
    if contender.spec == WithoutImages.name:
        return WithoutImages(model.layout, model.config.num_hidden_layers)
    reducer = attach_reducer(model, contender.spec)
    model.detach_hook(reducer)
    return reducer


def _accuracy(
    model: MMLLM, evaluation, batches: _Batches, seed: int, census: _Census, counts: list[list[int]]
) -> list[float]:
    """Per item, the task's own 0/1 score of the greedy reply; the prefill's tokens per layer of
    each item are appended to `counts`."""
    generator = Generator(model)
    outcomes = []
    for index in range(len(batches)):
        rows = batches.rows(index)
        prompts = [batches.encoded[i] for i in rows]
        config = GenerationConfig(
            max_new_tokens=max(batches.items[i].max_new_tokens for i in rows), stop_after_span=True, seed=seed
        )
        outputs = generator.generate([p.ids for p in prompts], config)
        counts += [list(row) for row in zip(*census.counts, strict=True)]
        replies = decode_replies(model, [p.reply(o.ids) for p, o in zip(prompts, outputs, strict=True)])
        for i, reply in zip(rows, replies, strict=True):
            outcomes.append(float(evaluation.score(batches.items[i], reply)[evaluation.metric]))
    return outcomes


def _visual_per_item(model: MMLLM, batches: _Batches) -> float:
    visual = [r for name, r in model.layout.modalities.items() if name in VISUAL_MODALITIES]
    counts = [sum(1 for t in p.ids if any(m.start <= t < m.end for m in visual)) for p in batches.encoded]
    return statistics.fmean(counts)


def _target(c: Contender, row: dict[str, Any]) -> str:
    """Which target of the issue the row answers to, and whether it is met; "" when none applies."""
    if c.ratio is None:
        return ""
    for ratio, layer, wall, points in TARGETS:
        if math.isclose(c.ratio, ratio) and c.layer == layer:
            met = row["prefill_ratio"] <= wall and row["accuracy_delta_points"] >= -points
            return f"{'met' if met else 'missed'} (<= {wall}x, within {points:g} points)"
    return ""


def format_reducer_bench(result: dict[str, Any]) -> str:
    lines = [
        f"reducers on {result['task']}: {result['items']} items ({result['image_tokens_per_item']:.0f} image tokens "
        f"each), {result['layers']}-layer model; wall-clock on {result['timed_items']} items, median of "
        f"{result['repeats']} interleaved repeats, {result['threads']} threads",
        "",
        "| reducer | image tokens removed | prefill GFLOPs | prefill time | ideal slice | decode tok/s | "
        "KV cache KiB | accuracy | change (p) | target |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        if "skipped" in row:
            lines.append(f"| {row['label']} | skipped: {row['skipped']} | | | | | | | | |")
            continue
        ideal = f"{row['ideal_ratio']:.2f}x" if "ideal_ratio" in row else ""
        change = "" if row["spec"] is None else f"{row['accuracy_delta_points']:+.1f} (p={row['p_value']:.2g})"
        lines.append(
            f"| {row['label']} | {100 * row['image_tokens_removed']:.0f}% | {row['prefill_gflops']:.2f} | "
            f"{row['prefill_ratio']:.2f}x | {ideal} | "
            f"{row['decode_tokens_per_s']:.0f} | {row['kv_cache_kib']:.0f} | {100 * row['accuracy']:.1f}% | "
            f"{change} | {row['target']} |"
        )
    return "\n".join(lines)
