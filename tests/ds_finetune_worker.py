"""Launched by tests/test_finetune.py under `deepspeed`: finetune, then report losses and weights.

    deepspeed --num_gpus N tests/ds_finetune_worker.py CONFIG.yaml DS.json|- OUT.json [--resume] [KEY=VALUE ...]

Rank 0 writes OUT.json: the per-step losses and, from every rank, a SHA-256 of all parameters and
of the rows of the embedding and head as the model computes with them (base weights with the
trained token rows in place), split into the added rows and all the others, gathered under ZeRO-3.
"""

import hashlib
import json
import sys

import torch
import torch.distributed as dist

from mmllm.training.finetune import added_rows, finetune, load_finetune_config
from mmllm.training.launch import end_rank
from mmllm.training.loop import shutdown_distributed


def digest(tensors) -> str:
    sha = hashlib.sha256()
    for tensor in tensors:
        sha.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return sha.hexdigest()


def fingerprints(engine) -> dict[str, str]:
    import deepspeed

    model = engine.module
    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_partition_weights()):
        added = torch.tensor(added_rows(model.layout))
        vocab = [model.model.embed_tokens.weight, model.lm_head.weight]  # peft's wrappers give the merged rows
        others = torch.ones(vocab[0].shape[0], dtype=torch.bool)
        others[added] = False
        return {
            "all": digest(params),
            "text_rows": digest(w[others] for w in vocab),
            "added_rows": digest(w[added] for w in vocab),
        }


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds it first
    config_path, ds_config, out = args[:3]
    rest = args[3:]
    resume = "--resume" in rest
    overrides = [a for a in rest if a != "--resume"]
    config = load_finetune_config(config_path, overrides)
    result = finetune(config, None if ds_config == "-" else ds_config, resume, progress=False)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, fingerprints(result.engine))
    if dist.get_rank() == 0:
        losses = {r["step"]: r["loss"] for r in result.history}
        with open(out, "w") as f:
            json.dump({"losses": losses, "ranks": everyone, "model_dir": str(result.model_dir)}, f)
    shutdown_distributed()
    end_rank()


if __name__ == "__main__":
    main()
