"""The pretraining loop: a plain loop on the DeepSpeed engine (ARCHITECTURE decision 5).

    deepspeed train/pretrain.py --config configs/pretrain/toy.yaml [--deepspeed configs/deepspeed/zero2.json]
    python train/pretrain.py ...        (one process)
    mmllm pretrain ...

One step = `gradient_accumulation_steps` micro-batches of `micro_batch_size` packed rows on
every rank. Rows are numbered globally and dealt to ranks in order, so the rows a step sees
depend only on the global batch: two ranks with micro-batch 4 train on exactly the rows one
rank with micro-batch 8 does. The loss of every objective is normalised by the target tokens
of the whole step (summed over ranks and micro-batches, one all-reduce), so the gradients
match too, up to the order of floating-point sums.

Each step is guarded: a non-finite loss on any rank skips the step's update. The bad
micro-batch contributes a zero gradient and the step's learning rate is 0, so no parameter
moves (Adam's moments still see the step's finite micro-batches). The step is counted, and the
run stops after `max_nonfinite` in a row.

Resume (`--resume`) restores the engine (weights, optimizer, LR schedule), RNG states, and the
data position: packing is deterministic, so the rows already trained on are regenerated and
skipped. The position counts global rows, so a run may resume on another number of ranks
(`mmllm.training.checkpoint`); with micro-batch x accumulation x ranks unchanged, its steps see
the same rows.

Freeze stages (`stages:` in the YAML, `FreezePlan`) train only some parts for a number of steps:
Anole's recipe trains the new vocabulary rows and the norms of an imported model first.

`ModelHooks` say what is trained and what checkpoints keep: pretraining's by default; finetuning
(`mmllm.training.finetune`) wraps the model with LoRA before DeepSpeed and keeps the adapter.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from mmllm.config import to_dict
from mmllm.data.packing import Mixture, PackedRow, Packer
from mmllm.data.pretokenize import ShardDocuments, TokenizerBundle, load_shards
from mmllm.errors import CheckpointError, ConfigError, MMLLMError
from mmllm.model.backbone import RMSNorm
from mmllm.model.code_init import init_code_rows
from mmllm.model.config import ModelConfig
from mmllm.model.mmllm import MMLLM
from mmllm.model.weights import atomic_directory
from mmllm.training.checkpoint import (
    MODEL_DIR,
    latest_checkpoint,
    load_checkpoint,
    needs_universal_load,
    save_checkpoint,
)
from mmllm.training.config import PretrainConfig, StageConfig
from mmllm.training.deepspeed_config import load_deepspeed_config, resolve_deepspeed_config, zero_stage
from mmllm.training.launch import free_port
from mmllm.training.objectives import get_objective

logger = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"
ROW_FIELDS = ("input_ids", "labels", "position_ids", "document_ids", "loss_weights", "modality")
# Peak dense bf16 matmul throughput per device, for the MFU estimate (vendor datasheets).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    model_dir: Path
    nonfinite_skipped: int
    rank: int
    history: list[dict[str, Any]] = field(default_factory=list)
    engine: Any = None  # the DeepSpeed engine, for callers that go on using the trained model


# ---------------------------------------------------------------- distributed set-up


def setup_distributed() -> torch.device:
    """Initialise torch.distributed for DeepSpeed: the launcher's env, or a 1-process group."""
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    if "RANK" not in os.environ:  # plain `python train/pretrain.py`: a group of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
        if not cuda:
            _unlink_shared_memory_buffer()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _unlink_shared_memory_buffer() -> None:
    """Remove the name of this rank's DeepSpeed CPU all-reduce buffer from /dev/shm.

    Under the launcher, DeepSpeed's CPU backend creates one 69 MB shared-memory buffer per rank
    (named after MASTER_ADDR, MASTER_PORT and the rank), maps every rank's, and never unlinks
    them: each run left its buffers in /dev/shm until the machine ran out of memory. Once every
    rank is past `init_distributed` (the barrier), all of them are mapped, so the names can go;
    the memory is then freed when the ranks exit, even after kill -9.
    """
    if dist.get_world_size() > 1:
        dist.barrier()
    address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_{dist.get_rank()}"
    (Path("/dev/shm") / name).unlink(missing_ok=True)


