"""`mmllm bench train`: useful tokens/s of our training loop against transformers' Trainer and a raw loop.

Four contenders train the same model config from the same initial weights, with the same
optimizer (AdamW, the toy pretraining run's lr, betas, eps and weight decay, a constant
learning rate, gradient clipping at the same norm), in the same precision (fp32, or
`--precision bf16-mixed`: each forward under bf16 autocast, as the Trainer's `bf16=True` runs it
on a CPU), each in a single process on the CPU, with the same `torch.set_num_threads`:

    mmllm       our DeepSpeed loop as `mmllm pretrain` runs it (ZeRO-0, one rank, a child process,
                so DeepSpeed's global state stays out of the others) on packed rows: several
                documents per `seq_len` row, attention kept inside each document
    raw         the same packed rows, model, objective and loss normalisation in a plain torch
                loop, without DeepSpeed: the baseline for the loop's overhead
    hf-padded   `transformers.Trainer` + `LlamaForCausalLM` (SDPA) with our weights, one document
                per row, padded to the longest in the batch (labels -100 on padding), random order
    hf-grouped  the same with `train_sampling_strategy="group_by_length"` (LengthGroupedSampler)

Useful tokens are the tokens that are not padding: every token of every document trained on,
whether or not it is a loss target (conversations only score the assistant's turns). A step's
throughput is its useful tokens over its wall-clock seconds: for the Trainers from the end of the
step before to the end of this one (the first timed step: from its start), for our loops from
the top of the step to its end; either way fetching and collating the batch, forward, backward
and the optimizer step count.

Same data. The packed rows come first: `warmup + steps` steps of `batch` rows of `seq_len`
tokens, drawn and packed exactly as `train()` draws them (same mixture, seed, packer, condition
dropout, and truncation of conversations longer than a row). The documents of the padded
contenders are the pieces of those rows, cut at document boundaries, so every contender trains
on the very same token sequences. The rows of the warm-up steps give the Trainers' warm-up
documents (a first `trainer.train()`, optimizer kept); the rows of the timed steps give the
documents of their timed epoch. Over the timed steps, every contender therefore trains on
exactly the same useful tokens.

Same budget per step. A packed step holds `batch x seq_len` token slots. A padded step holds
`documents_per_step` documents: the timed documents over the timed steps, so on average a padded
step carries the same useful tokens as a packed one (its slots are its documents padded to the
longest of them). Fill is useful tokens over slots; padding is the rest.

Length grouping: `LengthGroupedSampler` sorts documents by length within windows of
min(documents / (4 x batch), 50) batches. On a real dataset the window is 50 batches; here the
timed epoch is `steps` batches, so the window is 50 only from 200 steps on, the default. With
fewer steps HF pads more than it would in a long run and the ratio flatters us (20 steps: a
5-batch window); the table says so.

Before any timing, the first step's rows are scored by our model (packed, document masks) and
by the HF model (the same documents padded): the token-mean losses must agree, so the
contenders compute the same function. The ratios use each contender's total useful tokens over
its total timed seconds; median, min and max are over the per-step rates. The contenders run
one after another, so the machine must be quiet: other load shows up as spread. The losses
shown are each loop's own report: ours divides by the step's label tokens, HF's by the tokens
it predicts (one fewer per document whose first token is a label).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm
from transformers import PrinterCallback, TrainerCallback

from mmllm.config import load_config, to_dict
from mmllm.data.packing import PackedRow
from mmllm.errors import MMLLMError
from mmllm.model import hf
from mmllm.model.loss import IGNORE_INDEX
from mmllm.model.mmllm import MMLLM
from mmllm.training.config import PretrainConfig, SourceConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRETRAIN_CONFIG = CONFIGS / "pretrain" / "toy.yaml"  # batch, seq_len, optimizer and threads of the benchmark
CONTENDERS = ("mmllm", "hf-padded", "hf-grouped", "raw")
PRECISIONS = ("fp32", "bf16-mixed")  # the ones every contender runs on a CPU
MIN_RATIO = {"hf-padded": 1.8, "hf-grouped": 1.15}  # the targets for mmllm / contender
MAX_LOOP_OVERHEAD = 0.10  # the target for 1 - mmllm / raw
# LengthGroupedSampler's window cap, in batches (transformers.trainer_pt_utils.get_length_grouped_indices)
GROUPING_WINDOW = 50
LOSS_TOLERANCE = 1e-4  # fp32 losses of the same documents, summed in another order, differ by ~1e-6
TOY_ITEMS_PER_TASK = 40  # 480 documents, ~95k tokens, pretokenized in ~20 s; longer runs see them again, reshuffled
TOY_TEXT_VOCAB = 512  # the demo's text tokenizer size: realistic document lengths on the toy world
CPU = torch.device("cpu")


@dataclass
class StepRecord:
    documents: int  # documents (pieces of documents, for packed rows) in the step
    useful_tokens: int  # tokens that are not padding
    slots: int  # token positions the step computed: rows x their length
    seconds: float
    loss: float


# ---------------------------------------------------------------- data


def build_toy_data(directory: Path, items_per_task: int = TOY_ITEMS_PER_TASK, seed: int = 0) -> tuple[Path, Path]:
    """A toy world, a tokenizer bundle (trained text tokenizer, random tiny modality tokenizers
    sized to configs/vocab/toy.yaml) and its pretokenized shards; returns (shards, bundle)."""
    from mmllm.data.interleaved import read_jsonl, record_texts
    from mmllm.data.pretokenize import TokenizerBundle, pretokenize
    from mmllm.data.toy_tasks import write_toyworld
    from mmllm.data.toyworld import caption_corpus
    from mmllm.text_tokenizer import fingerprint, train_text_tokenizer
    from mmllm.tokenizers import load_tokenizer
    from mmllm.vocab import VocabLayout, VocabSpec

    torch.manual_seed(seed)  # the random modality tokenizers' weights, hence their codes
    world = write_toyworld(directory / "world", items_per_task, seed)
    texts = caption_corpus(2000, seed)  # the demo's corpus: captions plus every text part of the world
    for record in read_jsonl(world["path"]):
        texts += record_texts(record)
    corpus = directory / "text.txt"
    corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
    text_tokenizer = train_text_tokenizer([corpus], directory / "text_tokenizer", vocab_size=TOY_TEXT_VOCAB)
    spec = load_config(VocabSpec, CONFIGS / "vocab" / "toy.yaml")
    layout = VocabLayout.build(
        len(text_tokenizer), spec.modality_ranges(), text_tokenizer_fingerprint=fingerprint(text_tokenizer)
    )
    # Untrained tokenizers of the toy layout's shapes: their codes are noise, their token counts are right.
    tokenizers = {
        "image": load_tokenizer("image-conv", channels=[8], strides=[8]),
        "audio": load_tokenizer("audio-codec", channels=[8, 8, 16]),
        "video": load_tokenizer("video-causal3d", channels=[8, 8, 16], strides=[2, 2, 2]),
        "action": load_tokenizer("action-bins"),
    }
    bundle = directory / "bundle"
    TokenizerBundle(layout, text_tokenizer, tokenizers).save(bundle)
    shards = directory / "shards"
    report = pretokenize(read_jsonl(world["path"]), Path(world["path"]).parent, bundle, shards, progress=False)
    if report.skipped:
        raise MMLLMError(f"pretokenize skipped {report.skipped} toy-world records: {report.failures[0]['error']}")
    return shards, bundle


def split_documents(rows: Sequence[PackedRow]) -> list[dict[str, list[int]]]:
    """The documents (pieces) of packed rows, in order, as `input_ids` and `labels` lists."""
    documents = []
    for row in rows:
        ids = row.document_ids[: row.real_tokens]
        bounds = [0, *(np.flatnonzero(np.diff(ids)) + 1).tolist(), row.real_tokens]
        for start, stop in itertools.pairwise(bounds):
            documents.append(
                {"input_ids": row.input_ids[start:stop].tolist(), "labels": row.labels[start:stop].tolist()}
            )
    return documents


def pad_documents(documents: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest document, as `DataCollatorForSeq2Seq(padding="longest")` does."""
    longest = max(len(d["input_ids"]) for d in documents)
    input_ids = torch.full((len(documents), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(documents), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(documents), longest), dtype=torch.long)
    for i, document in enumerate(documents):
        length = len(document["input_ids"])
        input_ids[i, :length] = torch.tensor(document["input_ids"])
        labels[i, :length] = torch.tensor(document["labels"])
        attention_mask[i, :length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class PaddingCollator:
    """The Trainers' collator: `pad_documents`, recording each batch's useful tokens and slots."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id
        self.batches: list[tuple[int, int, int]] = []  # (documents, useful tokens, slots)

    def __call__(self, documents: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        batch = pad_documents(documents, self.pad_id)
        self.batches.append((len(documents), int(batch["attention_mask"].sum()), batch["input_ids"].numel()))
        return batch


# ---------------------------------------------------------------- the benchmark


def bench_train(
    model: str | Path | None = None,
    steps: int = 200,
    warmup: int = 3,
    seq_len: int | None = None,
    batch: int | None = None,
    data: str | Path | None = None,
    vocab: str | Path | None = None,
    only: Sequence[str] | None = None,
    threads: int | None = None,
    toy_items: int | None = None,
    precision: str = "fp32",
    progress: bool = True,
) -> dict[str, Any]:
    """Train every selected contender (see the module docstring); figures, ratios and checks as a dict.

    `model`, `seq_len`, `batch` and `threads` default to configs/pretrain/toy.yaml's. Without
    `data` and `vocab` (a shard dir and its tokenizer bundle), a toy world of `toy_items` items
    per task (default TOY_ITEMS_PER_TASK) is built and pretokenized in a temporary dir first.
    """
    names = list(only or CONTENDERS)
    unknown = [name for name in names if name not in CONTENDERS]
    if unknown:
        raise MMLLMError(f"unknown contender '{unknown[0]}' (choose from {', '.join(CONTENDERS)})")
    if (data is None) != (vocab is None):
        raise MMLLMError("give --data and --vocab together (shards and the bundle they were written with), or neither")
    if steps < 1 or warmup < 0 or (threads is not None and threads < 1):
        raise MMLLMError(f"need steps >= 1, warmup >= 0 and threads >= 1; got {steps}, {warmup}, {threads}")
    if torch.cuda.is_available():
        raise MMLLMError("bench train compares CPU training; hide the GPU with CUDA_VISIBLE_DEVICES=")
    if precision not in PRECISIONS:
        raise MMLLMError(f"unknown precision '{precision}' (choose from {', '.join(PRECISIONS)})")
    with tempfile.TemporaryDirectory(prefix="mmllm-bench-train-") as scratch:
        work = Path(scratch)
        described = f"{data} ({vocab})"
        if data is None:
            toy_items = toy_items or TOY_ITEMS_PER_TASK
            data, vocab = build_toy_data(work / "toy", toy_items)
            described = f"generated toy world, {toy_items} items per task"
        base = load_config(PretrainConfig, PRETRAIN_CONFIG)
        config = dataclasses.replace(
            base,
            model=str(model or CONFIGS / "model" / "toy.yaml"),
            vocab=str(vocab),
            out=str(work / "mmllm"),
            data=dataclasses.replace(
                base.data,
                sources=(SourceConfig(str(data)),),
                validation=None,
                # Per-token averaging: what HF's Trainer and the raw loop compute, so the losses agree.
                packing=dataclasses.replace(
                    base.data.packing, seq_len=seq_len or base.data.packing.seq_len, loss_averaging="token"
                ),
            ),
            # Constant learning rate (one warm-up step, no decay): the Trainers' "constant" schedule.
            optim=dataclasses.replace(base.optim, warmup_steps=1, min_lr_ratio=1.0),
            steps=warmup + steps,
            micro_batch_size=batch or base.micro_batch_size,
            gradient_accumulation_steps=1,
            save_every=0,
            threads=threads or base.threads,
            precision=precision,
        )
        config.check()
        result = _run(config, names, warmup, work, progress)
        result["data"] = described
        return result


def _run(config: PretrainConfig, names: list[str], warmup: int, work: Path, progress: bool) -> dict[str, Any]:
    from mmllm.training.loop import RowStream, initial_model

    torch.set_num_threads(config.threads)
    initial = initial_model(config)  # seeded as train() seeds its model: the same initial weights
    if hf.export_architecture(initial.config) != "LlamaForCausalLM":
        raise MMLLMError("bench train compares against LlamaForCausalLM; use a Llama-shaped model config")
    rows = RowStream(config, initial).take(config.steps * config.micro_batch_size)
    split = warmup * config.micro_batch_size
    warmup_documents, timed_documents = split_documents(rows[:split]), split_documents(rows[split:])
    timed_steps = config.steps - warmup
    documents_per_step = max(1, round(len(timed_documents) / timed_steps))
    packed_loss, padded_loss = check_same_loss(initial, rows[: config.micro_batch_size], _hf_model(initial))
    pad_id = initial.layout.pad_id

    def trainer(name: str) -> list[StepRecord]:
        model = _hf_model(initial)
        return _train_hf(
            model, config, pad_id, warmup_documents, timed_documents, documents_per_step, name, work, progress
        )

    runs = {
        "mmllm": lambda: _train_mmllm(config, rows, work, progress)[warmup:],
        "raw": lambda: _train_raw(copy.deepcopy(initial), config, progress)[warmup:],
        "hf-padded": lambda: trainer("hf-padded"),  # the Trainers time their second train() only
        "hf-grouped": lambda: trainer("hf-grouped"),
    }
    contenders = {}
    for name in names:
        torch.set_num_threads(config.threads)
        contenders[name] = _summary(runs[name]())
    result: dict[str, Any] = {
        "benchmark": "training throughput (useful tokens/s)",
        "model": config.model,
        "parameters": initial.config.num_parameters(),
        "seq_len": config.data.packing.seq_len,
        "rows_per_step": config.micro_batch_size,
        "documents_per_step": documents_per_step,
        "documents_per_row": len(timed_documents) / (timed_steps * config.micro_batch_size),
        "grouping_window": min(max(1, len(timed_documents) // (4 * documents_per_step)), GROUPING_WINDOW),
        "steps": timed_steps,
        "warmup": warmup,
        "threads": config.threads,
        "precision": config.precision,
        "lr": config.optim.lr,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "deepspeed": version("deepspeed"),
        "checks": {"first_step_loss_packed": packed_loss, "first_step_loss_padded": padded_loss},
        "contenders": contenders,
    }
    result["ratios"] = _ratios(contenders)
    return result


def check_same_loss(model: MMLLM, rows: list[PackedRow], hf_model) -> tuple[float, float]:
    """Token-mean loss of `rows` packed (ours, document masks) and of their documents padded one
    per row (HF); raises when they disagree, since the contenders would then compute different things."""
    from mmllm.training.loop import collate
    from mmllm.training.objectives import get_objective

    with torch.no_grad():
        output = get_objective("next_token")(model, collate(rows, CPU), tuple(model.layout.modalities))
        packed = float(output.loss_sum / output.tokens)
        padded = float(hf_model(**pad_documents(split_documents(rows), model.layout.pad_id)).loss)
    if not abs(packed - padded) <= LOSS_TOLERANCE:
        raise MMLLMError(f"packed and padded losses disagree ({packed:.6f} vs {padded:.6f}); timing would mislead")
    return packed, padded


def _hf_model(model: MMLLM):
    """transformers' LlamaForCausalLM (SDPA attention) holding `model`'s weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**hf.config_to_hf(model.config, None))
    config.use_cache = False  # training: no KV cache to fill (HF builds one per forward otherwise)
    theirs = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()
    theirs.load_state_dict(model.state_dict())
    return theirs


