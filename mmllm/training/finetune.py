"""Finetuning on the pretraining loop: LoRA (peft), full, or QLoRA (ARCHITECTURE decision 6).

    deepspeed train/finetune.py --config configs/finetune/toy_lora.yaml [--deepspeed configs/deepspeed/zero2.json]
    python train/finetune.py ...                         (one process)
    mmllm merge-lora --model BASE --adapter OUT/adapter --out MERGED

A finetuning YAML is a pretraining YAML (`PretrainConfig`: data, optim, steps, batch sizes...) with
a `finetune:` section (`FinetuneConfig`). The model is `finetune.base_model`, a native checkpoint
loaded with its layout and tokenizers. The data are SFT shards in the chat template
(`mmllm pretokenize`), whose loss falls on assistant turns only.

`method: lora` wraps the base with peft before DeepSpeed sees it. Trainable are the LoRA adapters
of `lora.target_modules` plus, with `lora.trainable_token_rows: added`, the embedding and LM-head
rows of the ids the layout added (special tokens and modality codes), through peft's
`trainable_token_indices`: a delta of those rows only, never the whole matrices, so the text rows
stay bit-identical. Checkpoints keep the adapter (`adapter_config.json` +
`adapter_model.safetensors`, the base model's path in `base_model_name_or_path`, and the base's
`vocab_layout.json` beside them) as `CHECKPOINT/adapter` and `OUT/adapter`; the DeepSpeed engine
state is saved as in pretraining, so `--resume` works. The adapter loads with plain
`peft.PeftModel.from_pretrained` on the base and on its `export_hf` twin.

Under ZeRO-3 the trainable-token layers read the embedding's (and head's) weight themselves
instead of calling the layer; DeepSpeed gathers a partitioned parameter that a forward reads (and
registers it with the reading module), so they compute with whole weights. peft wraps the model
before `deepspeed.initialize` partitions it, so its copy of the added rows comes from whole weights.
A tied embedding is found through `get_input_embeddings` and `_tied_weights_keys`, as on HF models.

`method: full` trains every weight (and may use freeze `stages`) and saves the self-contained
model dir, as pretraining does. `method: qlora` is LoRA on a base whose decoder Linear layers are
frozen 4-bit NF4 (bitsandbytes, CUDA only; ZeRO-0/1/2).

`finetune.reducer` trains a learned visual-token reducer with the model, e.g.
`"registers:tokens=8,layer=2"` (Victor's registers, `mmllm.model.reducers.learned`): it is attached
after the method's wrapping, so its parameters train under every method (LoRA freezes only what
exists when it wraps), and each checkpoint saves them beside the model dir or the adapter
(`registers.safetensors`; `merge-lora` carries them over), where `--reducer registers` finds them.
The drop removes image code tokens from the sequence after the register layer, so their loss goes
with them: train registers on data whose images are inputs (captioning, VQA), not targets. It runs
with ZeRO-0/1/2 (the backbone reads the registers at a hook point, outside any forward of theirs,
where ZeRO-3 cannot gather them for the backward).

`finetune.latent_head` trains a latent-reasoning head (`mmllm.model.latent`) with the model, e.g.
`{kind: coconut, projection: none, max_latent_steps: 8}`: the head's registry name and its knobs.
The method's hooks are wrapped in `LatentHeadHooks`, which attach the head after the method's
wrapping (so it trains under LoRA too), continue from the base checkpoint's
`latent_head.safetensors` when it holds the same head, and save the head beside the model dir or
the adapter (`merge-lora` carries it over). The head trains through its objective, listed in
`objectives:` (`coconut` for Coconut, on `mmllm.model.latent.write_puzzle_shards` data); like the
registers it runs with ZeRO-0/1/2, and not beside a token reducer. `mmllm latent-train` runs
Coconut's curriculum as one such finetune per stage (`mmllm.model.latent.train`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from mmllm.config import load_config, read_json_object
from mmllm.errors import CheckpointError, ConfigError
from mmllm.model.adapters import ADAPTER_CONFIG
from mmllm.model.latent import LATENT_HEAD_FILE, LatentHeadHooks
from mmllm.model.latent.base import make_head
from mmllm.model.latent.base import registry as head_registry
from mmllm.model.mmllm import CONFIG_FILE, LAYOUT_FILE, MMLLM
from mmllm.model.reducers import attach_reducer, parse_spec
from mmllm.model.reducers.base import registry
from mmllm.model.reducers.learned import REGISTERS_FILE, LearnedReducer
from mmllm.training.config import PretrainConfig
from mmllm.training.deepspeed_config import load_deepspeed_config, zero_stage
from mmllm.training.loop import ModelHooks, TrainResult, train
from mmllm.vocab import VocabLayout

if TYPE_CHECKING:
    from peft import PeftModel

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"  # CHECKPOINT/adapter and OUT/adapter of a LoRA run
# Modules whose LoRA would change the text rows: the vocabulary trains through its added rows only.
VOCAB_MODULES = ("embed_tokens", "lm_head")


@dataclass
class LoraSettings:
    r: int = 16  # adapter rank: 8-64 is the usual range (Hu et al. 2021; QLoRA uses 64 on 7B models)
    alpha: int = 32  # the update is scaled by alpha / r = 2, peft's and most recipes' ratio
    dropout: float = 0.05  # on the adapters' input; QLoRA's value for 7B-13B models
    # Every attention and MLP projection: QLoRA (Dettmers et al. 2023) finds all linear layers needed
    # to match full finetuning.
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # "added": the embedding and head rows of the layout's added ids train too (peft trainable tokens);
    # "none": only the adapters.
    trainable_token_rows: Literal["added", "none"] = "added"


@dataclass
class FinetuneConfig:
    base_model: str = ""  # a native checkpoint dir (config.json, vocab_layout.json, tokenizers)
    method: Literal["lora", "full", "qlora"] = "lora"
    lora: LoraSettings = field(default_factory=LoraSettings)
    reducer: str = ""  # a learned reducer trained with the model, e.g. "registers:tokens=8,layer=2"
    # A latent-reasoning head trained with the model: {kind: coconut, projection: none, max_latent_steps: 8}
    latent_head: dict[str, Any] = field(default_factory=dict)


@dataclass
class FinetuneRunConfig(PretrainConfig):
    """A finetuning run's YAML: a pretraining run whose model is `finetune.base_model`."""

    model: str = ""  # set from finetune.base_model by `check`; not a key of a finetuning YAML
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def check(self) -> None:
        settings = self.finetune
        base = settings.base_model
        if not base:
            raise ConfigError("finetune config: set finetune.base_model to the checkpoint dir to finetune")
        if not (Path(base) / CONFIG_FILE).is_file():
            raise ConfigError(f"finetune config: base_model {base}: no such checkpoint dir (no {CONFIG_FILE})")
        if not (Path(base) / LAYOUT_FILE).is_file():
            raise ConfigError(f"finetune config: base_model {base} has no {LAYOUT_FILE}; finetune an mmllm checkpoint")
        if self.model and Path(self.model).resolve() != Path(base).resolve():
            raise ConfigError("finetune config: name the model to finetune in finetune.base_model, not `model`")
        for key in ("vocab", "init_from_hf"):
            if getattr(self, key):
                raise ConfigError(f"finetune config: remove `{key}`; the base model's layout and tokenizers are used")
        self.model = base
        if settings.method != "full" and self.stages:
            raise ConfigError(
                f"finetune config: `stages` need method full; {settings.method} trains its adapters throughout"
            )
        if settings.method != "full":
            _check_lora_settings(settings.lora)
        if settings.method == "qlora":
            _check_qlora_available()
        if settings.reducer:
            _check_trainable_reducer(settings.reducer)
        _check_latent_head(settings, self.objectives)
        super().check()


