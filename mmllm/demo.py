"""`mmllm demo`: the pipeline on the toy world, every stage real, with a report.

Toy world -> a SentencePiece text tokenizer and the four modality tokenizers -> the vocabulary
layout -> pretokenized Arrow shards -> a 2-rank DeepSpeed (ZeRO-2) pretraining run -> checks that
the trained checkpoint, its Hugging Face export, the re-import and KV-cached decoding give the
same logits -> `mmllm eval` on every toy task, with the chance and untrained rows. It leaves
OUT/model/ (a self-contained checkpoint), OUT/eval/results.json with the generated media, and
OUT/report.md with the metrics table, an image grid, links to generated speech and the
per-modality loss curves (OUT/loss_curves.png). `--fast` shrinks every stage so the test suite
runs it; later stages (finetuning, chat) extend it. `prepare_data` and `pretrain` are also the
first stages of `mmllm bench learnability`.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mmllm.config import load_config
from mmllm.data.interleaved import read_jsonl, record_texts
from mmllm.data.pretokenize import TokenizerBundle, load_shards, pretokenize
from mmllm.data.toy_tasks import write_toyworld
from mmllm.data.toyworld import caption_corpus
from mmllm.errors import MMLLMError
from mmllm.evaluation.report import image_grid, results_table
from mmllm.evaluation.runner import EvalSettings, evaluate
from mmllm.model.mmllm import MMLLM
from mmllm.plots import plot_loss_curves
from mmllm.text_tokenizer import fingerprint, train_text_tokenizer
from mmllm.tokenizers.evaluation import evaluate_tokenizer, held_out_items
from mmllm.tokenizers.training import load_train_config, train_tokenizer
from mmllm.training.launch import launch_ranks
from mmllm.training.loop import LOG_FILE
from mmllm.vocab import VocabLayout, VocabSpec

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PARITY_TOLERANCE = 1e-4  # fp32 logits; the parity tests use the same bound


class DemoCheckFailed(MMLLMError):
    """A hand-off in the demo changed the model's outputs."""


@dataclass(frozen=True)
class DemoScale:
    """How much of everything the demo makes: `--fast` (the test suite runs it) or full (`make demo`)."""

    items_per_task: int  # toy-world records of each of the 12 tasks
    tokenizer_steps: int | None  # None: each tokenizer config's own step count (trained to its target)
    tokenizer_items: int | None  # None: the config's item count
    tokenizer_eval_items: int  # held-out items scored through each tokenizer's round trip
    eval_items: int  # held-out items per eval task
    model: str  # model config YAML
    pretrain_overrides: tuple[str, ...]  # on top of configs/pretrain/toy.yaml


FAST = DemoScale(
    items_per_task=24,
    tokenizer_steps=60,  # enough to leave random init; the learned codes are not the point here
    tokenizer_items=256,
    tokenizer_eval_items=16,
    eval_items=200,  # TOYWORLD.md: 200 held-out items per task for --fast
    model="tiny.yaml",
    # 40 steps of 2 ranks x 4 rows x 512 tokens: every modality's loss visibly falls
    pretrain_overrides=(
        "steps=40",
        "data.packing.seq_len=512",
        "optim.lr=3e-3",
        "optim.warmup_steps=5",
        "log_every=1",
        "save_every=0",
    ),
)
FULL = DemoScale(
    items_per_task=500,  # TOYWORLD.md's training split size
    tokenizer_steps=None,
    tokenizer_items=None,
    tokenizer_eval_items=200,
    eval_items=500,  # TOYWORLD.md: at least 500 held-out items per task
    model="toy.yaml",
    pretrain_overrides=("steps=300",),  # 300 steps x 8k tokens = 2.5M tokens, a fraction of toy.yaml's 1000
)
TOKENIZER_CONFIGS = {  # modality -> the config that trains its toy tokenizer
    "image": "image_toy.yaml",
    "audio": "audio_toy.yaml",
    "video": "video_toy.yaml",
    "action": "action_bins.yaml",
}
EVAL_TASKS = (  # every toy-world task of TOYWORLD.md but the reasoning ones (issue 8's), and text perplexity
    "toy-caption",
    "toy-vqa",
    "toy-draw",
    "toy-transcribe",
    "toy-speak",
    "toy-motion",
    "toy-animate",
    "toy-act",
    "toy-interleaved",
    "toy-text-ppl",
)
SHOWN_WAVS = 4  # generated speech files linked from the report
SHOWN_TASK = "toy-caption"  # the report shows this task's first document as the exported tokenizer names it
RANKS = 2  # the pretraining stage is a real multi-rank DeepSpeed run, even on a laptop


