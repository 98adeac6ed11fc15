"""The pretraining run's YAML (`configs/pretrain/*.yaml`) as dataclasses.

The YAML is the source of truth for batch sizes: it fills the DeepSpeed JSON's "auto" fields
(`mmllm.training.deepspeed_config`), and a JSON that disagrees with it is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mmllm.config import load_config
from mmllm.data.packing import PackingConfig
from mmllm.errors import ConfigError


@dataclass
class SourceConfig:
    path: str  # a pretokenized shard dir (`mmllm pretokenize --out`)
    weight: float = 1.0  # mixture weight: documents are drawn from sources in these proportions


@dataclass
class DataConfig:
    sources: tuple[SourceConfig, ...] = ()
    validation: str | None = None  # a shard dir scored every `eval_every` steps
    validation_rows: int = 32  # packed rows of the validation set that are scored
    packing: PackingConfig = field(default_factory=PackingConfig)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of lr (nanoGPT, LLaMA)
    warmup_steps: int = 100
    weight_decay: float = 0.1  # AdamW, on matrices only; norms and biases are not decayed
    betas: tuple[float, float] = (0.9, 0.95)  # LLaMA / GPT-3
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class PretrainConfig:
    model: str = "configs/model/toy.yaml"  # a model config YAML (a fresh model) or a checkpoint dir
    vocab: str = ""  # tokenizer bundle or checkpoint: vocab_layout.json, text_tokenizer/, tokenizers/
    init_from_hf: str | None = None  # a local HF Llama/Qwen2/Mistral dir; its vocabulary is extended
    out: str = "runs/pretrain"
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    objectives: tuple[str, ...] = ("next_token",)
    steps: int = 1000
    micro_batch_size: int = 8  # rows per rank per forward
    gradient_accumulation_steps: int = 1
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 needs a GPU
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile the model
    log_every: int = 10
    eval_every: int = 0  # 0: validation only at the end (when a validation set is given)
    save_every: int = 0  # 0: only the final checkpoint
    keep_last: int = 2  # step checkpoints kept; older ones are deleted
    max_nonfinite: int = 5  # consecutive non-finite losses (each step skipped) before the run stops
    seed: int = 0
    threads: int = 1  # torch intra-op threads per rank (CPU)

    def check(self) -> None:
        if not self.data.sources:
            raise ConfigError("pretrain config: data.sources is empty; add at least one pretokenized shard dir")
        for name in ("steps", "micro_batch_size", "gradient_accumulation_steps", "keep_last", "max_nonfinite"):
            if getattr(self, name) < 1:
                raise ConfigError(f"pretrain config: {name} must be at least 1, got {getattr(self, name)}")
        for source in self.data.sources:
            if not Path(source.path).is_dir():
                raise ConfigError(f"pretrain config: data source {source.path}: no such shard dir")
        if self.data.validation is not None and not Path(self.data.validation).is_dir():
            raise ConfigError(f"pretrain config: data.validation {self.data.validation}: no such shard dir")
        if not self.vocab and not Path(self.model).is_dir():
            raise ConfigError("pretrain config: give `vocab` (a tokenizer bundle) to build a fresh model for")
        self.data.packing.check()


def load_pretrain_config(path: str | Path | None, overrides=()) -> PretrainConfig:
    config = load_config(PretrainConfig, path, overrides)
    config.check()
    return config