def shutdown_distributed() -> None:
    """Destroy the process group once every rank is done with it.

    Call it after a run that succeeded: a gloo group left for interpreter shutdown can abort a
    rank with "terminate called without an active exception" while its worker threads still
    hold tensors. After an error, skip it: the other ranks may be inside a collective.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------- model, optimizer, schedule


def build_model(config: PretrainConfig) -> MMLLM:
    """A fresh model for the bundle's layout, a checkpoint to continue, or a HF model extended."""
    bundle = TokenizerBundle.load(config.vocab) if config.vocab else None
    if config.init_from_hf:
        model = MMLLM.from_pretrained(config.init_from_hf, text_tokenizer=bundle.text_tokenizer if bundle else None)
        if bundle is None:
            raise ConfigError("init_from_hf needs `vocab`: the layout built for that model's text tokenizer")
        model.extend_vocab(bundle.layout, seed=config.seed)
    elif Path(config.model).is_dir():
        model = MMLLM.from_pretrained(config.model)
    else:
        model = MMLLM.from_config(ModelConfig.from_yaml(config.model), bundle.layout, bundle.text_tokenizer)
    if bundle is not None:
        for name, tokenizer in bundle.modality_tokenizers.items():
            model.set_modality_tokenizer(name, tokenizer)
        if config.code_row_init > 0 and not Path(config.model).is_dir():
            init_code_rows(model, bundle.modality_tokenizers, config.code_row_init, config.seed)
    if model.layout is None:
        raise ConfigError(f"{config.model}: the model has no vocab layout; give `vocab` to build one")
    model.model.activation_checkpointing = config.activation_checkpointing
    return model


class ModelHooks:
    """What a run trains and what its checkpoints keep. These defaults are pretraining's: the model
    itself, saved as a self-contained dir. Finetuning (`mmllm.training.finetune`) overrides them."""

    output = MODEL_DIR  # the final checkpoint's `output` dir is published as OUT/<output>

    def prepare(self, model: MMLLM, config: PretrainConfig) -> MMLLM:
        """The module to train, made from the built model before the optimizer and `deepspeed.initialize`
        (LoRA injects its adapters here, so they are the parameters DeepSpeed and AdamW see)."""
        return model

    def saved(self, model: MMLLM) -> Any:
        """What each checkpoint saves: an object with `parameters()` (gathered first under ZeRO-3) and
        `save_pretrained(CHECKPOINT/model)`."""
        return model


def initial_model(config: PretrainConfig, hooks: ModelHooks | None = None) -> MMLLM:
    """The model a run starts from (seeded as `train` seeds it), so tests can compare against it."""
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    return (hooks or ModelHooks()).prepare(build_model(config), config)


def lr_factor(step: int, config: PretrainConfig) -> float:
    """Linear warmup, then cosine decay to `min_lr_ratio` of the peak."""
    optim = config.optim
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    progress = min(1.0, (step - optim.warmup_steps) / max(1, config.steps - optim.warmup_steps))
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------- freeze stages

FULL, ROWS, FROZEN = "full", "rows", "frozen"  # how much of a tensor learns in a stage
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