@dataclass
class DemoData:
    """What the data stages leave: the layout, the tokenizer bundle and the pretokenized shards."""

    layout: VocabLayout
    bundle: Path
    shards: Path
    tokenizer_rows: list[dict]


class Stages:
    """Times the demo's stages and prints one line per finished stage."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, str]] = []

    def done(self, name: str, began: float, detail: str) -> None:
        self.rows.append((name, time.perf_counter() - began, detail))
        print(f"[demo] {name}: {detail}", flush=True)


def prepare_data(out: Path, scale: DemoScale, seed: int, stages: Stages) -> DemoData:
    """Toy world -> text and modality tokenizers -> vocabulary layout and bundle -> shards."""
    t = time.perf_counter()
    world = write_toyworld(out / "world", scale.items_per_task, seed)
    stages.done("toy world", t, f"{world['records']} records of {len(world['tasks'])} tasks -> {world['path']}")

    t = time.perf_counter()
    corpus = out / "world" / "text.txt"
    texts = caption_corpus(2000, seed) + [t for r in read_jsonl(world["path"]) for t in record_texts(r)]
    corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
    text_tokenizer = train_text_tokenizer([corpus], out / "text_tokenizer", vocab_size=512)
    detail = f"SentencePiece BPE, {len(text_tokenizer)} tokens, on the world's text and captions"
    stages.done("text tokenizer", t, detail)

    t = time.perf_counter()
    tokenizers, tokenizer_rows = _train_modality_tokenizers(out / "tokenizers", scale, seed)
    stages.done("modality tokenizers", t, ", ".join(f"{r['modality']} {r['seconds']:.0f} s" for r in tokenizer_rows))

    t = time.perf_counter()
    spec = load_config(VocabSpec, CONFIGS / "vocab" / "toy.yaml")
    layout = VocabLayout.build(
        len(text_tokenizer),
        spec.modality_ranges(),
        None,
        spec.registers,
        spec.pause,
        spec.spare,
        fingerprint(text_tokenizer),
    )
    for name, tokenizer in tokenizers.items():
        tokenizer.check_fits(layout.modality(name), f"the {name} tokenizer")
    bundle = out / "bundle"
    TokenizerBundle(layout, text_tokenizer, tokenizers).save(bundle)
    stages.done("vocab layout", t, f"{layout.total_size} ids in use, padded to {layout.padded_size} -> {bundle}")

    t = time.perf_counter()
    shards = out / "shards"
    report = pretokenize(read_jsonl(world["path"]), Path(world["path"]).parent, bundle, shards, progress=False)
    if report.skipped:
        raise MMLLMError(f"pretokenize skipped {report.skipped} toy-world records: {report.failures[0]['error']}")
    stages.done("pretokenize", t, f"{report.written} documents, {report.tokens:,} tokens -> {shards}")
    return DemoData(layout, bundle, shards, tokenizer_rows)


def pretrain(out: Path, scale: DemoScale, data: DemoData, seed: int, overrides: Sequence[str] = ()) -> list[dict]:
    """The 2-rank ZeRO-2 DeepSpeed run, started through DeepSpeed's launcher; returns its step log."""
    run = out / "pretrain"
    settings = [
        f"model={CONFIGS / 'model' / scale.model}",
        f"vocab={data.bundle}",
        f"out={run}",
        "data.sources=" + json.dumps([{"path": str(data.shards)}]),
        f"seed={seed}",
        *scale.pretrain_overrides,
        *overrides,
    ]
    deepspeed_config = CONFIGS / "deepspeed" / "zero2.json"
    command = ["pretrain", "--config", str(CONFIGS / "pretrain" / "toy.yaml"), "--deepspeed", str(deepspeed_config)]
    launch_ranks([*command, *settings], RANKS, out / "pretrain.log")
    history = [json.loads(line) for line in (run / LOG_FILE).read_text().splitlines()]
    return [r for r in history if "loss" in r]


