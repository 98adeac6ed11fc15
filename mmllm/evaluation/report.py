"""Reports of an evaluation's results.json: a markdown table of every task and a grid of generated images.

The table has one row per task: its primary metric for the model beside the chance and
untrained reference rows, with the direction of improvement marked. Fractions (accuracies,
success rates, part scores) are shown as percentages; WER, reach error and perplexity as
numbers. When the run scored reasoning puzzles, two columns follow: the reasoning mode and the
mean generated tokens per answer. `reasoning_table` puts several runs (one per method: Coconut
and its baselines) in one table. The grid shows each generated image, upscaled without
smoothing so its pixels stay visible, above the prompt that asked for it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from mmllm.data.media import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

FRACTION_SUFFIXES = ("accuracy", "score", "success", "exact", "unreadable")  # metric keys that lie in [0, 1]
MISSING = "—"
IMAGE_PX = 128  # a 64x64 toy image at 2x: each source pixel a 2x2 block, so shapes' edges stay readable
CELL_WIDTH = 200  # wider than the image so a prompt line holds ~35 characters of the 11 px default font
PAD = 6  # px around the image and between the cell's blocks
FONT_SIZE = 11  # Pillow's default font at 11 px: small, yet legible in a PNG viewed at 100%
LINE_HEIGHT = 14  # the font's 11 px glyphs (13 px with descenders) plus a pixel of leading
PROMPT_LINES = 4  # lines of prompt text per cell; longer prompts keep their end, where the request is
TEXT_LINES = PROMPT_LINES + 2  # a title line (task), the prompt, a score line
CELL_HEIGHT = PAD + IMAGE_PX + PAD + TEXT_LINES * LINE_HEIGHT + PAD
GRID_COLUMNS = 4  # cells per row of the grid
TOKENS = "generated_tokens"  # the per-sample key of a reasoning answer's cost (mmllm.evaluation.reasoning)
SCORE_KEYS = ("accuracy", "image_accuracy")  # the per-sample key shown under an image, first one present
RIGHT, WRONG, INK = (0, 120, 0), (180, 0, 0), (0, 0, 0)


def is_fraction(key: str) -> bool:
    return key.endswith(FRACTION_SUFFIXES)


def format_value(key: str, value: float | None, stderr: float | None = None) -> str:
    """'87.5%' for fractions, '0.123' for other metrics, with '± stderr' when given; '—' when absent."""
    if value is None or not math.isfinite(value):
        return MISSING
    spread = stderr is not None and math.isfinite(stderr) and stderr > 0
    if is_fraction(key):
        return f"{100 * value:.1f}%" + (f" ± {100 * stderr:.1f}" if spread else "")
    digits = 1 if abs(value) >= 100 else 3  # perplexities run to hundreds; errors and WER live below 1
    return f"{value:.{digits}f}" + (f" ± {stderr:.{digits}f}" if spread else "")


def format_tokens(value: float | None) -> str:
    """Mean generated tokens per answer, to a tenth; '—' when absent."""
    return f"{value:.1f}" if value is not None and math.isfinite(value) else MISSING


def results_table(results: dict[str, Any]) -> str:
    """A markdown table, one row per task: metric (↑ higher is better / ↓ lower), model, chance, untrained, n;
    then the reasoning mode and mean tokens per answer when some task counted them."""
    tasks = results.get("tasks", {})
    counted = any(TOKENS in task.get("metrics", {}) for task in tasks.values())
    header, rule = "| task | metric | model | chance | untrained | n |", "|---|---|---:|---:|---:|---:|"
    lines = [header + " mode | tokens/answer |", rule + "---|---:|"] if counted else [header, rule]
    for name, task in tasks.items():
        metric = task.get("metric", "")
        arrow = "↑" if task.get("higher_is_better", True) else "↓"
        metrics = task.get("metrics", {})
        references = task.get("references", {})
        model = format_value(metric, metrics.get(metric), metrics.get(f"{metric}_stderr"))
        chance = format_value(metric, references.get("chance", {}).get(metric))
        untrained = format_value(metric, references.get("untrained", {}).get(metric))
        line = f"| {name} | {metric} {arrow} | {model} | {chance} | {untrained} | {task.get('n', MISSING)} |"
        if counted:
            line += f" {task.get('mode', MISSING)} | {format_tokens(metrics.get(TOKENS))} |"
        lines.append(line)
    return "\n".join(lines)


def reasoning_table(runs: Sequence[dict[str, Any]]) -> str:
    """One markdown table of several eval runs (one per method): a row per run, its mode and model,
    and per reasoning task the accuracy and mean tokens per answer; the first run's chance row last."""
    names = list(dict.fromkeys(n for run in runs for n, t in run.get("tasks", {}).items() if "mode" in t))
    header = "| method | model | " + " | ".join(f"{n} accuracy | {n} tokens/answer" for n in names) + " |"
    lines = [header, "|---|---|" + "---:|---:|" * len(names)]
    for run in runs:
        tasks = run.get("tasks", {})
        mode = next((tasks[n]["mode"] for n in names if n in tasks), MISSING)
        cells = []
        for name in names:
            metrics = tasks.get(name, {}).get("metrics", {})
            cells += [format_value("accuracy", metrics.get("accuracy"), metrics.get("accuracy_stderr"))]
            cells += [format_tokens(metrics.get(TOKENS))]
        lines.append(f"| {mode} | {run.get('model', {}).get('path') or MISSING} | " + " | ".join(cells) + " |")
    if runs:
        references = [runs[0]["tasks"].get(n, {}).get("references", {}) for n in names]
        chance = [format_value("accuracy", r.get("chance", {}).get("accuracy")) for r in references]
        lines.append("| chance | — | " + " | ".join(f"{c} | {MISSING}" for c in chance) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- image grid


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=FONT_SIZE)


