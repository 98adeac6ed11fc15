"""Train (or fit) any registered modality tokenizer from a YAML config.

    python tokenizers/train.py --config configs/tokenizer/image_toy.yaml [key=value ...]
    mmllm tokenizer train --config ... [key=value ...]

The data is the toy world (generated in memory from a seed) or a folder of the user's media
(PNG/JPEG, WAV/FLAC, NPY/GIF/MP4/WebM, action JSON), read through `mmllm.data.media`. A file
that cannot be read or prepared is skipped, counted and listed in `skipped.txt`; the run goes on.

Gradient-trained tokenizers run AdamW with linear warmup and cosine decay, on batches sampled
with replacement from the prepared items; statistics-fitted tokenizers (`fittable`) call `fit`
once. Checkpoints are ordinary tokenizer directories (`save_pretrained`), written atomically to
`OUT/checkpoint-STEP` every `save_every` steps and to `OUT` at the end, with `train_log.jsonl`.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mmllm.config import load_config, to_dict
from mmllm.errors import ConfigError, MMLLMError
from mmllm.tokenizers.base import ModalityTokenizer, load_tokenizer

logger = logging.getLogger("mmllm")


@dataclass
class DataConfig:
    source: str = "toyworld"  # "toyworld", or a folder of media files (searched recursively)
    num_items: int = 2000  # toy items to generate, or at most this many files
    seed: int = 0


@dataclass
class OptimConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    grad_clip: float = 1.0
    log_every: int = 50
    save_every: int = 0  # 0: only the final checkpoint
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default


@dataclass
class TokenizerTrainConfig:
    tokenizer: str = ""  # registry name (mmllm.tokenizers.available_tokenizers())
    config: dict[str, Any] = field(default_factory=dict)  # the tokenizer's constructor keywords
    data: DataConfig = field(default_factory=DataConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    out: str = ""
    seed: int = 0


@dataclass
class TrainResult:
    tokenizer: ModalityTokenizer
    seconds: float
    steps: int
    items: int
    skipped: list[str]
    final_logs: dict[str, float]


def load_train_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TokenizerTrainConfig:
    config = load_config(TokenizerTrainConfig, path, overrides)
    if not config.tokenizer:
        raise ConfigError(f"{path or 'overrides'}: 'tokenizer' (a registry name) is required")
    return config


def load_items(tokenizer: ModalityTokenizer, data: DataConfig) -> tuple[list[np.ndarray], list[str]]:
    """Prepared training items, and a line per skipped file."""
    if data.source == "toyworld":
        raw = toy_items(tokenizer.modality, data.num_items, data.seed)
        return [tokenizer.prepare(item, f"toy item {i}") for i, item in enumerate(raw)], []
    return read_folder(tokenizer, Path(data.source), data.num_items)


def toy_items(modality: str, n: int, seed: int) -> list:
    """Toy-world media in the tokenizer conventions: audio as (samples, rate) pairs."""
    from mmllm.data.toyworld import SPEECH_SAMPLE_RATE, toy_media

    items = toy_media(modality, n, seed)
    return [(wave, SPEECH_SAMPLE_RATE) for wave in items] if modality == "audio" else items


def read_folder(tokenizer: ModalityTokenizer, folder: Path, limit: int) -> tuple[list[np.ndarray], list[str]]:
    from mmllm.data import media

    if not folder.is_dir():
        raise ConfigError(f"data.source {folder}: not 'toyworld' and not a folder")
    suffixes = media.MEDIA_SUFFIXES[tokenizer.modality]
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes)[:limit]
    if not paths:
        raise ConfigError(f"{folder}: no {tokenizer.modality} files ({', '.join(suffixes)})")
    items, skipped = [], []
    for path in tqdm(paths, desc=f"reading {folder.name}", unit="file", leave=False):
        try:
            if tokenizer.modality == "audio":
                raw = media.read_audio(path)  # (samples, rate): the tokenizer resamples
            else:
                raw = media.read_media(tokenizer.modality, path)
            items.append(tokenizer.prepare(raw, str(path)))
        except MMLLMError as err:
            skipped.append(str(err))
    if not items:
        raise ConfigError(f"{folder}: none of {len(paths)} files could be read (first: {skipped[0]})")
    return items, skipped


def lr_at(step: int, optim: OptimConfig) -> float:
    """Linear warmup, then cosine decay to 10% of the peak (a floor, as in nanoGPT)."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    progress = (step - optim.warmup_steps) / max(1, optim.steps - optim.warmup_steps)
    return optim.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_tokenizer(config: TokenizerTrainConfig, show_progress: bool = True) -> TrainResult:
    """Build, train or fit, and save the tokenizer `config` describes."""
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    tokenizer = load_tokenizer(config.tokenizer, **config.config)
    if not (tokenizer.trainable or tokenizer.fittable):
        raise ConfigError(f"tokenizer '{config.tokenizer}' has nothing to train (a fixed or pretrained tokenizer)")
    out = Path(config.out) if config.out else None
    items, skipped = load_items(tokenizer, config.data)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(to_dict(config), indent=2) + "\n", encoding="utf-8")
        if skipped:
            (out / "skipped.txt").write_text("\n".join(skipped) + "\n", encoding="utf-8")
    for line in skipped[:5]:
        logger.warning("skipped %s", line)
    if skipped:
        logger.warning("skipped %d of %d files (listed in skipped.txt)", len(skipped), len(skipped) + len(items))
    started = time.perf_counter()
    if tokenizer.fittable and not tokenizer.trainable:
        logs = tokenizer.fit(items)
        steps = 0
    else:
        logs, steps = _gradient_training(tokenizer, items, config, rng, out, show_progress)
    seconds = time.perf_counter() - started
    tokenizer.eval()
    if out is not None:
        tokenizer.save_pretrained(out)
        summary = {"seconds": round(seconds, 2), "steps": steps, "items": len(items), "skipped": len(skipped), **logs}
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return TrainResult(tokenizer, seconds, steps, len(items), skipped, logs)