class FreezePlan:
    """Which tensors (or rows) learn in each stage, and the AdamW groups that make it exact.

    Every parameter keeps `requires_grad`, so DeepSpeed's ZeRO partitions and hooks stay as they
    were built; freezing acts on gradients and on the optimizer instead. Parameters are grouped
    by their status in every stage (and by weight decay), so each group is frozen or not as a
    whole:

    - a frozen tensor's gradient is zeroed (it adds nothing to the clipping norm) and its group's
      learning rate is 0 for the stage, which leaves it bit-identical whatever its Adam moments
      from an earlier stage or its weight decay;
    - "new_rows" is a row slice of the embedding and head (the same tensor when tied). A hook
      zeroes the gradient of the rows below `layout.base_rows`; the group's weight decay is 0 for
      the stage (AdamW would shrink the frozen rows otherwise), and when the stage begins the
      frozen rows' Adam moments are reset (they may hold momentum from an earlier stage). Zero
      gradient and zero moments make AdamW's update of those rows exactly 0. The new rows are
      therefore not decayed during such a stage either.

    Without `stages` the whole run is one "all" stage: two groups, no hooks.
    """

    def __init__(self, model: MMLLM, config: PretrainConfig) -> None:
        self.stages = config.stages or (StageConfig(train=("all",)),)
        self.starts = [0]
        for stage in self.stages[:-1]:
            self.starts.append(self.starts[-1] + stage.steps)
        self.frozen_rows = model.layout.base_rows  # the rows the base model had: text (+ its padding)
        self.row_width = model.config.hidden_size
        self.params = [p for p in model.parameters() if p.requires_grad]  # tied weights once
        vocab = {id(model.model.embed_tokens.weight), id(model.lm_head.weight)}
        whole = {
            "all": {id(p) for p in self.params},
            "embeddings": {id(model.model.embed_tokens.weight)},
            "head": {id(model.lm_head.weight)},
            "norms": {id(p) for m in model.modules() if isinstance(m, RMSNorm) for p in m.parameters()},
            "layers": {id(p) for p in model.model.layers.parameters()},
        }

        def status(param: torch.nn.Parameter, stage: StageConfig) -> str:
            if any(id(param) in whole[name] for name in stage.train if name in whole):
                return FULL
            return ROWS if "new_rows" in stage.train and id(param) in vocab else FROZEN

        self.status = [tuple(status(p, stage) for stage in self.stages) for p in self.params]
        self.current = 0  # the stage being trained; the gradient hooks read it
        self.groups: list[dict[str, Any]] = []
        self.group_status: list[tuple[str, ...]] = []
        self.group_decay: list[float] = []
        keys: dict[tuple[bool, tuple[str, ...]], int] = {}
        for param, statuses in zip(self.params, self.status, strict=True):
            decays = param.ndim >= 2  # AdamW decays matrices, not norms and biases (GPT-3, LLaMA)
            key = (decays, statuses)
            if key not in keys:
                keys[key] = len(self.groups)
                decay = config.optim.weight_decay if decays else 0.0
                self.groups.append({"params": [], "weight_decay": decay})
                self.group_status.append(statuses)
                self.group_decay.append(decay)
            self.groups[keys[key]]["params"].append(param)
        for index, (param, statuses) in enumerate(zip(self.params, self.status, strict=True)):
            if any(s != FULL for s in statuses):
                param.register_hook(self._gradient_mask(index))

    def stage_at(self, step: int) -> int:
        """The stage that trains optimizer step `step` (0-based); past the end, the last one."""
        return max(i for i, start in enumerate(self.starts) if start <= step)

    def lr_scale(self, group: int, step: int) -> float:
        return 0.0 if self.group_status[group][self.stage_at(step)] == FROZEN else 1.0

    def _gradient_mask(self, index: int):
        def mask(grad: torch.Tensor) -> torch.Tensor | None:
            status = self.status[index][self.current]
            if status == FULL:
                return None
            if status == FROZEN:
                return torch.zeros_like(grad)  # not grad * 0: a NaN gradient would stay NaN
            kept = grad.clone()
            kept[: self.frozen_rows] = 0
            return kept

        return mask

    def enter(self, stage: int, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Start training `stage` at `step` (also on resume): decay and moments as described above."""
        self.current = stage
        for group, statuses, decay in zip(optimizer.param_groups, self.group_status, self.group_decay, strict=True):
            group["weight_decay"] = 0.0 if statuses[stage] == ROWS else decay
        if step > 0:  # before the first step every moment is still zero
            for param, statuses in zip(self.params, self.status, strict=True):
                if statuses[stage] == ROWS:
                    self._reset_frozen_row_moments(param, optimizer)
        if len(self.stages) > 1:
            logger.info("step %d: stage %d trains %s", step, stage, ", ".join(self.stages[stage].train))

    def _reset_frozen_row_moments(self, param: torch.nn.Parameter, optimizer: torch.optim.Optimizer) -> None:
        from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_optimizer_state

        frozen = self.frozen_rows * self.row_width
        partitioned = hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")  # ZeRO-3, or ZeRO-1/2 and bf16
        for key in ADAM_MOMENTS:
            if partitioned:  # a collective: every rank gathers the full state, keeps its own part
                full = safe_get_full_optimizer_state(param, key)
                full.view(-1)[:frozen] = 0
                safe_set_full_optimizer_state(param, full, key)
            else:
                optimizer.state[param][key].view(-1)[:frozen] = 0


# ---------------------------------------------------------------- data


class RowStream:
    """The run's packed rows in global order; this rank takes its share of each step."""

    def __init__(self, config: PretrainConfig, model: MMLLM) -> None:
        sources = [ShardDocuments(load_shards(s.path, model.layout), i) for i, s in enumerate(config.data.sources)]
        self.mixture = Mixture(sources, [s.weight for s in config.data.sources], config.seed)
        self.packer = Packer(config.data.packing, model.layout)
        self.rows: Iterator[PackedRow] = self.packer.rows(iter(self.mixture))
        self.consumed = 0

    def skip(self, count: int) -> None:
        for _ in range(count):
            next(self.rows)
        self.consumed = count

    def take(self, count: int) -> list[PackedRow]:
        rows = [next(self.rows) for _ in range(count)]
        self.consumed += count
        return rows


def collate(rows: list[PackedRow], device: torch.device) -> dict[str, torch.Tensor]:
    batch = {name: torch.from_numpy(np.stack([getattr(r, name) for r in rows])) for name in ROW_FIELDS}
    batch["modality"] = batch["modality"].long()
    return {k: v.to(device) for k, v in batch.items()}


def validation_rows(config: PretrainConfig, model: MMLLM) -> list[PackedRow]:
    """The first `validation_rows` rows of the validation set, packed without condition dropout."""
    if config.data.validation is None:
        return []
    documents = ShardDocuments(load_shards(config.data.validation, model.layout))
    packer = Packer(dataclasses.replace(config.data.packing, condition_dropout=0.0), model.layout)
    rows = packer.rows(documents[i] for i in range(len(documents)))
    return [row for _, row in zip(range(config.data.validation_rows), rows, strict=False)]


# ---------------------------------------------------------------- the loop


def train(
    config: PretrainConfig,
    deepspeed_config: str | None = None,
    resume: bool = False,
    progress: bool = True,
    hooks: ModelHooks | None = None,
) -> TrainResult:
    hooks = hooks or ModelHooks()
    device = setup_distributed()
    import deepspeed

    rank, world = dist.get_rank(), dist.get_world_size()
    if device.type == "cpu":
        torch.set_num_threads(config.threads)
    if config.precision == "bf16" and device.type != "cuda":
        raise ConfigError("precision bf16 needs a GPU; use bf16-mixed or fp32 on CPU")
    resolved = resolve_deepspeed_config(load_deepspeed_config(deepspeed_config), config, world)
    objectives = [get_objective(name) for name in config.objectives]
    out = Path(config.out)
    found = latest_checkpoint(out) if resume else None
    if found is not None and needs_universal_load(found, world):
        if zero_stage(resolved) == 0:
            raise CheckpointError(
                f"{found} holds ZeRO-partitioned optimizer state of another number of ranks; "
                "resume it with a ZeRO-1/2/3 DeepSpeed config"
            )
        # The engine reads the optimizer state from a universal checkpoint (load_checkpoint).
        resolved["checkpoint"] = {**resolved.get("checkpoint", {}), "load_universal": True}

    model = initial_model(config, hooks)
    saved = hooks.saved(model)
    modality_names = tuple(model.layout.modalities)
    stream = RowStream(config, model)
    validation = validation_rows(config, model)
    plan = FreezePlan(model, config)
    if config.compile:
        model = torch.compile(model)
    optimizer = torch.optim.AdamW(
        plan.groups,
        lr=config.optim.lr,
        betas=config.optim.betas,
        eps=config.optim.eps,
        fused=device.type == "cuda",
    )
    schedules = [
        lambda step, group=group: lr_factor(step, config) * plan.lr_scale(group, step)
        for group in range(len(plan.groups))
    ]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=resolved)
    step, nonfinite_total, nonfinite_run = 0, 0, 0
    if found is not None:
        state = load_checkpoint(engine, found)
        step, nonfinite_total = state["step"], state["nonfinite_skipped"]
        stream.skip(state["rows_consumed"])
    plan.enter(plan.stage_at(step), step, optimizer)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"pretrain": to_dict(config), "deepspeed": resolved}, indent=1))
    log = _Logger(out, rank == 0, model_flops_per_token(model, config.data.packing.seq_len), device)
    rows_per_micro = config.micro_batch_size
    bar = tqdm(total=config.steps, initial=step, desc="pretrain", disable=not (progress and rank == 0))
    history: list[dict[str, Any]] = []
    last_loss = float("nan")
    while step < config.steps:
        if plan.stage_at(step) != plan.current:
            plan.enter(plan.stage_at(step), step, optimizer)
        started = time.perf_counter()
        global_rows = stream.take(rows_per_micro * world * config.gradient_accumulation_steps)
        micro_batches = [
            collate(global_rows[(m * world + rank) * rows_per_micro : (m * world + rank + 1) * rows_per_micro], device)
            for m in range(config.gradient_accumulation_steps)
        ]
        step_tokens = _all_reduce(sum(float((b["labels"] != -100).sum()) for b in micro_batches), device)
        sums: dict[str, float] = {}
        finite = True
        for m, batch in enumerate(micro_batches):
            with forward_precision(config, device):
                loss, micro_sums = _micro_step(engine, objectives, batch, modality_names, step_tokens, world, config)
            finite = finite and bool(_all_reduce(float(torch.isfinite(loss)), device, op="min"))
            for key, value in micro_sums.items():
                sums[key] = sums.get(key, 0.0) + value
            # A skipped micro-batch still runs a backward, of an exact zero through a one-token
            # forward, so every rank and ZeRO stage sees the usual gradient hooks fire.
            if not finite:
                with forward_precision(config, device):
                    loss = _zero_loss(engine, batch)
            engine.backward(loss)
            if not finite and m == len(micro_batches) - 1:
                # Skip the update: learning rate 0 for this optimizer step only (the schedule
                # sets the next step's rate afterwards, as usual).
                for group in engine.optimizer.param_groups:
                    group["lr"] = 0.0
            engine.step()
        if not finite:
            nonfinite_total += 1
            nonfinite_run += 1
            if nonfinite_run >= config.max_nonfinite:
                raise MMLLMError(f"{nonfinite_run} non-finite losses in a row at step {step}; stopping the run")
        else:
            nonfinite_run = 0
        step += 1
        reduced = {k: _all_reduce(v, device) for k, v in sorted(sums.items())}
        last_loss = reduced["loss_sum"] / max(1.0, step_tokens)
        record = log.step_record(step, reduced, step_tokens, rows_per_micro, global_rows, engine, started, not finite)
        history.append(record)
        if rank == 0 and (step % config.log_every == 0 or step == config.steps):
            log.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.4f}")
        if validation and config.eval_every and step % config.eval_every == 0:
            with forward_precision(config, device):
                log.write({"step": step, "val_loss": evaluate(engine, validation, device, objectives, modality_names)})
        if config.save_every and step % config.save_every == 0 and step < config.steps:
            save_checkpoint(engine, saved, out, step, _state(step, stream, nonfinite_total), config.keep_last)
    bar.close()
    if validation:
        with forward_precision(config, device):
            log.write({"step": step, "val_loss": evaluate(engine, validation, device, objectives, modality_names)})
    log.close()
    final = save_checkpoint(engine, saved, out, step, _state(step, stream, nonfinite_total), config.keep_last)
    model_dir = out / hooks.output
    if rank == 0:
        _publish_model(final / hooks.output, model_dir)
    dist.barrier()
    return TrainResult(step, last_loss, model_dir, nonfinite_total, rank, history, engine)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 dot products in hardware (AVX-512 BF16 or AMX), where
    bf16-mixed training is faster than fp32; elsewhere it is emulated and slower."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own (inductor's) checks
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def forward_precision(config: PretrainConfig, device: torch.device) -> torch.autocast:
    """The context of a training forward: `bf16-mixed` runs it under bf16 autocast (matmuls in
    bf16; weights, gradients, optimizer state and the loss's softmax stay fp32), else a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16-mixed")


def _micro_step(engine, objectives, batch, modality_names, step_tokens, world, config):
    """Loss of one micro-batch, scaled so DeepSpeed's averaging yields the step's token mean."""
    loss_sum = None
    sums: dict[str, float] = {}
    for objective in objectives:
        output = objective(engine, batch, modality_names)
        loss_sum = output.loss_sum if loss_sum is None else loss_sum + output.loss_sum
        for key, value in output.sums.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    sums["loss_sum"] = float(loss_sum.detach())
    # DeepSpeed divides by the accumulation steps and averages over ranks; undo both.
    scale = world * config.gradient_accumulation_steps / max(1.0, step_tokens)
    return loss_sum * scale, sums


def _zero_loss(engine, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return engine(input_ids=batch["input_ids"][:, :1]).logits.sum() * 0.0


@torch.no_grad()
def evaluate(engine, rows: list[PackedRow], device, objectives, modality_names) -> float:
    """Mean next-token loss over the validation rows, dealt over ranks."""
    engine.eval()
    rank, world = dist.get_rank(), dist.get_world_size()
    total, tokens = 0.0, 0.0
    for start in range(0, len(rows), world):
        mine = rows[start + rank : start + rank + 1]
        if not mine:  # keep collectives (ZeRO-3 gathers) in step: score a row, count nothing
            mine, weight = rows[:1], 0.0
        else:
            weight = 1.0
        batch = collate(mine, device)
        for objective in objectives:
            output = objective(engine, batch, modality_names)
            total += weight * float(output.loss_sum)
            tokens += weight * float(output.tokens)
    engine.train()
    return _all_reduce(total, device) / max(1.0, _all_reduce(tokens, device))


def _all_reduce(value: float, device: torch.device, op: str = "sum") -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.SUM)
    return float(tensor)


def _state(step: int, stream: RowStream, nonfinite: int) -> dict[str, Any]:
    return {"step": step, "rows_consumed": stream.consumed, "nonfinite_skipped": nonfinite}


def _publish_model(source: Path, model_dir: Path) -> None:
    """Copy the final checkpoint's model (or adapter) dir to OUT/model (OUT/adapter) atomically."""
    with atomic_directory(model_dir) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)