def _check_lora_settings(lora: LoraSettings) -> None:
    if lora.r < 1:
        raise ConfigError(f"finetune config: lora.r must be at least 1, got {lora.r}")
    if lora.alpha <= 0:
        raise ConfigError(f"finetune config: lora.alpha must be positive, got {lora.alpha}")
    if not 0.0 <= lora.dropout < 1.0:
        raise ConfigError(f"finetune config: lora.dropout must be in [0, 1), got {lora.dropout}")
    if not lora.target_modules:
        raise ConfigError("finetune config: lora.target_modules is empty; name the Linear layers to adapt")


def _check_trainable_reducer(spec: str) -> None:
    name = parse_spec(spec)[0]
    trainable = sorted(n for n, cls in registry().items() if issubclass(cls, LearnedReducer) and cls.trainable)
    if name not in trainable:
        raise ConfigError(
            f"finetune config: reducer {name!r} has nothing to train (trainable reducers: {', '.join(trainable)})"
        )


def _check_latent_head(settings: FinetuneConfig, objectives: tuple[str, ...]) -> None:
    """The head must build for the base model, train through an objective the run lists, and not
    share the sequence with a token reducer; a head's objective needs its head."""
    trained_by = {cls.objective: name for name, cls in head_registry().items()}
    if not settings.latent_head:
        needing = [o for o in objectives if o in trained_by]
        if needing:
            raise ConfigError(
                f"finetune config: objective {needing[0]} trains a latent head; set finetune.latent_head "
                f"(e.g. {{kind: {trained_by[needing[0]]}}})"
            )
        return
    options = dict(settings.latent_head)
    kind = options.pop("kind", None)
    if not isinstance(kind, str):
        raise ConfigError("finetune config: finetune.latent_head needs a kind, e.g. {kind: coconut}")
    base = Path(settings.base_model)
    raw = read_json_object(base / CONFIG_FILE, ConfigError, CONFIG_FILE)
    hidden_size = raw.get("model", raw).get("hidden_size")  # a native config.json nests it; a HF one does not
    head = make_head(kind, VocabLayout.load(base / LAYOUT_FILE), hidden_size, **options)
    if head.objective not in objectives:
        raise ConfigError(
            f"finetune config: latent_head {kind} trains through objective {head.objective}; "
            f"list it in objectives (objectives: [{head.objective}])"
        )
    if settings.reducer:
        raise ConfigError(
            "finetune config: finetune.latent_head and finetune.reducer together: latent steps need a "
            "sequence whose length no hook changes"
        )