def _gradient_training(
    tokenizer: ModalityTokenizer,
    items: list[np.ndarray],
    config: TokenizerTrainConfig,
    rng: random.Random,
    out: Path | None,
    show_progress: bool,
) -> tuple[dict[str, float], int]:
    optim = config.train
    tokenizer.train()
    discriminator = getattr(tokenizer, "discriminator", None)
    generator_params = [
        p for n, p in tokenizer.named_parameters() if p.requires_grad and not n.startswith("discriminator.")
    ]
    optimizer = torch.optim.AdamW(generator_params, lr=optim.lr, betas=(0.9, 0.99), weight_decay=optim.weight_decay)
    disc_optimizer = None
    if discriminator is not None:
        disc_optimizer = torch.optim.AdamW(discriminator.parameters(), lr=optim.lr, betas=(0.5, 0.9))
    log_file = (out / "train_log.jsonl").open("w", encoding="utf-8") if out is not None else None
    logs: dict[str, float] = {}
    progress = tqdm(range(optim.steps), desc=f"train {tokenizer.name}", unit="step", disable=not show_progress)
    try:
        for step in progress:
            batch = tokenizer.collate([items[rng.randrange(len(items))] for _ in range(optim.batch_size)])
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, optim)
            loss, logs = tokenizer.training_loss(batch)
            if not torch.isfinite(loss):
                raise MMLLMError(f"tokenizer training diverged at step {step} (loss {loss.item()}); lower train.lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(generator_params, optim.grad_clip)
            optimizer.step()
            if disc_optimizer is not None:
                disc_loss = tokenizer.discriminator_loss(batch)
                if disc_loss is not None:
                    disc_optimizer.zero_grad(set_to_none=True)
                    disc_loss.backward()
                    disc_optimizer.step()
                    logs["disc_loss"] = disc_loss.item()
            logs = {"loss": loss.item(), **logs}
            if step % optim.log_every == 0 or step == optim.steps - 1:
                progress.set_postfix({k: f"{v:.4g}" for k, v in list(logs.items())[:4]})
                if log_file is not None:
                    log_file.write(json.dumps({"step": step, "lr": lr_at(step, optim), **logs}) + "\n")
                    log_file.flush()
            if out is not None and optim.save_every and (step + 1) % optim.save_every == 0 and step + 1 < optim.steps:
                tokenizer.eval()
                tokenizer.save_pretrained(out / f"checkpoint-{step + 1}")
                tokenizer.train()
    finally:
        if log_file is not None:
            log_file.close()
    return logs, optim.steps
