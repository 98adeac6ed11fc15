"""`mmllm latent-train`: a reasoning method trained on the toy puzzles; Coconut's curriculum stage by stage.

    mmllm latent-train --config configs/finetune/toy_coconut.yaml [KEY=VALUE ...]
    mmllm eval --model runs/latent/coconut/model --tasks toy-prosqa --latent coconut:steps=4

A config (`LatentTrainConfig`) names the method (`coconut`, `colar`, `mirage`, `assorted`, or a
baseline: `cot`, `no-cot`, `pause`), the toy puzzles it trains on (`puzzles`), where the first stage
starts (`run.finetune.base_model`, a checkpoint, or `from_scratch`, a model YAML built fresh for the
bundle `vocab` into OUT/init/model) and `run`, the finetuning YAML of every stage (the keys of
configs/finetune/toy_full.yaml; `mmllm.training.finetune`). The driver writes the puzzles of the
train split once (OUT/world), then for each stage k:

1. writes them in stage k's format as pretokenized shards (OUT/stage-k/shards, `write_puzzle_shards`);
2. runs a finetune on them into OUT/stage-k, from the first stage's start and from the previous
   stage's model after it: a fresh optimizer and schedule per stage, as Coconut resets its
   optimizer between stages. `ranks: 1` runs it in this process (as `python train/finetune.py`
   does); more ranks go through the DeepSpeed launcher, as the demo's stages;
3. merges a LoRA stage's adapter into OUT/stage-k/model (the head comes along), so every stage
   leaves a self-contained checkpoint for the next.

Coconut runs stages `first_stage` .. `curriculum.final_stage` (curriculum.py): stage 0 is chain of
thought behind an empty latent span, stage k replaces the first k steps by k x c_thought thoughts,
the last replaces them all. CoLaR (`colar`) is one stage: chain of thought inside a latent span, which the
`colar` objective compresses c-fold (colar.py). Mirage (`mirage`) runs stages 1 and 2 of its head
(mirage.py): `latent_steps_mirage` latent visual tokens before the answer, distilled toward the
question's image codes in stage 1, free in stage 2. Token Assorted (`assorted`) first fits the chunk
VQ-VAE on the train traces (OUT/cot_vqvae.safetensors, assorted.py), then runs one stage in which
each puzzle's leading chunks are written as codes. A baseline is one stage. Each stage's dir is rewritten
when it runs. The last stage's model is copied to OUT/model; OUT/summary.json records every stage's
first and last loss (and latent loss: CoLaR's `loss/latent`, Mirage's `loss/distill`), the VQ-VAE's
reconstruction loss, and the `mmllm eval --latent` mode the model answers in (colar: `compression`,
default the head's largest factor, and `latent_steps`, default the longest training trace's slots at
that factor).

The keys the driver sets for every stage (`out`, `steps`, `data.sources`) are refused in `run`, and
so is the Mirage head's `stage`; stage k's seed is `run.seed` + k, so each stage draws its own order
of the same puzzles. Each stage's YAML is checked whole (base model, data, head) before it runs, and
kept as OUT/stage-k/finetune.yaml.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmllm.config import from_dict, load_config
from mmllm.data.interleaved import read_jsonl
from mmllm.errors import ConfigError
from mmllm.model.latent.assorted import CotVQVAE, CotVQVAEConfig, check_codes_fit, train_cot_vqvae
from mmllm.model.latent.base import DEFAULT_MAX_LATENT_STEPS
from mmllm.model.latent.colar import DEFAULT_FACTORS
from mmllm.model.latent.curriculum import CoconutCurriculum
from mmllm.model.latent.formats import Kind, PuzzleFormat, reply_ids, write_puzzle_shards

logger = logging.getLogger(__name__)

REASONING_TASKS = ("toy-prosqa", "toy-arith", "toy-visual-count")  # the toy world's puzzles (TOYWORLD.md)
TRAINING_PUZZLES = (*REASONING_TASKS, "toy-prosqa-drill")  # and toy-prosqa at every difficulty, to train on
HEADED = ("coconut", "colar", "mirage")  # the methods that train a latent head of their name
MIRAGE_STAGES = (1, 2)  # Mirage: distillation toward the image codes, then text-only supervision
VQVAE_FILE = "cot_vqvae.safetensors"  # assorted: the chunk VQ-VAE whose codes the model writes
DRIVER_KEYS = ("out", "steps", "data.sources")  # set by the driver for every stage
SUMMARY_FILE = "summary.json"
LATENT_LOSSES = ("loss/latent", "loss/distill")  # CoLaR's and Mirage's losses beside the token loss


@dataclass
class PuzzleSource:
    tasks: tuple[str, ...] = REASONING_TASKS
    items: int = 1000  # train-split puzzles per task, the same puzzles at every stage
    seed: int = 0  # the toy world's seed (its test split, which eval reads, is another stream)


@dataclass
class AssortedCodes:
    """assorted: the chunk VQ-VAE fitted on the train traces before finetuning (assorted.py)."""

    chunk_len: int = 16  # L: trace tokens per code (the paper's compression rate)
    codebook_size: int = 64  # must fit the layout's latent_codes range
    steps: int = 600  # VQ-VAE optimizer steps (seconds on CPU)
    max_chunks: int | None = None  # the most leading chunks replaced by codes (None: all of them)


@dataclass
class LatentTrainConfig:
    method: Kind = "coconut"  # coconut, colar, mirage, assorted, or a baseline (cot, no-cot, pause)
    pause: int = 0  # pause: filler tokens before the answer
    latent_steps_mirage: int = 4  # mirage: latent visual tokens before the answer, in training and eval
    assorted: AssortedCodes = field(default_factory=AssortedCodes)
    compression: int = 0  # colar: the eval's compression factor c (0: the head's largest)
    latent_steps: int = 0  # colar: the eval's latent steps (0: the longest training trace's slots at c)
    curriculum: CoconutCurriculum = field(default_factory=CoconutCurriculum)
    first_stage: int = 0  # coconut: where the curriculum starts (a later stage continues one)
    steps: int = 100  # optimizer steps of every stage (of the one stage of a baseline)
    puzzles: PuzzleSource = field(default_factory=PuzzleSource)
    out: str = "runs/latent"
    # A model YAML (configs/model/) to start the first stage from a fresh random init built for the
    # tokenizer bundle `vocab`, written to OUT/init/model, instead of run.finetune.base_model.
    from_scratch: str = ""
    vocab: str = ""  # from_scratch: the tokenizer bundle (vocab_layout.json, text_tokenizer/, tokenizers/)
    ranks: int = 1  # 1: each stage in this process; more: through the DeepSpeed launcher
    deepspeed: str = ""  # every stage's DeepSpeed JSON ("": ZeRO-0)
    run: dict[str, Any] = field(default_factory=dict)  # every stage's finetuning YAML, less DRIVER_KEYS

    def check(self) -> None:
        from mmllm.training.finetune import FinetuneRunConfig

        for name in ("steps", "ranks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"latent-train config: {name} must be at least 1, got {getattr(self, name)}")
        if self.puzzles.items < 1:
            raise ConfigError(f"latent-train config: puzzles.items must be at least 1, got {self.puzzles.items}")
        if not self.puzzles.tasks or any(t not in TRAINING_PUZZLES for t in self.puzzles.tasks):
            raise ConfigError(f"latent-train config: puzzles.tasks: name toy puzzles ({', '.join(TRAINING_PUZZLES)})")
        if self.method == "pause" and self.pause < 1:
            raise ConfigError("latent-train config: method pause needs pause >= 1 filler tokens")
        if self.method == "coconut" and not 0 <= self.first_stage <= self.curriculum.final_stage:
            raise ConfigError(
                f"latent-train config: first_stage must be in 0..{self.curriculum.final_stage}, got {self.first_stage}"
            )
        for key in DRIVER_KEYS:
            if _lookup(self.run, key) is not None:
                raise ConfigError(f"latent-train config: remove run.{key}; the driver sets it for every stage")
        base = _lookup(self.run, "finetune.base_model")
        if bool(base) == bool(self.from_scratch):
            raise ConfigError(
                "latent-train config: start the first stage from run.finetune.base_model (a checkpoint) "
                "or from_scratch (a model YAML, with vocab), not both or neither"
            )
        if self.from_scratch and not self.vocab:
            raise ConfigError("latent-train config: from_scratch needs vocab, the tokenizer bundle to build it for")
        if self.from_scratch and not Path(self.from_scratch).is_file():
            raise ConfigError(f"latent-train config: from_scratch {self.from_scratch}: no such model YAML")
        run = copy.deepcopy(self.run)
        run.setdefault("finetune", {})["base_model"] = base or "scratch"  # checked whole per stage, with its path
        settings = from_dict(FinetuneRunConfig, run, "latent-train config: run").finetune  # keys and types
        head = settings.latent_head
        if self.method in HEADED and head.get("kind") != self.method:
            raise ConfigError(
                f"latent-train config: method {self.method} needs run.finetune.latent_head: {{kind: {self.method}}}"
            )
        if self.method not in HEADED and head:
            raise ConfigError(f"latent-train config: method {self.method} has no head; remove run.finetune.latent_head")
        thoughts = self.curriculum.max_latent_stage * self.curriculum.c_thought
        most = head.get("max_latent_steps", DEFAULT_MAX_LATENT_STEPS)
        if self.method == "coconut" and isinstance(most, int) and thoughts > most:
            raise ConfigError(
                f"latent-train config: the curriculum reaches {thoughts} thoughts (max_latent_stage x c_thought), "
                f"more than run.finetune.latent_head.max_latent_steps {most}"
            )
        if self.method == "colar":
            self._check_colar(head)
        if self.method == "mirage" and "stage" in head:
            raise ConfigError("latent-train config: remove run.finetune.latent_head.stage; mirage runs stages 1 and 2")
        if self.method == "mirage" and not 1 <= self.latent_steps_mirage <= most:
            raise ConfigError(
                f"latent-train config: latent_steps_mirage must be in 1..{most} "
                f"(run.finetune.latent_head.max_latent_steps), got {self.latent_steps_mirage}"
            )

    def _check_colar(self, head: dict[str, Any]) -> None:
        factors = head.get("compression_factors", DEFAULT_FACTORS)
        if self.compression and self.compression not in factors:
            raise ConfigError(
                f"latent-train config: compression {self.compression} is not among the head's compression_factors "
                f"{list(factors)}"
            )
        most = head.get("max_latent_steps", DEFAULT_MAX_LATENT_STEPS)
        if not 0 <= self.latent_steps <= most:
            raise ConfigError(
                f"latent-train config: latent_steps must be in 0..{most} (run.finetune.latent_head.max_latent_steps), "
                f"got {self.latent_steps}"
            )

    def colar_factors(self) -> list[int]:
        """colar: the compression factors the head trains with."""
        return sorted(_lookup(self.run, "finetune.latent_head.compression_factors") or DEFAULT_FACTORS)

    def stages(self) -> list[int]:
        if self.method == "coconut":
            return list(range(self.first_stage, self.curriculum.final_stage + 1))
        return list(MIRAGE_STAGES) if self.method == "mirage" else [0]

    def format(self, stage: int, vqvae: CotVQVAE | None = None) -> PuzzleFormat:
        return PuzzleFormat(
            self.method,
            stage=stage,
            pause=self.pause,
            latent_steps=self.latent_steps_mirage if self.method == "mirage" else 0,
            curriculum=self.curriculum,
            vqvae=vqvae,
            max_chunks=self.assorted.max_chunks,
            seed=self.run.get("seed", 0),
        )

    def eval_mode(self, longest_trace: int = 0) -> str:
        """The `mmllm eval --latent` mode the trained model answers in; colar's default steps cover
        `longest_trace` chain-of-thought tokens at its compression factor."""
        if self.method == "coconut":
            return f"coconut:steps={self.curriculum.inference_steps(self.stages()[-1])}"
        if self.method == "mirage":
            return f"mirage:steps={self.latent_steps_mirage}"
        if self.method == "colar":
            compression = self.compression or self.colar_factors()[-1]
            return f"colar:steps={self.latent_steps or max(1, -(-longest_trace // compression))},c={compression}"
        return f"pause:k={self.pause}" if self.method == "pause" else self.method  # cot, no-cot, assorted


def _lookup(data: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


def load_latent_train_config(path: str | Path, overrides=()) -> LatentTrainConfig:
    config = load_config(LatentTrainConfig, path, overrides)
    config.check()
    return config


def train_latent(config: LatentTrainConfig, progress: bool = True) -> dict[str, Any]:
    """Every stage of `config`, each from the one before; returns (and writes) OUT/summary.json."""
    from mmllm.data.toy_tasks import write_toyworld

    out = Path(config.out)
    world = write_toyworld(out / "world", config.puzzles.items, config.puzzles.seed, config.puzzles.tasks)
    records = list(read_jsonl(world["path"]))  # read once, written in every stage's format
    base = _initial_model(config, out) if config.from_scratch else Path(config.run["finetune"]["base_model"])
    bundle = base  # every stage keeps the base model's layout and tokenizers
    longest = _longest_trace(config, records, bundle) if config.method == "colar" else 0
    vqvae, codes = _fit_vqvae(config, records, bundle, out) if config.method == "assorted" else (None, None)
    stages = []
    for stage in config.stages():
        began = time.perf_counter()
        stage_dir = out / f"stage-{stage}"
        shutil.rmtree(stage_dir, ignore_errors=True)
        fmt = config.format(stage, vqvae)
        logger.info("stage %d (%s): finetuning from %s into %s", stage, fmt.kind, base, stage_dir)
        write_puzzle_shards(records, bundle, stage_dir / "shards", fmt, root=out / "world")
        history = _run_stage(config, stage, base, stage_dir, progress)
        stages.append(
            {
                "stage": stage,
                "format": fmt.kind,
                "thoughts": config.curriculum.inference_steps(stage) if fmt.kind == "coconut" else fmt.latent_steps,
                "steps": config.steps,
                **_loss_ends(history),
                "seconds": round(time.perf_counter() - began, 1),
                "model": str(stage_dir / "model"),
            }
        )
        base = stage_dir / "model"
    shutil.rmtree(out / "model", ignore_errors=True)
    shutil.copytree(base, out / "model")
    summary = {
        "method": config.method,
        "model": str(out / "model"),
        "eval": config.eval_mode(longest),
        "stages": stages,
        **({"vqvae": codes} if codes else {}),
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _loss_ends(history: list[dict[str, Any]]) -> dict[str, float]:
    """The first and last logged value of the stage's loss and of each latent loss it logs
    (CoLaR's `loss/latent`, Mirage's `loss/distill`): `first_loss`, `last_loss`, `first_loss/latent`..."""
    ends = {}
    for key in ("loss", *sorted({k for r in history for k in r if k in LATENT_LOSSES})):
        values = [record[key] for record in history if key in record]
        ends[f"first_{key}"], ends[f"last_{key}"] = values[0], values[-1]
    return ends


def _fit_vqvae(
    config: LatentTrainConfig, records: list[dict[str, Any]], bundle: Path, out: Path
) -> tuple[CotVQVAE, dict[str, Any]]:
    """assorted: the chunk VQ-VAE fitted on the train traces, saved as OUT/cot_vqvae.safetensors,
    and its reconstruction loss at the start and the end (the loss of Token Assorted's codes)."""
    from mmllm.data.pretokenize import TokenizerBundle

    tokenizers = TokenizerBundle.load(bundle)
    options = config.assorted
    vq_config = CotVQVAEConfig(
        text_vocab_size=len(tokenizers.text_tokenizer),
        chunk_len=options.chunk_len,
        quantizer={"kind": "vq", "codebook_size": options.codebook_size},
    )
    vqvae, history = train_cot_vqvae(
        records, tokenizers.text_tokenizer, vq_config, steps=options.steps, seed=config.run.get("seed", 0)
    )
    check_codes_fit(tokenizers.layout, vqvae)
    out.mkdir(parents=True, exist_ok=True)
    vqvae.save(out / VQVAE_FILE)
    window = max(1, len(history) // 20)  # a twentieth of the run: the ends are means, not single batches
    first, last = sum(history[:window]) / window, sum(history[-window:]) / window
    return vqvae, {"path": str(out / VQVAE_FILE), "steps": options.steps, "first_loss": first, "last_loss": last}


def _initial_model(config: LatentTrainConfig, out: Path) -> Path:
    """from_scratch: a random-init model of `config.from_scratch` for the bundle `config.vocab`,
    seeded by run.seed, saved to OUT/init/model for the first stage to finetune."""
    import torch

    from mmllm.data.pretokenize import TokenizerBundle
    from mmllm.model.config import ModelConfig
    from mmllm.model.mmllm import MMLLM

    bundle = TokenizerBundle.load(config.vocab)
    torch.manual_seed(config.run.get("seed", 0))
    model = MMLLM.from_config(ModelConfig.from_yaml(config.from_scratch), bundle.layout, bundle.text_tokenizer)
    for name, tokenizer in bundle.modality_tokenizers.items():
        model.set_modality_tokenizer(name, tokenizer)
    path = out / "init" / "model"
    model.save_pretrained(path)
    logger.info("from scratch: a fresh %s for %s in %s", config.from_scratch, config.vocab, path)
    return path


def _longest_trace(config: LatentTrainConfig, records: list[dict[str, Any]], bundle: Path) -> int:
    """colar: the most chain-of-thought tokens of a record's span; refused before training when its
    slots at the smallest factor exceed the head's max_latent_steps (the objective would fail mid-run)."""
    from mmllm.data.pretokenize import TokenizerBundle

    tokenizers = TokenizerBundle.load(bundle)
    fmt = config.format(0)
    longest = max(reply_ids(r["meta"], fmt, tokenizers.layout, tokenizers.text_tokenizer)[1] - 2 for r in records)
    smallest = config.colar_factors()[0]
    most = _lookup(config.run, "finetune.latent_head.max_latent_steps") or DEFAULT_MAX_LATENT_STEPS
    slots = -(-longest // smallest)
    if slots > most:
        raise ConfigError(
            f"latent-train config: the longest training trace takes {slots} latent slots at compression "
            f"{smallest} ({longest} tokens), more than run.finetune.latent_head.max_latent_steps {most}"
        )
    return longest


def _run_stage(config: LatentTrainConfig, stage: int, base: Path, stage_dir: Path, progress: bool) -> list[dict]:
    """One finetune of stage `stage` from `base` into `stage_dir` (a merged model in stage_dir/model)."""
    from mmllm.training.finetune import ADAPTER_DIR, finetune, load_finetune_config, merge_lora
    from mmllm.training.launch import launch_ranks
    from mmllm.training.loop import LOG_FILE

    run = copy.deepcopy(config.run)
    run.setdefault("finetune", {})["base_model"] = str(base)
    run["out"] = str(stage_dir)
    run["steps"] = config.steps
    run["seed"] = run.get("seed", 0) + stage
    if config.method == "mirage":  # the head's stage: distillation first, then text alone
        run["finetune"]["latent_head"]["stage"] = stage
    run.setdefault("data", {})["sources"] = [{"path": str(stage_dir / "shards")}]
    path = stage_dir / "finetune.yaml"
    path.write_text(yaml.safe_dump(run, sort_keys=False), encoding="utf-8")
    settings = load_finetune_config(path)  # refused here, before any rank starts
    if config.ranks == 1:
        finetune(settings, config.deepspeed or None, progress=progress)
    else:
        deepspeed = ["--deepspeed", config.deepspeed] if config.deepspeed else []
        launch_ranks(["finetune", "--config", str(path), *deepspeed], config.ranks, stage_dir / "finetune.log")
    if settings.finetune.method != "full":
        merge_lora(base, stage_dir / ADAPTER_DIR, stage_dir / "model")
    return [json.loads(line) for line in (stage_dir / LOG_FILE).read_text().splitlines()]