# ---------------------------------------------------------------- contenders


def _train_mmllm(config: PretrainConfig, rows: list[PackedRow], work: Path, progress: bool) -> list[StepRecord]:
    """Our loop as `mmllm pretrain` runs it, in a process of its own, so DeepSpeed's process group
    and globals stay out of this one. Per-step seconds come from its log (real tokens over its
    tokens_per_s, timed from the top of the step to its end), so the final checkpoint write and
    the log writes are left out."""
    from mmllm.training.loop import LOG_FILE

    path = work / "pretrain.yaml"
    path.write_text(yaml.safe_dump(to_dict(dataclasses.replace(config, log_every=1))), encoding="utf-8")
    run = subprocess.run(
        [sys.executable, "-m", "mmllm", "pretrain", "--config", str(path)], capture_output=not progress, text=True
    )
    if run.returncode != 0:
        raise MMLLMError(f"mmllm pretrain exited with {run.returncode}: {(run.stderr or '')[-3000:]}")
    history = [json.loads(line) for line in (Path(config.out) / LOG_FILE).read_text().splitlines()]
    step_rows = [rows[i : i + config.micro_batch_size] for i in range(0, len(rows), config.micro_batch_size)]
    records = []
    for record, mine in zip(history, step_rows, strict=True):
        useful = sum(row.real_tokens for row in mine)
        slots = len(mine) * config.data.packing.seq_len
        seconds = useful / record["tokens_per_s"]
        records.append(StepRecord(len(split_documents(mine)), useful, slots, seconds, record["loss"]))
    return records


