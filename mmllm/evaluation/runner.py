"""`mmllm eval`: score a model on registered tasks and write results.json.

    mmllm eval --model DIR [--adapter DIR] --tasks toy-caption,toy-draw --out results.json [--limit N]
    mmllm eval --model DIR --tasks toy-prosqa,toy-arith,toy-visual-count --latent coconut:steps=6
    mmllm eval --model DIR --tasks vqav2,pope --data vqav2=/data/vqav2 --data pope=/data/pope

For each task the runner makes the task's held-out items, encodes their prompts (media through
the model's tokenizers), generates the replies in batches with the same `Generator` that chat
and serve use, decodes them to text and media, and lets the task score each one. Beside the
model it scores two reference rows, as every eval report must show:

* chance: the task's majority answer or a random valid output, scored by the same scorer;
* untrained: a random-initialised model of the same config, layout and tokenizers, run through
  the same pipeline (so a score is read against what the pipeline gives for free).

Everything that can be refused is refused before inference starts: an unknown task, a model
without the modality a task reads or writes, an encode-only tokenizer asked to generate, a
limit below 1, what the reasoning mode cannot run (reasoning.py), and a standard benchmark
(`mmllm.evaluation.benchmarks`) without its `--data`, or whose files are missing or laid out
wrongly. A benchmark's malformed rows are skipped, and counted in its entry ("skipped").
results.json records per-task metrics and per-sample outputs, the checkpoint's hash, package
versions, seed and command line, and efficiency (prefill latency, decode tokens/s, peak
memory); a few generated media per task are saved beside it.

The reasoning puzzles (`toy-prosqa`, `toy-arith`, `toy-visual-count`) are answered in the
settings' reasoning mode (`--latent`: chain of thought, no CoT, pause tokens or Coconut's
continuous thoughts) and also score `generated_tokens` per sample; their answers are text, so no
guidance applies to them. The untrained reference of a Coconut run gets an untrained head.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import random
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mmllm.chat_template import encode_document
from mmllm.errors import InputError, LayoutError
from mmllm.evaluation.reasoning import ReasoningMode, check_mode, mode_generator, reason, with_fresh_head
from mmllm.evaluation.tasks import EvalItem, Task, get_task, prompt_text, read_prompt_media, reply_description
from mmllm.generation import GenerationConfig, Generator, Guidance, Prompt, decode_replies, encode_prompts
from mmllm.generation.media_files import save_reply_media
from mmllm.generation.sampling import SamplingParams
from mmllm.model.loss import IGNORE_INDEX
from mmllm.model.mmllm import MMLLM

RESULTS_FORMAT = "mmllm.eval_results"
PACKAGES = ("torch", "transformers", "deepspeed", "peft", "numpy", "safetensors")
SKIPPED_REASONS = 10  # reasons of skipped benchmark rows kept in results.json: enough to see the pattern


@dataclass
class EvalSettings:
    tasks: list[str]
    limit: int | None = None  # items per task; None: the task's default
    default_items: int = 500  # TOYWORLD.md: at least 500 held-out items per task
    seed: int = 0
    batch_size: int = 32
    guidance: dict[str, float] = field(default_factory=dict)  # CFG scale per generated modality
    sampling: SamplingParams = field(default_factory=SamplingParams)  # greedy: scores are reproducible
    # per generated modality, over `sampling`; a sampled reply is still reproducible (seeded per batch)
    sampling_by_modality: dict[str, SamplingParams] = field(default_factory=dict)
    untrained: bool = True  # also score a random-init model of the same config (the reference row)
    latent: ReasoningMode | None = None  # how the reasoning puzzles are answered (None: plain decoding)
    media_per_task: int = 16  # generated media files saved per task (all samples' text is kept)
    progress: bool = True
    data: dict[str, Path] = field(default_factory=dict)  # benchmark task -> its files (--data NAME=PATH)
    command: list[str] = field(default_factory=lambda: list(sys.argv))  # the command line, for provenance


def resolve_tasks(names: Sequence[str], limit: int | None, data: dict[str, Path] | None = None) -> list[Task]:
    """The named tasks, benchmarks with their files read; a one-line error for an unknown task, a limit below 1,
    a benchmark without its --data, or a missing file or wrong layout (no model needed)."""
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    if not names:
        raise InputError("no tasks given (see `mmllm eval --list`)")
    data = data or {}
    for name in data:
        if name not in names:
            raise InputError(f"--data {name}=...: {name} is not among the tasks ({', '.join(names)})")
    tasks = []
    for task in (get_task(name) for name in names):
        if task.needs_data and task.name not in data:
            raise InputError(f"task {task.name} reads local files: pass --data {task.name}=PATH")
        if task.name in data:
            task = task.with_data(Path(data[task.name]))
        tasks.append(task)
    return tasks


def check_tasks(
    model: MMLLM, names: Sequence[str], limit: int | None, data: dict[str, Path] | None = None
) -> list[Task]:
    """The tasks, or a one-line error for the first thing that would fail after inference began."""
    return check_model(model, resolve_tasks(names, limit, data))


def check_model(model: MMLLM, tasks: list[Task]) -> list[Task]:
    """`tasks`, or a one-line error when the model cannot read or write what one of them needs."""
    if model.layout is None:
        raise LayoutError("the model has no vocab layout; eval needs one (vocab_layout.json)")
    for task in tasks:
        for modality in (*task.input_modalities, *task.output_modalities):
            if modality not in model.layout.modalities or modality not in model.modality_tokenizers:
                raise InputError(f"task {task.name} needs {modality}, but the model has no {modality} tokenizer")
        for modality in task.output_modalities:
            tokenizer = model.modality_tokenizers[modality]
            if not tokenizer.can_decode:
                raise InputError(
                    f"task {task.name} generates {modality}, but the model's {modality} tokenizer "
                    f"'{tokenizer.name}' is encode-only"
                )
    return tasks


def evaluate(
    model: MMLLM, settings: EvalSettings, out: Path, model_path: str | None = None, tasks: list[Task] | None = None
) -> dict[str, Any]:
    """Run every task; write `out` (results.json) and media beside it; return the results. `tasks` are
    `settings.tasks` already resolved (`resolve_tasks`), so that benchmark files are read once."""
    tasks = check_model(model, tasks or resolve_tasks(settings.tasks, settings.limit, settings.data))
    if settings.latent is not None:
        check_mode(model, tasks, settings.latent)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    untrained = _untrained_twin(model, settings.seed) if settings.untrained else None
    if untrained is not None:
        with_fresh_head(untrained, model)
    results: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        "model": _model_info(model, model_path),
        "seed": settings.seed,
        "command": settings.command,
        "versions": _versions(),
        "settings": {
            "limit": settings.limit,
            "batch_size": settings.batch_size,
            "guidance": settings.guidance,
            "sampling": settings.sampling.__dict__,
            "sampling_by_modality": {name: params.__dict__ for name, params in settings.sampling_by_modality.items()},
            "latent": settings.latent.label if settings.latent is not None else None,
            "data": {name: str(path) for name, path in settings.data.items()},
        },
        "tasks": {},
    }
    totals = _Efficiency()
    for task in tasks:
        n = settings.limit or task.size or settings.default_items
        items = task.items(n, settings.seed)
        runner = _TaskRunner(task, items, settings, out.parent)
        entry = runner.run(model, totals)
        entry["references"] = {"chance": runner.chance(model)}
        if untrained is not None:
            entry["references"]["untrained"] = runner.reference(untrained)
        results["tasks"][task.name] = entry
        _print_row(task, entry)
    results["efficiency"] = totals.summary()
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(_finite(results), indent=2) + "\n", encoding="utf-8")
    tmp.replace(out)
    return results


class _Efficiency:
    """Prefill latency, decode throughput and peak memory over the runs it is given."""

    def __init__(self) -> None:
        self.prefill: list[float] = []
        self.decode_seconds = 0.0
        self.decode_tokens = 0

    def add(self, generator: Generator) -> None:
        self.prefill.append(generator.stats.prefill_seconds)
        self.decode_seconds += generator.stats.decode_seconds
        self.decode_tokens += generator.stats.decode_tokens

    def merge(self, other: _Efficiency) -> None:
        self.prefill += other.prefill
        self.decode_seconds += other.decode_seconds
        self.decode_tokens += other.decode_tokens

    def summary(self) -> dict[str, float]:
        return {
            "prefill_latency_ms": 1000 * float(np.median(self.prefill)) if self.prefill else 0.0,
            "decode_tokens_per_s": self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0,
            "decode_tokens": self.decode_tokens,
            "peak_memory_mb": _peak_memory_mb(),
        }


class _TaskRunner:
    def __init__(self, task: Task, items: list[EvalItem], settings: EvalSettings, root: Path) -> None:
        self.task, self.items, self.settings, self.root = task, items, settings, root

    def run(self, model: MMLLM, totals: _Efficiency) -> dict[str, Any]:
        efficiency = _Efficiency()
        if self.task.kind == "perplexity":
            scores = self._perplexity(model, efficiency)
            replies: list[list] = [[] for _ in self.items]
        else:
            replies, tokens = self._generate(model, efficiency, desc=self.task.name)
            scores = self._score(replies, tokens)
        totals.merge(efficiency)
        samples = []
        for i, (item, reply, score) in enumerate(zip(self.items, replies, scores, strict=True)):
            media = self._save_media(item, reply) if i < self.settings.media_per_task else []
            samples.append(
                {
                    "id": item.id,
                    "prompt": prompt_text(item),
                    "reference": item.reference,
                    "output": reply_description(reply),
                    "media": media,
                    "scores": score,
                }
            )
        entry = {"mode": self._mode_label()} if self.task.reasoning else {}
        if self.task.needs_data:
            entry |= {"skipped": len(self.task.skipped), "skipped_reasons": list(self.task.skipped[:SKIPPED_REASONS])}
        return {
            **entry,
            "metric": self.task.metric,
            "higher_is_better": self.task.higher_is_better,
            "n": len(self.items),
            "metrics": self.task.aggregate(scores),
            "samples": samples,
            "efficiency": efficiency.summary(),
        }

    def chance(self, model: MMLLM) -> dict[str, float]:
        if self.task.kind == "perplexity":
            return {self.task.metric: self.task.chance_perplexity(model.layout.text_size)}
        rng = random.Random(f"chance/{self.task.name}/{self.settings.seed}")
        return self.task.aggregate([self.task.score(item, self.task.chance_reply(item, rng)) for item in self.items])

    def reference(self, model: MMLLM) -> dict[str, float]:
        """The aggregate metrics of another model (the untrained twin) on the same items."""
        if self.task.kind == "perplexity":
            return self.task.aggregate(self._perplexity(model, _Efficiency()))
        replies, tokens = self._generate(model, _Efficiency(), desc=f"{self.task.name} (untrained)")
        return self.task.aggregate(self._score(replies, tokens))

    def _mode_label(self) -> str:
        return self.settings.latent.label if self.settings.latent is not None else "cot"

    def _score(self, replies: list[list], tokens: list[int]) -> list[dict[str, float]]:
        """Each reply scored by the task; a puzzle's score also holds the tokens its answer cost."""
        scores = [self.task.score(item, reply) for item, reply in zip(self.items, replies, strict=True)]
        if self.task.reasoning:
            scores = [{**score, "generated_tokens": float(n)} for score, n in zip(scores, tokens, strict=True)]
        return scores

    def _generate(self, model: MMLLM, efficiency: _Efficiency, desc: str) -> tuple[list[list], list[int]]:
        """The decoded replies, and the tokens each cost (for a puzzle, counted in its reasoning mode)."""
        generator = mode_generator(model, self.settings.latent) if self.task.reasoning else Generator(model)
        scales = {} if self.task.reasoning else self.settings.guidance  # a puzzle's answer is text
        guidance = Guidance({m: s for m, s in scales.items() if m in generator.generatable})
        replies: list[list] = []
        tokens: list[int] = []
        batch = self.settings.batch_size
        with tqdm(total=len(self.items), desc=desc, unit="item", disable=not self.settings.progress) as bar:
            for start in range(0, len(self.items), batch):
                chunk = self.items[start : start + batch]
                prompts = encode_prompts(
                    model, [Prompt(read_prompt_media(i), i.prompt_kind, i.reply_modality) for i in chunk]
                )
                config = GenerationConfig(
                    max_new_tokens=max(i.max_new_tokens for i in chunk),
                    default=self.settings.sampling,
                    sampling=self.settings.sampling_by_modality,
                    guidance=guidance,
                    stop_after_span=True,
                    seed=self.settings.seed,
                )
                if self.task.reasoning:
                    outputs, counts = reason(model, generator, [p.ids for p in prompts], config, self.settings.latent)
                else:
                    uncond = [p.unconditional(model.layout) for p in prompts] if guidance.active else None
                    outputs = generator.generate([p.ids for p in prompts], config, uncond)
                    counts = [len(o.ids) for o in outputs]
                efficiency.add(generator)
                replies += decode_replies(model, [p.reply(o.ids) for p, o in zip(prompts, outputs, strict=True)])
                tokens += counts
                bar.update(len(chunk))
        return replies, tokens

    def _perplexity(self, model: MMLLM, efficiency: _Efficiency) -> list[dict[str, float]]:
        """Summed next-token NLL (nats) and token count of each item's document."""
        documents = [encode_document(i.prompt, model.layout, model.text_tokenizer).input_ids for i in self.items]
        device = model.lm_head.weight.device
        scores = []
        batch = self.settings.batch_size
        for start in range(0, len(documents), batch):
            chunk = documents[start : start + batch]
            length = max(len(d) for d in chunk)
            ids = torch.full((len(chunk), length), model.layout.pad_id, dtype=torch.long)
            labels = torch.full_like(ids, IGNORE_INDEX)
            for row, doc in enumerate(chunk):
                ids[row, : len(doc)] = torch.tensor(doc)
                labels[row, : len(doc)] = torch.tensor(doc)
            began = time.perf_counter()
            with torch.no_grad():
                logits = model(ids.to(device), attention_mask=(labels != IGNORE_INDEX).long().to(device)).logits
            efficiency.prefill.append(time.perf_counter() - began)
            targets = labels[:, 1:].to(device)
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), targets.clamp(min=0), reduction="none"
            )
            nll = nll.masked_fill(targets == IGNORE_INDEX, 0.0)
            counts = (targets != IGNORE_INDEX).sum(dim=1)
            scores += [{"nll": float(n), "tokens": float(c)} for n, c in zip(nll.sum(dim=1), counts, strict=True)]
        return scores

    def _save_media(self, item: EvalItem, reply: list) -> list[str]:
        """Write the reply's media under media/<task>/; returns paths relative to the results folder."""
        saved = save_reply_media(reply, self.root / "media" / self.task.name, item.id)
        return [path.relative_to(self.root).as_posix() for path in saved]