def _check_qlora_available() -> None:
    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("finetune config: method qlora needs CUDA and bitsandbytes; use method lora on this machine")


def load_finetune_config(path: str | Path | None, overrides=()) -> FinetuneRunConfig:
    config = load_config(FinetuneRunConfig, path, overrides)
    config.check()
    return config


# ---------------------------------------------------------------- LoRA on an MMLLM


def added_rows(layout: VocabLayout) -> list[int]:
    """The ids the layout added to the text vocabulary: special tokens and modality codes,
    [base_rows, total_size). The base model's unused rows below and the padding above never occur."""
    return list(range(layout.base_rows, layout.total_size))


def trainable_token_indices(model: MMLLM, lora: LoraSettings) -> dict[str, list[int]] | None:
    """peft's `trainable_token_indices`: the added rows of the embedding, and of the head when it is
    its own matrix (a tied head follows the embedding's rows)."""
    if lora.trainable_token_rows == "none":
        return None
    rows = added_rows(model.layout)
    if model.config.tie_word_embeddings:
        return {"embed_tokens": rows}
    return {"embed_tokens": rows, "lm_head": rows}


def check_target_modules(model: nn.Module, targets: tuple[str, ...]) -> None:
    """Every target must name Linear layers of the model, as peft matches them (a name or a dotted suffix)."""
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    leaves = sorted({name.rsplit(".", 1)[-1] for name in linear if name.rsplit(".", 1)[-1] not in VOCAB_MODULES})
    for target in targets:
        if target.rsplit(".", 1)[-1] in VOCAB_MODULES:
            raise ConfigError(
                f"finetune config: lora.target_modules '{target}' would change the text rows of the vocabulary; "
                "its added rows train through lora.trainable_token_rows"
            )
        if not any(name == target or name.endswith("." + target) for name in linear):
            raise ConfigError(
                f"finetune config: lora.target_modules '{target}' matches no Linear layer of the model "
                f"(its layers: {', '.join(leaves)})"
            )


