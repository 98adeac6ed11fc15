"""`mmllm bench learnability`: toy-task scores against minutes of CPU pretraining.

The demo's data stages at full scale (toy world, trained tokenizers, shards), then the demo's
2-rank ZeRO-2 pretraining run with a checkpoint every `save_every` steps; each checkpoint is
evaluated on the toy tasks with `mmllm eval`, and each score is placed at the wall-clock
minutes of training that produced it. The table and plot say what a laptop learns in how
long, which is where the demo's quality floors come from (docs/learnability.md).
"""

from __future__ import annotations

import json
from pathlib import Path

from mmllm.demo import EVAL_TASKS, FAST, STANDARD, Stages, prepare_data, pretrain
from mmllm.evaluation.report import format_value
from mmllm.evaluation.runner import EvalSettings, evaluate
from mmllm.evaluation.tasks import get_task
from mmllm.model.mmllm import MMLLM
from mmllm.plots import plot_learnability


def bench_learnability(
    out: Path, steps: int, save_every: int, eval_items: int, seed: int = 0, fast: bool = False
) -> dict:
    """Pretrain the demo's model for `steps`, evaluating every `save_every`; `fast` takes the demo's
    --fast data and model (a check of the mechanics, not a measurement)."""
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages()
    scale = FAST if fast else STANDARD
    data = prepare_data(out, scale, seed, stages)
    # after the scale's own overrides, so these win
    overrides = [f"steps={steps}", f"save_every={save_every}", f"keep_last={steps // save_every + 1}", "log_every=1"]
    history = pretrain(out, scale, data, seed, overrides)
    elapsed = {record["step"]: record["elapsed_s"] for record in history}
    checkpoints = sorted((out / "pretrain" / "checkpoints").glob("step-*"))
    rows = []
    for i, checkpoint in enumerate(checkpoints):
        step = int(checkpoint.name.removeprefix("step-"))
        model = MMLLM.from_pretrained(checkpoint / "model").eval()
        settings = EvalSettings(list(EVAL_TASKS), limit=eval_items, seed=seed, untrained=i == 0, progress=False)
        results = evaluate(model, settings, out / "eval" / checkpoint.name / "results.json", str(checkpoint / "model"))
        if i == 0:
            rows.append(_row(0, 0.0, results, "untrained"))
            rows.append(_row(-1, 0.0, results, "chance"))
        rows.append(_row(step, elapsed[step] / 60, results, None))
    result = {
        "benchmark": "learnability",
        "steps": steps,
        "tokens_per_step": _tokens_per_step(out),
        "eval_items": eval_items,
        "stages": [{"name": n, "seconds": s, "detail": d} for n, s, d in stages.rows],
        "rows": rows,
    }
    (out / "learnability.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    plot_learnability(rows, {name: get_task(name).metric for name in EVAL_TASKS}, out / "learnability.png")
    return result


def _row(step: int, minutes: float, results: dict, reference: str | None) -> dict:
    """One curve point: each task's primary metric (of the model, or of a reference row)."""
    scores = {}
    for name, task in results["tasks"].items():
        metrics = task["references"][reference] if reference else task["metrics"]
        scores[name] = metrics.get(task["metric"])
    return {"step": step, "minutes": minutes, "row": reference or "model", "scores": scores}


def _tokens_per_step(out: Path) -> int:
    """Packed tokens per optimizer step: DeepSpeed's global rows per step times the row length."""
    config = json.loads((out / "pretrain" / "config.json").read_text())
    return config["deepspeed"]["train_batch_size"] * config["pretrain"]["data"]["packing"]["seq_len"]


def format_learnability(result: dict) -> str:
    names = list(result["rows"][0]["scores"])
    metrics = {name: get_task(name).metric for name in names}
    lines = ["| step | minutes | " + " | ".join(f"{n} ({metrics[n]})" for n in names) + " |"]
    lines.append("|" + "---|" * (len(names) + 2))
    for row in result["rows"]:
        label = row["row"] if row["row"] != "model" else str(row["step"])
        cells = [format_value(metrics[name], row["scores"][name]) for name in names]
        lines.append(f"| {label} | {row['minutes']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