def _untrained_twin(model: MMLLM, seed: int) -> MMLLM:
    """A random-init model with the same config, layout and tokenizers (the "untrained" row)."""
    torch.manual_seed(seed)
    device = model.lm_head.weight.device
    twin = MMLLM.from_config(model.config, model.layout, model.text_tokenizer, model.modality_tokenizers)
    return twin.to(device=device, dtype=model.lm_head.weight.dtype).eval()


def _model_info(model: MMLLM, path: str | None) -> dict[str, Any]:
    return {
        "path": path,
        "hash": checkpoint_hash(Path(path)) if path else None,
        "parameters": model.config.num_parameters(),
        "layers": model.config.num_hidden_layers,
        "modalities": sorted(model.modality_tokenizers),
    }


def checkpoint_hash(path: Path) -> str:
    """sha256 over the checkpoint's weight files and vocab layout, in name order."""
    digest = hashlib.sha256()
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("vocab_layout.json"))
    for file in files:
        digest.update(file.name.encode())
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("mmllm", *PACKAGES):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _finite(value: Any) -> Any:
    """`value` as strict JSON: numpy scalars as numbers, NaN and infinities as null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _print_row(task: Task, entry: dict[str, Any]) -> None:
    value = entry["metrics"].get(task.metric)
    refs = ", ".join(f"{name} {ref.get(task.metric, float('nan')):.4g}" for name, ref in entry["references"].items())
    tokens = entry["metrics"].get("generated_tokens")
    spent = f"; {tokens:.1f} tokens per answer ({entry['mode']})" if tokens is not None else ""
    skipped = f"; {entry['skipped']} malformed rows skipped" if entry.get("skipped") else ""
    print(f"[eval] {task.name}: {task.metric} {value:.4g} ({refs}){spent}; n={entry['n']}{skipped}", flush=True)