def wrap_lora(model: MMLLM, settings: FinetuneConfig) -> PeftModel:
    """`model` with LoRA adapters (and trainable added rows) injected in place; returns the
    `peft.PeftModel` around it, which saves the adapter."""
    import peft

    lora = settings.lora
    check_target_modules(model, lora.target_modules)
    peft_config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        trainable_token_indices=trainable_token_indices(model, lora),
        bias="none",
    )
    wrapped = peft.get_peft_model(model, peft_config)
    wrapped.peft_config["default"].base_model_name_or_path = str(Path(settings.base_model).resolve())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("LoRA r=%d on %s: %d trainable parameters", lora.r, ", ".join(lora.target_modules), trainable)
    return wrapped


def quantize_4bit(model: MMLLM) -> MMLLM:
    """QLoRA's base (Dettmers et al. 2023): every decoder-layer Linear as a frozen 4-bit NF4 layer
    on this rank's GPU, computing in bf16. The embedding and head stay in full precision."""
    import bitsandbytes as bnb

    for module in list(model.model.layers.modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            quantized = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=torch.bfloat16,
                quant_type="nf4",
            )
            quantized.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                quantized.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, name, quantized)
    model.to(torch.device("cuda", torch.cuda.current_device()))  # Params4bit quantizes as it moves
    model.is_loaded_in_4bit = True  # what peft reads to give Linear4bit layers their 4-bit LoRA
    return model


class AdapterCheckpoint:
    """What a LoRA run's checkpoints hold instead of the model: the peft adapter.

    `save_checkpoint` gathers `parameters()` under ZeRO-3 (only the trainable ones are saved) and
    calls `save_pretrained(CHECKPOINT/model)`; the adapter goes to `CHECKPOINT/adapter` instead,
    with the base's vocab layout beside it so a load on another base is refused.
    """

    def __init__(self, peft_model) -> None:
        self.peft_model = peft_model

    def parameters(self):
        return [p for p in self.peft_model.parameters() if p.requires_grad]

    def save_pretrained(self, path: str | Path) -> None:
        target = Path(path).with_name(ADAPTER_DIR)
        # Never the whole embedding: the added rows are in the trainable-token deltas.
        self.peft_model.save_pretrained(str(target), save_embedding_layers=False)
        self.peft_model.get_base_model().layout.save(target / LAYOUT_FILE)


class LoraHooks(ModelHooks):
    """LoRA: adapters injected before DeepSpeed, so they (and the added rows) are what trains; the
    engine holds the base model itself, whose forward now runs through them."""

    output = ADAPTER_DIR

    def __init__(self, settings: FinetuneConfig) -> None:
        self.settings = settings
        self.peft_model = None

    def prepare(self, model: MMLLM, config: PretrainConfig) -> MMLLM:
        self.peft_model = wrap_lora(model, self.settings)
        return model

    def saved(self, model: MMLLM) -> AdapterCheckpoint:
        return AdapterCheckpoint(self.peft_model)


class QLoraHooks(LoraHooks):
    """QLoRA: the same adapters on a base whose decoder Linear layers are 4-bit first."""

    def prepare(self, model: MMLLM, config: PretrainConfig) -> MMLLM:
        return super().prepare(quantize_4bit(model), config)


class ReducerHooks(ModelHooks):
    """The method's hooks plus a learned reducer: attached after the method prepared the model, and
    saved beside what the method saves."""

    def __init__(self, method: ModelHooks, spec: str) -> None:
        self.method = method
        self.spec = spec
        self.output = method.output
        self.reducer = None

    def prepare(self, model: MMLLM, config: PretrainConfig) -> MMLLM:
        model = self.method.prepare(model, config)
        self.reducer = attach_reducer(model, self.spec, train=True)
        return model

    def saved(self, model: MMLLM) -> PluginCheckpoint:
        return PluginCheckpoint(self.method.saved(model), self.reducer, self.output)


class PluginCheckpoint:
    """What the method saves (the model's weights never include a plug-in's: `_weights_to_save`,
    and an adapter holds only adapter weights), then the plug-in's own file in the same dir
    (CHECKPOINT/model, or CHECKPOINT/adapter): a learned reducer's registers, a latent head."""

    def __init__(self, saved, plugin, output: str) -> None:
        self.saved = saved
        self.plugin = plugin
        self.output = output

    def parameters(self):
        return self.saved.parameters()

    def save_pretrained(self, path: str | Path) -> None:
        self.saved.save_pretrained(path)
        self.plugin.save(Path(path).with_name(self.output))


