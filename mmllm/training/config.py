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


# What a freeze stage can name as trainable: "all"; "new_rows", the embedding and LM-head rows of
# the ids the vocab layout added (special tokens and modality codes, ids >= layout.base_rows);
# "embeddings" and "head", those whole matrices (one tensor when tied); "norms", every RMSNorm
# weight; "layers", everything inside the decoder layers (attention, MLP and their norms).
TRAIN_SELECTORS = ("all", "new_rows", "embeddings", "head", "norms", "layers")


@dataclass
class StageConfig:
    """One freeze stage: for `steps` optimizer steps only the parts named in `train` learn.

    Anole's recipe on an imported model is `[{steps: 500, train: [new_rows, norms]}, {train: all}]`:
    first fit the new vocabulary rows (and the norms) to the frozen text model, then train it all.
    """

    steps: int | None = None  # None: until the end of the run (last stage only)
    train: str | tuple[str, ...] = ("all",)  # TRAIN_SELECTORS; a plain string names one

    def __post_init__(self) -> None:
        if isinstance(self.train, str):
            self.train = (self.train,)


@dataclass
class PretrainConfig:
    model: str = "configs/model/toy.yaml"  # a model config YAML (a fresh model) or a checkpoint dir
    vocab: str = ""  # tokenizer bundle or checkpoint: vocab_layout.json, text_tokenizer/, tokenizers/
    init_from_hf: str | None = None  # a local HF Llama/Qwen2/Mistral dir; its vocabulary is extended
    # > 0: a new model's media code rows start from a projection of each code's decoded look, this
    # many initializer_range in size (mmllm/model/code_init.py); a checkpoint's rows are kept.
    code_row_init: float = 0.0
    out: str = "runs/pretrain"
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    objectives: tuple[str, ...] = ("next_token",)
    steps: int = 1000
    # Freeze stages, in order, covering all `steps` (empty: everything trains throughout). The
    # stage of a step follows from the step alone, so a resumed run picks up in the right stage.
    stages: tuple[StageConfig, ...] = ()
    micro_batch_size: int = 8  # rows per rank per forward
    gradient_accumulation_steps: int = 1
    # fp32; bf16: DeepSpeed's (bf16 weights and activations, fp32 master weights), GPU only;
    # bf16-mixed: fp32 weights and optimizer, the forward under bf16 autocast, on GPU or CPU. On a
    # CPU with AVX-512 BF16 a training step takes about half its fp32 time (`mmllm bench train
    # --precision bf16-mixed`); a CPU without it emulates bf16 and runs slower, not wrongly.
    precision: Literal["fp32", "bf16", "bf16-mixed"] = "fp32"
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
        if self.code_row_init < 0:
            raise ConfigError(f"pretrain config: code_row_init must be >= 0, got {self.code_row_init}")
        self.data.packing.check()
        self._check_stages()

    def _check_stages(self) -> None:
        for index, stage in enumerate(self.stages):
            where = f"pretrain config: stages[{index}]"
            if stage.steps is None and index != len(self.stages) - 1:
                raise ConfigError(f"{where}: only the last stage may leave out `steps` (it runs to the end)")
            if stage.steps is not None and stage.steps < 1:
                raise ConfigError(f"{where}: steps must be at least 1, got {stage.steps}")
            if not stage.train:
                raise ConfigError(f"{where}: `train` names nothing; a stage must train something")
            for selector in stage.train:
                if selector not in TRAIN_SELECTORS:
                    raise ConfigError(
                        f"{where}: unknown trainable part '{selector}'; choose from {', '.join(TRAIN_SELECTORS)}"
                    )
        covered = sum(stage.steps or 0 for stage in self.stages)
        open_ended = bool(self.stages) and self.stages[-1].steps is None
        if self.stages and (covered > self.steps or (covered < self.steps and not open_ended)):
            raise ConfigError(
                f"pretrain config: the stages cover {covered} steps but the run has {self.steps}; "
                "make them add up, or leave out the last stage's `steps` to run it to the end"
            )
        if open_ended and covered == self.steps:
            raise ConfigError("pretrain config: the last stage, which runs to the end, gets no steps")


def load_pretrain_config(path: str | Path | None, overrides=()) -> PretrainConfig:
    config = load_config(PretrainConfig, path, overrides)
    config.check()
    return config