def _fit(text: str, font, width: int) -> str:
    """`text` cut (with '...') to fit `width` px."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def _wrap_words(words: list[str], font, width: int) -> list[str]:
    lines: list[str] = []
    for word in words:
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(candidate) <= width:
            lines[-1] = candidate
        else:
            lines.append(_fit(word, font, width))
    return lines


def _wrap(text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` px; text that runs past `max_lines` keeps its end, after a leading '...'."""
    words = text.split()
    lines = _wrap_words(words, font, width)
    start = 0
    while len(lines) > max_lines:
        start += 1
        lines = _wrap_words(["...", *words[start:]], font, width)
    return lines


def _image_samples(results: dict[str, Any], tasks: Sequence[str]) -> list[tuple[str, dict[str, Any], str]]:
    """(task, sample, image path) for every generated image of `tasks`, in task then sample order."""
    found = []
    for name in tasks:
        for sample in results.get("tasks", {}).get(name, {}).get("samples", []):
            found += [(name, sample, path) for path in sample.get("media", []) if path.lower().endswith(IMAGE_SUFFIXES)]
    return found


def _cell(task: str, sample: dict[str, Any], image: Image.Image, font) -> Image.Image:
    cell = Image.new("RGB", (CELL_WIDTH, CELL_HEIGHT), "white")
    cell.paste(image.resize((IMAGE_PX, IMAGE_PX), Image.Resampling.NEAREST), ((CELL_WIDTH - IMAGE_PX) // 2, PAD))
    draw = ImageDraw.Draw(cell)
    width = CELL_WIDTH - 2 * PAD
    y = PAD + IMAGE_PX + PAD
    draw.text((PAD, y), _fit(f"{task}  {sample.get('id', '')}", font, width), fill=INK, font=font)
    for i, line in enumerate(_wrap(str(sample.get("prompt", "")), font, width, PROMPT_LINES)):
        draw.text((PAD, y + (1 + i) * LINE_HEIGHT), line, fill=INK, font=font)
    scores = sample.get("scores", {})
    key = next((k for k in SCORE_KEYS if k in scores), None)
    if key is not None:
        value = float(scores[key])
        draw.text(
            (PAD, y + (TEXT_LINES - 1) * LINE_HEIGHT),
            _fit(f"{key} {value:.2f}", font, width),
            fill=RIGHT if value >= 1.0 else WRONG,
            font=font,
        )
    return cell


def image_grid(
    results: dict[str, Any],
    results_dir: Path,
    out_png: Path,
    tasks: Sequence[str] = ("toy-draw", "toy-interleaved"),
    max_items: int = 16,
) -> Path | None:
    """A PNG of up to `max_items` generated images, each above its prompt; None when there are none.

    Image paths in the samples are relative to `results_dir`; a missing or unreadable file is
    skipped with a warning.
    """
    font = _font()
    cells = []
    for task, sample, relative in _image_samples(results, tasks):
        if len(cells) >= max_items:
            break
        try:
            with Image.open(Path(results_dir) / relative) as opened:
                image = opened.convert("RGB")
        except (OSError, ValueError) as error:
            log.warning("image grid: skipping %s: %s", relative, error)
            continue
        cells.append(_cell(task, sample, image, font))
    if not cells:
        return None
    columns = min(GRID_COLUMNS, len(cells))
    rows = math.ceil(len(cells) / columns)
    grid = Image.new("RGB", (columns * CELL_WIDTH, rows * CELL_HEIGHT), "white")
    for i, cell in enumerate(cells):
        grid.paste(cell, ((i % columns) * CELL_WIDTH, (i // columns) * CELL_HEIGHT))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out_png)
    return out_png


def efficiency_table(results: dict[str, Any]) -> str:
    """A markdown table of each task's prefill latency (median per batch), decode tokens/s and peak
    memory, and the run's overall row; "" for results without efficiency figures."""
    rows = [(name, entry.get("efficiency")) for name, entry in results.get("tasks", {}).items()]
    rows = [(name, figures) for name, figures in [*rows, ("all tasks", results.get("efficiency"))] if figures]
    if not rows:
        return ""
    lines = ["| task | prefill ms (median) | decode tokens/s | peak memory MB |", "|---|---:|---:|---:|"]
    for name, figures in rows:
        lines.append(
            f"| {name} | {figures['prefill_latency_ms']:.1f} | {figures['decode_tokens_per_s']:,.0f} "
            f"| {figures['peak_memory_mb']:,.0f} |"
        )
    return "\n".join(lines)


def write_markdown(results: dict[str, Any], results_dir: Path, out_md: Path) -> Path:
    """`out_md`: the model, seed and command, the results table, the efficiency table, and the image grid
    (written beside it) if any."""
    out_md = Path(out_md)
    model = results.get("model", {})
    lines = [f"# Evaluation of {model.get('path', 'a model')}", ""]
    if model.get("hash"):
        lines.append(f"- model hash: `{model['hash']}`")
    if "seed" in results:
        lines.append(f"- seed: {results['seed']}")
    if results.get("command"):
        lines.append(f"- command: `{' '.join(str(arg) for arg in results['command'])}`")
    lines += ["", results_table(results), ""]
    efficiency = efficiency_table(results)
    if efficiency:
        lines += ["## Efficiency", "", efficiency, ""]
    grid = image_grid(results, Path(results_dir), out_md.with_name(f"{out_md.stem}_images.png"))
    if grid is not None:
        lines += ["## Generated images", "", f"![generated images and their prompts]({grid.name})", ""]
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(lines), encoding="utf-8")
    return out_md
