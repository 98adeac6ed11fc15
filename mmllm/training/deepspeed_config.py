"""The DeepSpeed JSON of a run, with its "auto" fields filled from the run's YAML.

`configs/deepspeed/zero{0,1,2,3}.json` and `zero3_offload.json` carry only the ZeRO choices.
Batch sizes, clipping and precision are "auto": the YAML says them once. A value the JSON does
set must agree with the YAML, or the run stops before its first step with one line naming the
field; DeepSpeed would otherwise fail later, or silently train with another batch.

The optimizer and LR schedule are the YAML's (AdamW, warmup + cosine), handed to
`deepspeed.initialize` as client objects, so a JSON "optimizer" or "scheduler" section is
refused rather than half-applied. This also keeps DeepSpeed from JIT-compiling its CPU Adam.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from mmllm.config import read_json_object
from mmllm.errors import ConfigError
from mmllm.training.config import PretrainConfig

AUTO = "auto"
ZERO0: dict[str, Any] = {
    "train_batch_size": AUTO,
    "train_micro_batch_size_per_gpu": AUTO,
    "gradient_accumulation_steps": AUTO,
    "gradient_clipping": AUTO,
    "bf16": {"enabled": AUTO},
    "zero_optimization": {"stage": 0},
    "steps_per_print": 10**9,  # the trainer logs; DeepSpeed's own step prints would interleave
}


def load_deepspeed_config(path: str | Path | None) -> dict[str, Any]:
    """The JSON at `path`, or plain data parallelism (ZeRO-0) when none is given."""
    if path is None:
        return copy.deepcopy(ZERO0)
    return read_json_object(Path(path), ConfigError, "DeepSpeed config")


def resolve_deepspeed_config(raw: dict[str, Any], config: PretrainConfig, world_size: int) -> dict[str, Any]:
    """Fill "auto" fields from `config` and check the rest against it."""
    for section in ("optimizer", "scheduler"):
        if section in raw:
            raise ConfigError(f"DeepSpeed config: remove the '{section}' section; the run's YAML sets it (optim: ...)")
    resolved = copy.deepcopy(raw)
    expected = {
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "train_batch_size": config.micro_batch_size * config.gradient_accumulation_steps * world_size,
        "gradient_clipping": config.optim.grad_clip,
    }
    for key, value in expected.items():
        given = resolved.get(key, AUTO)
        if given != AUTO and given != value:
            raise ConfigError(
                f"DeepSpeed config: {key} is {given} but the run's YAML implies {value} "
                f"(micro_batch_size {config.micro_batch_size} x gradient_accumulation_steps "
                f'{config.gradient_accumulation_steps} x {world_size} ranks); set it to "auto"'
            )
        resolved[key] = value
    bf16 = config.precision == "bf16"
    for name, wanted in (("bf16", bf16), ("fp16", False)):
        section = resolved.setdefault(name, {})
        given = section.get("enabled", AUTO)
        if given != AUTO and bool(given) != wanted:
            raise ConfigError(
                f"DeepSpeed config: {name}.enabled is {given} but the run's YAML says precision {config.precision}"
            )
        section["enabled"] = wanted
    return resolved


def zero_stage(resolved: dict[str, Any]) -> int:
    return int(resolved.get("zero_optimization", {}).get("stage", 0))