def model_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token, as PaLM's MFU counts them (Chowdhery et al. 2022, appendix B):
    6 x the parameters that multiply (all but the input embedding) + 12 x layers x width x seq_len
    for attention scores and values."""
    config = model.config
    params = sum(p.numel() for p in model.parameters())
    if not config.tie_word_embeddings:
        params -= config.vocab_size * config.hidden_size  # an embedding lookup is not a matmul
    return 6.0 * params + 12.0 * config.num_hidden_layers * config.hidden_size * seq_len


class _Logger:
    """JSONL (and TensorBoard when installed) on rank 0."""

    def __init__(self, out: Path, active: bool, flops_per_token: float, device: torch.device) -> None:
        self.active = active
        self.path = out / LOG_FILE
        self.began = time.perf_counter()  # wall time of this process's run, for score-vs-minutes curves
        self.flops_per_token = flops_per_token
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
        self.peak = next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)
        self.tensorboard = None
        if active:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(out / "tensorboard"))
            except ImportError:  # tensorboard is optional
                pass

    def step_record(self, step, sums, step_tokens, rows_per_micro, rows, engine, started, skipped):
        seconds = time.perf_counter() - started
        real = sum(r.real_tokens for r in rows)
        tokens_per_s = real / seconds
        record = {
            "step": step,
            "loss": sums["loss_sum"] / max(1.0, step_tokens),
            "lr": engine.get_lr()[0],
            "grad_norm": _grad_norm(engine),
            "tokens_per_s": round(tokens_per_s, 1),
            "mfu": round(tokens_per_s * self.flops_per_token / (self.peak * dist.get_world_size()), 4)
            if self.peak
            else None,
            "skipped": skipped,
            "elapsed_s": round(time.perf_counter() - self.began, 2),
        }
        for key, value in sums.items():
            if key.startswith("loss/") and not key.endswith("_tokens"):
                count = sums[f"{key}_tokens"]
                if count:
                    record[key] = value / count
        return record

    def write(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()  # flushes the event file


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)
