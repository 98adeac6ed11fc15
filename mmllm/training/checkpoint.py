"""Training checkpoints: atomic, self-contained, rotated, resumable.

    OUT/checkpoints/step-000100/
        model/              a self-contained `MMLLM.from_pretrained` dir (weights gathered from every rank)
        deepspeed/          DeepSpeed's engine state: optimizer, LR schedule, per-rank partitions
        trainer_state.json  step, rows consumed, non-finite counter, and each rank's RNG state
    OUT/checkpoints/latest  the name of the newest complete checkpoint

Every rank writes into `.step-000100.tmp/`; after a barrier rank 0 renames it into place and
then updates `latest` (write + rename). A crash at any point leaves the previous checkpoint
and `latest` intact. Only the newest `keep_last` step checkpoints are kept.
"""

from __future__ import annotations

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
        (tmp / STATE_FILE).write_text(json.dumps({**trainer_state, "ranks": states}) + "\n")
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


def load_checkpoint(engine, path: Path) -> dict[str, Any]:
    """Restore the engine (weights, optimizer, LR schedule) and this rank's RNG; returns the trainer state."""
    load_path, _ = engine.load_checkpoint(str(path / ENGINE_DIR), tag=ENGINE_TAG)
    if load_path is None:
        raise CheckpointError(f"{path}: DeepSpeed could not load its engine state")
    state = json.loads((path / STATE_FILE).read_text())
    ranks = state.pop("ranks")
    rank = _rank()
    if rank < len(ranks):  # resuming on more ranks than saved: the new ranks keep their seeded RNG
        set_rng_state(ranks[rank]["rng"])
    return state


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