def run_demo(out: Path, fast: bool = False, seed: int = 0) -> Path:
    """Toy world -> text and modality tokenizers -> pretokenized shards -> 2-rank DeepSpeed
    pretraining -> parity checks -> eval of every toy task; returns OUT/report.md."""
    scale = FAST if fast else FULL
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages()
    data = prepare_data(out, scale, seed, stages)

    t = time.perf_counter()
    steps = pretrain(out, scale, data, seed)
    curves = _loss_curves(steps)
    plot_loss_curves(curves, out / "loss_curves.png", title=f"pretraining, {RANKS} ranks, ZeRO-2")
    shutil.rmtree(out / "model", ignore_errors=True)
    shutil.copytree(out / "pretrain" / "model", out / "model")
    stages.done(
        "pretrain",
        t,
        f"{len(steps)} steps on {RANKS} ranks (ZeRO-2), loss {steps[0]['loss']:.2f} -> {steps[-1]['loss']:.2f}",
    )

    t = time.perf_counter()
    model = MMLLM.from_pretrained(out / "model").eval()
    shards = load_shards(data.shards, data.layout)
    example = next(row for row in shards if row["task"] == SHOWN_TASK)
    ids = torch.tensor([example["input_ids"]])
    checks = _parity_checks(model, ids, out)
    from transformers import AutoTokenizer

    named = AutoTokenizer.from_pretrained(str(out / "hf")).convert_ids_to_tokens(example["input_ids"])
    stages.done("checkpoints and HF parity", t, f"max logit difference {max(d for _, d in checks):.1e}")

    t = time.perf_counter()
    settings = EvalSettings(tasks=list(EVAL_TASKS), limit=scale.eval_items, seed=seed, progress=False)
    results = evaluate(model, settings, out / "eval" / "results.json", model_path=str(out / "model"))
    evaluation = _eval_section(results, out)
    stages.done("eval", t, f"{len(EVAL_TASKS)} tasks x {scale.eval_items} items -> {out / 'eval' / 'results.json'}")

    path = out / "report.md"
    path.write_text(
        _report(
            data.layout,
            model,
            named,
            stages.rows,
            data.tokenizer_rows,
            curves,
            checks,
            evaluation,
            time.perf_counter() - start,
        ),
        encoding="utf-8",
    )
    return path


def _train_modality_tokenizers(root: Path, scale: DemoScale, seed: int):
    """Train each modality's toy tokenizer from its config; score it on held-out items."""
    tokenizers, rows = {}, []
    for modality, config_name in TOKENIZER_CONFIGS.items():
        overrides = [f"out={root / modality}", f"seed={seed}"]
        if scale.tokenizer_steps is not None:
            overrides.append(f"train.steps={scale.tokenizer_steps}")
        if scale.tokenizer_items is not None:
            overrides.append(f"data.num_items={scale.tokenizer_items}")
        result = train_tokenizer(load_train_config(CONFIGS / "tokenizer" / config_name, overrides), False)
        scores = evaluate_tokenizer(
            result.tokenizer, held_out_items(modality, scale.tokenizer_eval_items), show_progress=False
        )
        tokenizers[modality] = result.tokenizer
        rows.append(
            {
                "modality": modality,
                "tokenizer": scores.name,
                "steps": result.steps,
                "seconds": result.seconds,
                "tokens": scores.tokens_per_item,
                "agreement": scores.metrics.get("oracle_agreement", float("nan")),
            }
        )
    return tokenizers, rows


