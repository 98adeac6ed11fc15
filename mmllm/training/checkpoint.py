"""Training checkpoints: atomic, self-contained, rotated, resumable.

    OUT/checkpoints/step-000100/
        model/              a self-contained `MMLLM.from_pretrained` dir (weights gathered from every rank)
        deepspeed/          DeepSpeed's engine state: optimizer, LR schedule, per-rank partitions
        trainer_state.json  step, rows consumed, non-finite counter, and each rank's RNG state
    OUT/checkpoints/latest  the name of the newest complete checkpoint

Every rank writes into `.step-000100.tmp/`; after a barrier rank 0 renames it into place and
then updates `latest` (write + rename). A crash at any point leaves the previous checkpoint
and `latest` intact. Only the newest `keep_last` step checkpoints are kept.

Resuming on another number of ranks: under ZeRO-1/2/3 each rank saved only its partition of
the fp32 weights and Adam moments. Rank 0 then converts `deepspeed/` into a DeepSpeed universal
checkpoint (one file per parameter and state, `deepspeed.checkpoint.ds_to_universal`) beside the
checkpoint, the engine (built with `checkpoint.load_universal`) repartitions it for the new
ranks, and the conversion is deleted. Weights, moments, Adam's step and the LR schedule carry
over exactly. A ZeRO-0 checkpoint holds the whole optimizer once, so any number of ranks loads it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mmllm.errors import CheckpointError

LATEST_FILE = "latest"
STATE_FILE = "trainer_state.json"
MODEL_DIR = "model"
ENGINE_DIR = "deepspeed"
ENGINE_TAG = "state"
PARTITIONED_OPTIMIZER_FILES = "*_optim_states.pt"  # DeepSpeed's per-rank ZeRO optimizer partitions


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def rng_state() -> dict[str, Any]:
    """This process's RNG states as JSON-able data."""
    state = {
        "python": _jsonable(random.getstate()),
        "numpy": _jsonable(np.random.get_state()),
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def save_checkpoint(engine, model, out: Path, step: int, trainer_state: dict[str, Any], keep_last: int) -> Path:
    """Write checkpoint `step` from every rank (a collective call); returns its final path."""
    root = out / "checkpoints"
    final = root / checkpoint_name(step)
    tmp = root / f".{checkpoint_name(step)}.tmp"
    rank, world = _rank(), _world()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a crashed save
        tmp.mkdir(parents=True)
    _barrier()
    engine.save_checkpoint(str(tmp / ENGINE_DIR), tag=ENGINE_TAG)
    states = [None] * world
    mine = {"rank": rank, "rng": rng_state()}
    if world > 1:
        dist.all_gather_object(states, mine)
    else:
        states = [mine]
    _save_model(engine, model, tmp / MODEL_DIR)
    if rank == 0:
        (tmp / STATE_FILE).write_text(json.dumps({**trainer_state, "world_size": world, "ranks": states}) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_latest(root, final.name)
        _rotate(root, keep_last)
    _barrier()
    return final


def _save_model(engine, model, path: Path) -> None:
    """The self-contained model dir; under ZeRO-3 the partitioned weights are gathered first."""
    if engine.zero_optimization_partition_weights():
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            if _rank() == 0:
                model.save_pretrained(path)
    elif _rank() == 0:
        model.save_pretrained(path)


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST_FILE}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / LATEST_FILE)


def _rotate(root: Path, keep_last: int) -> None:
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint under `out`, or None when there is none."""
    pointer = out / "checkpoints" / LATEST_FILE
    if not pointer.is_file():
        return None
    path = out / "checkpoints" / pointer.read_text().strip()
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is incomplete; delete it to resume from scratch")
    return path


def needs_universal_load(path: Path, world: int) -> bool:
    """Whether checkpoint `path` holds ZeRO optimizer partitions of another number of ranks."""
    state = json.loads((path / STATE_FILE).read_text())
    saved_world = state.get("world_size", len(state["ranks"]))
    partitioned = any((path / ENGINE_DIR / ENGINE_TAG).glob(PARTITIONED_OPTIMIZER_FILES))
    return partitioned and saved_world != world


def load_checkpoint(engine, path: Path) -> dict[str, Any]:
    """Restore the engine (weights, optimizer, LR schedule) and this rank's RNG; returns the trainer state."""
    if engine.load_universal_checkpoint():
        load_path = _load_universal(engine, path)
    else:
        load_path, _ = engine.load_checkpoint(str(path / ENGINE_DIR), tag=ENGINE_TAG)
    if load_path is None:
        raise CheckpointError(f"{path}: DeepSpeed could not load its engine state")
    state = json.loads((path / STATE_FILE).read_text())
    ranks = state.pop("ranks")
    rank = _rank()
    if rank < len(ranks):  # resuming on more ranks than saved: the new ranks keep their seeded RNG
        set_rng_state(ranks[rank]["rng"])
    return state


def _load_universal(engine, path: Path) -> str | None:
    """Convert `path`'s engine state to a universal checkpoint (rank 0), load it, delete it."""
    universal = path.parent / f".{path.name}.universal"
    if _rank() == 0:
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        shutil.rmtree(universal, ignore_errors=True)  # a leftover of a crashed resume
        universal.mkdir()
        ds_to_universal(
            argparse.Namespace(
                input_folder=str(path / ENGINE_DIR / ENGINE_TAG),
                output_folder=str(universal / ENGINE_TAG),
                num_extract_workers=1,  # 1: in this process; no worker processes inside a rank
                num_merge_workers=1,
                keep_temp_folder=False,
                strict=True,
                inject_missing_state=True,  # our engine does not record universal-checkpoint metadata
            )
        )
    _barrier()
    load_path, _ = engine.load_checkpoint(str(universal), tag=ENGINE_TAG)
    if engine.zero_optimization_partition_weights():
        _repair_zero3_universal_load(engine)
    _barrier()
    if _rank() == 0:
        shutil.rmtree(universal)
    return load_path


def _repair_zero3_universal_load(engine) -> None:
    """Undo two slips of DeepSpeed's ZeRO-3 universal load, so the run continues exactly.

    It gives every AdamW group the first group's hyperparameters, so frozen groups (learning
    rate 0) would move for a step: each group gets its learning rate back from the restored
    schedule (weight decay is set per stage by the loop's FreezePlan after loading; betas and eps
    are the same in every group). And it hands all groups one shared `step` tensor, which AdamW
    increments in place once per group, so Adam's bias correction would run ahead: each group
    gets its own copy.
    """
    for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr(), strict=True):
        group["lr"] = lr
    for state in engine.optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
