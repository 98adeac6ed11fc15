"""Launched by the distributed tests under `deepspeed`: train, then report losses and weights.

    deepspeed --num_gpus N tests/ds_worker.py CONFIG.yaml DS.json|- OUT.json [--resume] [KEY=VALUE ...]

Rank 0 writes OUT.json: the per-step losses, and every rank's SHA-256 of the full parameters
(gathered under ZeRO-3), so a test can compare runs and check that ranks agree. An objective
`slow_next_token` (next_token, then a pause from step `SLOW_AFTER` on) gives a test time to
kill the run between two checkpoints; `flaky_next_token` returns a NaN loss on the calls listed
in NAN_CALLS.
"""

import hashlib
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from mmllm.training.config import load_pretrain_config
from mmllm.training.launch import end_rank
from mmllm.training.loop import shutdown_distributed, train
from mmllm.training.objectives import next_token, register_objective

SLOW_AFTER = int(os.environ.get("SLOW_AFTER", "0"))
NAN_CALLS = {int(c) for c in os.environ.get("NAN_CALLS", "").split(",") if c}
calls = 0


@register_objective("slow_next_token")
def slow_next_token(model, batch, modality_names):
    global calls
    calls += 1
    if SLOW_AFTER and calls > SLOW_AFTER:
        time.sleep(0.5)
    return next_token(model, batch, modality_names)


@register_objective("flaky_next_token")
def flaky_next_token(model, batch, modality_names):
    """next_token whose loss is NaN on the calls listed in NAN_CALLS (1-based)."""
    global calls
    calls += 1
    output = next_token(model, batch, modality_names)
    if calls in NAN_CALLS:
        output.loss_sum = output.loss_sum * float("nan")
    return output


def fingerprint(engine) -> str:
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_partition_weights()):
        digest = hashlib.sha256()
        for p in params:
            digest.update(p.detach().to(torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds it first
    config_path, ds_config, out = args[:3]
    rest = args[3:]
    resume = "--resume" in rest
    overrides = [a for a in rest if a != "--resume"]
    result = train(load_pretrain_config(config_path, overrides), None if ds_config == "-" else ds_config, resume, False)
    mine = fingerprint(result.engine)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        losses = {r["step"]: r["loss"] for r in result.history}
        with open(out, "w") as f:
            json.dump({"losses": losses, "fingerprints": everyone, "nonfinite": result.nonfinite_skipped}, f)
    shutdown_distributed()
    end_rank()


if __name__ == "__main__":
    main()