def _loss_curves(steps: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{"all": [(step, loss)], "text": ..., "image": ...} from the training log."""
    curves: dict[str, list[tuple[int, float]]] = {"all": [(r["step"], r["loss"]) for r in steps]}
    for record in steps:
        for key, value in record.items():
            if key.startswith("loss/"):
                curves.setdefault(key.removeprefix("loss/"), []).append((record["step"], value))
    return curves


def _parity_checks(model: MMLLM, ids: torch.Tensor, out: Path) -> list[tuple[str, float]]:
    """Native reload, HF export, re-import and KV-cached decoding all give the trained model's logits."""
    with torch.no_grad():
        reference = model(ids).logits
    checks: list[tuple[str, float]] = []

    def check(name: str, logits: torch.Tensor) -> None:
        diff = (logits - reference).abs().max().item()
        checks.append((name, diff))
        if diff > PARITY_TOLERANCE:
            raise DemoCheckFailed(f"{name}: logits differ by {diff:.2e} (> {PARITY_TOLERANCE})")

    from transformers import AutoModelForCausalLM

    model.export_hf(out / "hf")
    with torch.no_grad():
        check("native checkpoint reload", MMLLM.from_pretrained(out / "model").eval()(ids).logits)
        check(
            "transformers AutoModelForCausalLM on the export",
            AutoModelForCausalLM.from_pretrained(str(out / "hf")).eval()(ids).logits,
        )
        check("re-import of the HF export", MMLLM.from_pretrained(out / "hf").eval()(ids).logits)
        cache = model.new_kv_cache()
        prefill = model(ids[:, :-8], kv_cache=cache).logits
        decoded = [model(ids[:, i : i + 1], kv_cache=cache).logits for i in range(ids.shape[1] - 8, ids.shape[1])]
        check("KV-cached decoding (8 steps) vs full forward", torch.cat([prefill, *decoded], dim=1))
    return checks


def _elide_spans(tokens: list[str], keep: int = 3) -> list[str]:
    """The tokens with each long modality span (`<|bo?|> ... <|eo?|>`) cut to its first few codes."""
    shown: list[str] = []
    span: list[str] | None = None
    for token in tokens:
        if span is None:
            shown.append(token)
            if token.startswith("<|bo") and token.endswith("|>"):
                span = []
        elif token.startswith("<|eo") and token.endswith("|>"):
            hidden = len(span) - keep - 1
            shown += [*span[:keep], f"...({hidden} more)", span[-1]] if hidden > 0 else span
            shown.append(token)
            span = None
        else:
            span.append(token)
    return shown


def _eval_section(results: dict, out: Path) -> list[str]:
    """The report's eval part: the metrics table, the image grid and links to a few generated WAVs."""
    efficiency = results["efficiency"]
    lines = ["## Evaluation on held-out toy-world items (greedy decoding)", "", results_table(results), ""]
    lines.append(
        f"Decode {efficiency['decode_tokens_per_s']:,.0f} tokens/s, prefill {efficiency['prefill_latency_ms']:.1f} ms "
        f"per batch (median), peak memory {efficiency['peak_memory_mb']:,.0f} MB. Per-sample outputs: "
        "[eval/results.json](eval/results.json)."
    )
    grid = image_grid(results, out / "eval", out / "image_grid.png")
    if grid is not None:
        lines += ["", "### Generated images and their prompts", "", "![image grid](image_grid.png)"]
    speech = [s for s in results["tasks"].get("toy-speak", {}).get("samples", []) if s["media"]][:SHOWN_WAVS]
    if speech:
        lines += ["", "### Generated speech", "", "| prompt | WAV | oracle WER |", "|---|---|---|"]
        for sample in speech:
            wav, wer = sample["media"][0], sample["scores"].get("wer", 1.0)
            lines.append(f"| {sample['prompt']} | [{Path(wav).name}](eval/{wav}) | {wer:.2f} |")
    return [*lines, ""]


def _report(layout, model, tokens, stages, tokenizer_rows, curves, checks, evaluation, seconds) -> str:
    lines = ["# mmllm demo report", "", f"Wall time: {seconds:.1f} s.", "", "## Stages", ""]
    lines += ["| stage | seconds | result |", "|---|---|---|"]
    lines += [f"| {name} | {secs:.1f} | {detail} |" for name, secs, detail in stages]
    lines += ["", *evaluation]
    lines += ["## Modality tokenizers (round trip on held-out toy items, read by the oracles)", ""]
    lines += [
        "| modality | tokenizer | steps | seconds | tokens/item | oracle agreement |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['modality']} | {r['tokenizer']} | {r['steps']} | {r['seconds']:.0f} | {r['tokens']:.0f} "
        f"| {r['agreement']:.1%} |"
        for r in tokenizer_rows
    ]
    lines += ["", "## Pretraining loss per modality (token-mean cross-entropy, nats)", ""]
    lines += ["| modality | first step | last step | change |", "|---|---|---|---|"]
    for name, points in curves.items():
        first, last = points[0][1], points[-1][1]
        lines.append(f"| {name} | {first:.3f} | {last:.3f} | {last - first:+.3f} |")
    lines += ["", "![loss curves](loss_curves.png)", ""]
    lines += ["## Vocabulary layout", "", "```", layout.describe(), "```", ""]
    lines += [f"## A {SHOWN_TASK} document, as the exported HF tokenizer names its ids", ""]
    lines += [f"{len(tokens)} ids (long modality spans elided):", "", "```", " ".join(_elide_spans(tokens)), "```", ""]
    lines += ["## Checks on the trained model (max absolute logit difference, fp32)", ""]
    lines += ["| check | max diff |", "|---|---|"]
    lines += [f"| {name} | {diff:.1e} |" for name, diff in checks]
    lines += ["", f"Model: {model.config.num_parameters():,} parameters, {model.config.num_hidden_layers} layers.", ""]
    return "\n".join(lines)