def finetune_hooks(settings: FinetuneConfig) -> ModelHooks:
    if settings.method == "full":
        hooks = ModelHooks()  # pretraining's: every weight trains, the model dir is saved
    else:
        hooks = (QLoraHooks if settings.method == "qlora" else LoraHooks)(settings)
    if settings.reducer:
        hooks = ReducerHooks(hooks, settings.reducer)
    if settings.latent_head:
        options = dict(settings.latent_head)
        hooks = LatentHeadHooks(hooks, options.pop("kind"), **options)
    return hooks


def finetune(
    config: FinetuneRunConfig,
    deepspeed_config: str | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Run the pretraining loop on the base model with the method's hooks."""
    zero3 = zero_stage(load_deepspeed_config(deepspeed_config)) == 3
    if config.finetune.method == "qlora" and zero3:
        raise ConfigError("finetune config: method qlora runs with ZeRO-0/1/2; ZeRO-3 cannot partition 4-bit weights")
    if config.finetune.reducer and zero3:
        # ZeRO-3 gathers a partitioned parameter again for the backward only through the forward of
        # a module that returned a tensor made from it; hook points are not such forwards.
        raise ConfigError(
            "finetune config: finetune.reducer runs with ZeRO-0/1/2; ZeRO-3 would partition its parameters"
        )
    if config.finetune.latent_head and zero3:  # the same: the head is read at a hook point
        raise ConfigError(
            "finetune config: finetune.latent_head runs with ZeRO-0/1/2; ZeRO-3 would partition its parameters"
        )
    return train(config, deepspeed_config, resume, progress, hooks=finetune_hooks(config.finetune))


# ---------------------------------------------------------------- adapters: load, merge


def load_adapter(model: MMLLM, path: str | Path) -> PeftModel:
    """A `peft.PeftModel` of `model` with the adapter at `path`, after checking that it was made for
    this base: its layout, its token rows, its tensor shapes. Errors are one line."""
    from peft import PeftModel

    path = Path(path)
    if not (path / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"{path}: no {ADAPTER_CONFIG} (not a peft adapter dir)")
    saved_layout = path / LAYOUT_FILE  # written by our finetuning; a plain peft adapter has none
    if saved_layout.is_file() and model.layout is not None and VocabLayout.load(saved_layout) != model.layout:
        raise CheckpointError(f"{path}: the adapter was trained on a base model with another vocab layout")
    config = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    indices = config.get("trainable_token_indices") or {}
    for rows in indices.values() if isinstance(indices, dict) else [indices]:
        if rows and max(rows) >= model.config.vocab_size:
            raise CheckpointError(
                f"{path}: the adapter trains token row {max(rows)}, beyond this model's {model.config.vocab_size} "
                "rows; it was trained on another base model"
            )
    try:
        return PeftModel.from_pretrained(model, str(path))
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{path}: the adapter does not fit this base model ({_first_line(err)})") from None


def _first_line(err: Exception) -> str:
    """The telling line of a peft / torch error: a size mismatch when there is one."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    mismatch = [line for line in lines if line.startswith("size mismatch")]
    return (mismatch or lines or [type(err).__name__])[0]


def merge_lora(model_dir: str | Path, adapter_dir: str | Path, out: str | Path) -> Path:
    """Merge the adapter into the base and save a self-contained checkpoint (weights, layout, text
    tokenizer, modality tokenizers, and the registers or latent head trained with the adapter) at `out`."""
    model = MMLLM.from_pretrained(model_dir)
    merged = load_adapter(model, adapter_dir).merge_and_unload()
    merged.save_pretrained(out)
    for plugin in (REGISTERS_FILE, LATENT_HEAD_FILE):  # trained with the adapter (finetune.reducer, .latent_head)
        if (Path(adapter_dir) / plugin).is_file():
            shutil.copyfile(Path(adapter_dir) / plugin, Path(out) / plugin)
    return Path(out)