def _train_raw(model: MMLLM, config: PretrainConfig, progress: bool) -> list[StepRecord]:
    """`train()`'s step without DeepSpeed: same rows, objectives, normalisation, clipping, schedule."""
    from mmllm.training.loop import FreezePlan, RowStream, collate, forward_precision, lr_factor
    from mmllm.training.objectives import get_objective

    objectives = [get_objective(name) for name in config.objectives]
    modality_names = tuple(model.layout.modalities)
    stream = RowStream(config, model)
    optim = config.optim
    groups = FreezePlan(model, config).groups  # no stages: train()'s two groups, decay on matrices only
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    model.train()
    records = []
    for _ in tqdm(range(config.steps), desc="raw", disable=not progress):
        started = time.perf_counter()
        rows = stream.take(config.micro_batch_size)
        batch = collate(rows, CPU)
        step_tokens = float((batch["labels"] != IGNORE_INDEX).sum())  # train()'s normaliser
        with forward_precision(config, CPU):
            loss_sum = sum(objective(model, batch, modality_names).loss_sum for objective in objectives)
        (loss_sum / max(1.0, step_tokens)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started
        loss = float(loss_sum.detach()) / max(1.0, step_tokens)
        useful = sum(row.real_tokens for row in rows)
        slots = len(rows) * config.data.packing.seq_len
        records.append(StepRecord(len(split_documents(rows)), useful, slots, seconds, loss))
    return records


def _train_hf(
    hf_model,
    config: PretrainConfig,
    pad_id: int,
    warmup_documents: list[dict[str, list[int]]],
    timed_documents: list[dict[str, list[int]]],
    documents_per_step: int,
    name: str,
    work: Path,
    progress: bool,
) -> list[StepRecord]:
    """transformers' Trainer: one epoch over the warm-up documents, then a timed one over the timed ones."""
    from transformers import Trainer, TrainingArguments

    optim = config.optim
    args = TrainingArguments(
        output_dir=str(work / name),
        per_device_train_batch_size=documents_per_step,
        num_train_epochs=1,
        optim="adamw_torch",
        learning_rate=optim.lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.betas[0],
        adam_beta2=optim.betas[1],
        adam_epsilon=optim.eps,
        max_grad_norm=optim.grad_clip,
        bf16=config.precision == "bf16-mixed",  # on a CPU: autocast, fp32 weights, as ours
        lr_scheduler_type="constant",
        train_sampling_strategy="group_by_length" if name == "hf-grouped" else "random",
        logging_steps=1,  # every step's loss, for the report
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        disable_tqdm=True,  # StepTimer draws the bar: the Trainer's would print every step's log line
        seed=config.seed,
    )
    collator = PaddingCollator(pad_id)
    timer = StepTimer(collator, name if progress else None)
    trainer = Trainer(model=hf_model, args=args, data_collator=collator, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # it would print every step's log line
    for documents in (warmup_documents, timed_documents):
        if documents:
            trainer.train_dataset = documents
            trainer.train()  # the optimizer, with its moments, carries over to the next call
    return timer.records


class StepTimer(TrainerCallback):
    """Per optimizer step of the Trainer's latest `train()`: useful tokens and slots (from the
    collator), seconds from the previous step's end (the first: from its own start), and loss.
    With a `label`, a progress bar."""

    def __init__(self, collator: PaddingCollator, label: str | None) -> None:
        self.collator = collator
        self.label = label
        self.records: list[StepRecord] = []
        self.last_end: float | None = None
        self.bar: tqdm | None = None

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self.records, self.last_end = [], None
        self.collator.batches.clear()
        self.bar = tqdm(total=state.max_steps, desc=self.label, disable=self.label is None)

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        if self.last_end is None:
            self.last_end = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        now = time.perf_counter()
        documents, useful, slots = self.collator.batches[state.global_step - 1]  # collated in step order
        self.records.append(StepRecord(documents, useful, slots, now - self.last_end, math.nan))
        self.last_end = now
        self.bar.update(1)

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if logs and "loss" in logs:
            self.records[-1].loss = float(logs["loss"])

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self.bar.close()


# ---------------------------------------------------------------- figures


def _summary(records: list[StepRecord]) -> dict[str, Any]:
    useful = sum(r.useful_tokens for r in records)
    slots = sum(r.slots for r in records)
    rates = [r.useful_tokens / r.seconds for r in records]
    median = statistics.median(rates)
    return {
        "tokens_per_s": useful / sum(r.seconds for r in records),
        "median": median,
        "min": min(rates),
        "max": max(rates),
        "spread": (max(rates) - min(rates)) / median,
        "documents": sum(r.documents for r in records),
        "useful_tokens": useful,
        "slots": slots,
        "fill": useful / slots,
        "steps": [dataclasses.asdict(r) for r in records],
    }


def _ratios(contenders: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """mmllm / each Trainer (at least MIN_RATIO) and the loop's overhead 1 - mmllm / raw."""
    if "mmllm" not in contenders:
        return {}
    ours = contenders["mmllm"]["tokens_per_s"]
    ratios = {}
    for name, target in MIN_RATIO.items():
        if name in contenders:
            value = ours / contenders[name]["tokens_per_s"]
            ratios[f"mmllm/{name}"] = {"value": value, "target": target, "met": value >= target}
    if "raw" in contenders:
        overhead = 1 - ours / contenders["raw"]["tokens_per_s"]
        ratios["loop overhead"] = {"value": overhead, "target": MAX_LOOP_OVERHEAD, "met": overhead <= MAX_LOOP_OVERHEAD}
    return ratios


def format_train_bench(result: dict[str, Any]) -> str:
    rows = [
        f"training throughput: {Path(result['model']).name} ({result['parameters'] / 1e6:.1f}M params), "
        f"{result['threads']} thread(s), {result['precision']}, {result['steps']} timed steps after "
        f"{result['warmup']} warm-up, "
        f"data: {result['data']}",
        f"packed step: {result['rows_per_step']} rows x {result['seq_len']} tokens "
        f"({result['documents_per_row']:.1f} documents per row); padded step: {result['documents_per_step']} documents",
        f"{'contender':<11} {'tokens/s':>9} {'median':>9} {'min':>9} {'max':>9} {'spread':>7} "
        f"{'fill':>6} {'useful':>9} {'loss first':>10} {'last':>7}",
    ]
    for name, c in result["contenders"].items():
        first, last = c["steps"][0]["loss"], c["steps"][-1]["loss"]
        rows.append(
            f"{name:<11} {c['tokens_per_s']:>9.0f} {c['median']:>9.0f} {c['min']:>9.0f} {c['max']:>9.0f} "
            f"{c['spread']:>6.1%} {c['fill']:>6.1%} {c['useful_tokens']:>9} {first:>10.4f} {last:>7.4f}"
        )
    for name, r in result["ratios"].items():
        verdict = "met" if r["met"] else "NOT met"
        if name == "loop overhead":
            rows.append(f"{name} 1 - mmllm/raw: {r['value']:.1%} (target <= {r['target']:.0%}: {verdict})")
        else:
            rows.append(f"{name}: {r['value']:.2f}x (target >= {r['target']:.2f}x: {verdict})")
    window = result["grouping_window"]
    if "hf-grouped" in result["contenders"] and window < GROUPING_WINDOW:
        rows.append(
            f"hf-grouped sorted within {window}-batch windows, {GROUPING_WINDOW} in a long run: it pads more "
            f"here than there; give --steps {4 * GROUPING_WINDOW} or more for its real figure"
        )
    checks = result["checks"]
    rows.append(
        f"same function: first step's loss {checks['first_step_loss_packed']:.6f} packed (ours) vs "
        f"{checks['first_step_loss_padded']:.6f} padded (HF), initial weights"
    )
    return "\n".join(rows)
