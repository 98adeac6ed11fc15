"""`mmllm bench tokenizers`: train each toy tokenizer, then time and score it, on this machine's CPU.

For every selected toy config in configs/tokenizer/ the benchmark
1. trains (or fits) it with `train_tokenizer`, timing the wall clock (skipped with `--trained DIR`,
   which reuses `DIR/<name>` tokenizers saved by an earlier run);
2. scores a round trip of held-out toy items (`evaluate_tokenizer`): oracle agreement,
   reconstruction quality, codebook usage;
3. times batch encode and decode (median of interleaved repeats, after a warm-up) and reports
   media per second: images/s, audio-seconds/s, video-seconds/s, action chunks/s.

Targets from issue 3 are checked and printed beside the figures: oracle agreement >= 95% and
training time <= 3 min (image), 5 min (video) and 10 min (speech) on 2 CPU cores.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmllm.bench.timing import interleaved
from mmllm.tokenizers.base import load_tokenizer
from mmllm.tokenizers.evaluation import evaluate_tokenizer, held_out_items
from mmllm.tokenizers.training import load_train_config, train_tokenizer

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "tokenizer"


@dataclass(frozen=True)
class Target:
    config: str  # file name in configs/tokenizer/
    agreement: float | None  # minimum oracle agreement after a round trip
    train_seconds: float | None  # maximum training wall-clock on 2 CPU cores


TARGETS: dict[str, Target] = {
    "image": Target("image_toy.yaml", 0.95, 180),
    "video": Target("video_toy.yaml", 0.95, 300),
    "speech": Target("audio_toy.yaml", 0.95, 600),
    "action-bins": Target("action_bins.yaml", None, None),
    "action-fast": Target("action_fast.yaml", None, None),
    "action-vqbet": Target("action_vqbet.yaml", None, None),
}


def bench_tokenizers(
    names: list[str] | None = None,
    trained: Path | None = None,
    out: Path | None = None,
    n: int = 500,
    repeats: int = 5,
    batch: int = 32,
) -> list[dict]:
    """One result row per tokenizer (see the module docstring)."""
    rows = []
    installed = [name for name, target in TARGETS.items() if (CONFIG_DIR / target.config).is_file()]
    for name in names or installed:
        target = TARGETS[name]
        config = load_train_config(CONFIG_DIR / target.config, [f"out={out / name}"] if out else [])
        if trained is not None:
            tokenizer = load_tokenizer(trained / name)
            train_seconds = None
        else:
            result = train_tokenizer(config, show_progress=False)
            tokenizer, train_seconds = result.tokenizer, result.seconds
        items = held_out_items(tokenizer.modality, n)
        report = evaluate_tokenizer(tokenizer, items, show_progress=False)
        row = {"name": name, **report.to_dict(), "train_seconds": train_seconds}
        row.update(_throughput(tokenizer, items[:batch], repeats))
        row["meets_target"] = _meets(target, row)
        rows.append(row)
    return rows


def _throughput(tokenizer, items: list[np.ndarray], repeats: int) -> dict[str, float]:
    prepared = [tokenizer.prepare(item, f"item {i}") for i, item in enumerate(items)]
    codes = tokenizer.encode(prepared).items()
    timings = interleaved(
        {"encode": lambda: tokenizer.encode(prepared), "decode": lambda: tokenizer.decode(codes)}, repeats
    )
    units, unit = _media_units(tokenizer, prepared)
    return {
        "unit": unit,
        "encode_per_s": timings["encode"].rate(units)["median"],
        "decode_per_s": timings["decode"].rate(units)["median"],
    }


def _media_units(tokenizer, prepared: list[np.ndarray]) -> tuple[float, str]:
    """How much media a batch holds, in the unit its throughput is quoted in."""
    if tokenizer.modality == "audio":
        return sum(len(wave) for wave in prepared) / tokenizer.sample_rate, "audio-s"
    if tokenizer.modality == "video":
        from mmllm.data.media import MP4_FPS

        return sum(len(video) for video in prepared) / MP4_FPS, "video-s"
    return len(prepared), {"image": "images", "action": "chunks"}[tokenizer.modality]


def _meets(target: Target, row: dict) -> bool | None:
    checks = []
    if target.agreement is not None:
        checks.append(row.get("oracle_agreement", 0.0) >= target.agreement)
    if target.train_seconds is not None and row["train_seconds"] is not None:
        checks.append(row["train_seconds"] <= target.train_seconds)
    return all(checks) if checks else None


def format_tokenizer_bench(rows: list[dict]) -> str:
    """A markdown table of the rows, with the machine they ran on."""
    header = (
        "| tokenizer | tokens/item | oracle agreement | quality | usage | train s | encode /s | decode /s | target |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    for row in rows:
        quality = _quality(row)
        agreement = f"{row['oracle_agreement']:.1%}" if "oracle_agreement" in row else "n/a"
        train = f"{row['train_seconds']:.0f}" if row["train_seconds"] is not None else "(reused)"
        verdict = {True: "met", False: "MISSED", None: "-"}[row["meets_target"]]
        lines.append(
            f"| {row['name']} ({row['tokenizer']}) | {row['tokens_per_item']:.0f} | {agreement} | {quality} "
            f"| {row['codebook_usage']:.0%} | {train} | {row['encode_per_s']:.1f} {row['unit']} "
            f"| {row['decode_per_s']:.1f} {row['unit']} | {verdict} |"
        )
    machine = (
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    lines.append(f"\n{machine}; measured {time.strftime('%Y-%m-%d')}")
    return "\n".join(lines)


def _quality(row: dict) -> str:
    if "psnr" in row:
        return f"PSNR {row['psnr']:.1f} dB, SSIM {row['ssim']:.3f}"
    if "si_snr" in row:
        return f"SI-SNR {row['si_snr']:.1f} dB, mel {row['mel_distance']:.2f}"
    return f"MSE {row['mse']:.2e}"
