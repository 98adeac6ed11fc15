"""`MMLLM`: the backbone plus everything needed to use it, loaded from and saved to one dir.

A native checkpoint dir (ARCHITECTURE decision 2) holds:

    config.json             {"format": "mmllm.model", "model": ModelConfig}
    model.safetensors       or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    vocab_layout.json       the unified vocabulary (absent for a bare imported backbone)
    text_tokenizer/         the text tokenizer files
    tokenizers/NAME/        each modality tokenizer it was trained with

so `--model DIR` alone is enough to chat, serve, evaluate or generate. `from_pretrained` also
reads a local HF Llama / Qwen2 / Mistral / Qwen3 dir, and `export_hf` writes one back.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmllm.config import from_dict, read_json_object, to_dict
from mmllm.errors import CheckpointError
from mmllm.model import hf
from mmllm.model.backbone import CausalLM, rope_frequencies
from mmllm.model.config import ModelConfig
from mmllm.model.weights import atomic_directory, load_weights, save_weights
from mmllm.text_tokenizer import check_text_tokenizer, has_tokenizer_files, load_text_tokenizer
from mmllm.tokenizers.base import ModalityTokenizer, load_tokenizer
from mmllm.vocab import VocabLayout

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
LAYOUT_FILE = "vocab_layout.json"
TEXT_TOKENIZER_DIR = "text_tokenizer"
MODALITY_TOKENIZERS_DIR = "tokenizers"
NATIVE_FORMAT = "mmllm.model"
# New vocabulary rows start at the mean of the old rows plus Gaussian noise with this fraction
# of the old rows' per-dimension std: near the mean, so no new token starts out dominating the
# softmax (Hewitt 2021, "Initializing new word embeddings"), yet distinct, so rows can diverge.
NEW_ROW_NOISE = 0.01


class MMLLM(CausalLM):
    """The causal LM with its vocabulary layout and tokenizers.

    `modality_tokenizers` maps a layout modality name to its ModalityTokenizer; each must fit
    its range. They are kept outside the module tree, so the LM's state dict holds LM weights only.
    """

    def __init__(
        self,
        config: ModelConfig,
        layout: VocabLayout | None = None,
        text_tokenizer: Any = None,
        modality_tokenizers: dict[str, ModalityTokenizer] | None = None,
    ) -> None:
        super().__init__(config)
        if layout is not None and layout.padded_size != config.vocab_size:
            raise CheckpointError(
                f"the embedding has {config.vocab_size} rows but the vocab layout has {layout.padded_size}"
            )
        self.layout = layout
        self.name_or_path = ""  # the checkpoint dir it was loaded from, as on HF models ("" when built)
        self.text_tokenizer = text_tokenizer
        self.modality_tokenizers: dict[str, ModalityTokenizer] = {}
        for name, tokenizer in (modality_tokenizers or {}).items():
            self.set_modality_tokenizer(name, tokenizer)

    def set_modality_tokenizer(self, name: str, tokenizer: ModalityTokenizer) -> None:
        """Attach the tokenizer of the layout's modality `name`, checking that its codes fit."""
        if self.layout is None:
            raise CheckpointError("a model without a vocab layout cannot take modality tokenizers")
        tokenizer.check_fits(self.layout.modality(name), f"modality tokenizer '{name}'")
        self.modality_tokenizers[name] = tokenizer

    @classmethod
    def from_config(
        cls,
        config: ModelConfig,
        layout: VocabLayout | None = None,
        text_tokenizer: Any = None,
        modality_tokenizers: dict[str, ModalityTokenizer] | None = None,
    ) -> MMLLM:
        """A randomly initialised model; its vocab size comes from the layout when given."""
        if layout is not None:
            config = dataclasses.replace(config, vocab_size=layout.padded_size)
        if layout is not None and text_tokenizer is not None:
            check_text_tokenizer(layout, text_tokenizer, "model")
        return cls(config, layout, text_tokenizer, modality_tokenizers)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        text_tokenizer: Any = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        device_map: str | dict[str, Any] | None = None,
        max_memory: dict[int | str, int | str] | None = None,
        offload_folder: str | Path | None = None,
    ) -> MMLLM:
        """Load a native checkpoint dir or a local HF Llama/Qwen2/Mistral/Qwen3 dir.

        Weights keep their stored dtype unless `dtype` is given. `text_tokenizer` overrides
        (or supplies) the text tokenizer, e.g. for a HF dir that has none.

        With `device_map` ("auto", or accelerate's {module: device}) a checkpoint larger than
        one device loads through accelerate: the model is built with empty weights, placed
        decoder layer by decoder layer within `max_memory` ({0: "20GiB", "cpu": "60GiB"}),
        and what fits nowhere is offloaded to `offload_folder` on disk; each shard is read
        straight onto its device, never the whole state dict at once.
        """
        path = Path(path)
        config = read_model_config(path)
        layout = VocabLayout.load(path / LAYOUT_FILE) if (path / LAYOUT_FILE).is_file() else None
        if text_tokenizer is None:
            text_tokenizer = _find_text_tokenizer(path, layout)
        if layout is not None and text_tokenizer is not None:
            check_text_tokenizer(layout, text_tokenizer, str(path))
        if device_map is not None:
            placement = (device_map, max_memory, offload_folder)
            model = _dispatched(cls, path, config, layout, text_tokenizer, dtype, *placement)
            for name, tokenizer_dir in sorted(_modality_tokenizer_dirs(path).items()):
                model.set_modality_tokenizer(name, load_tokenizer(tokenizer_dir))
            model.name_or_path = str(path)
            return model
        state = load_weights(path)
        embed = state.get("model.embed_tokens.weight")
        if embed is not None and embed.shape[0] != config.vocab_size:
            raise CheckpointError(
                f"{path}: the embedding has {embed.shape[0]} rows but config.json says vocab_size {config.vocab_size}"
            )
        if layout is not None and layout.padded_size != config.vocab_size:
            raise CheckpointError(
                f"{path}: the embedding has {config.vocab_size} rows but {LAYOUT_FILE} says {layout.padded_size}"
            )
        with torch.device("meta"):
            model = cls(config, layout, text_tokenizer)
        model._load_state(state, str(path))
        for name, tokenizer_dir in sorted(_modality_tokenizer_dirs(path).items()):
            model.set_modality_tokenizer(name, load_tokenizer(tokenizer_dir))
        model.name_or_path = str(path)
        return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)

    def _load_state(self, state: dict[str, torch.Tensor], where: str) -> None:
        """Assign checkpoint tensors to a meta-initialised model, checking names and shapes."""
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        expected = {name for name, _ in self.named_parameters(remove_duplicate=True)}
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing:
            raise CheckpointError(f"{where}: missing weights ({len(missing)}), e.g. {missing[0]} (partial checkpoint?)")
        if unexpected:
            raise CheckpointError(f"{where}: unexpected weights ({len(unexpected)}), e.g. {unexpected[0]}")
        params = dict(self.named_parameters())
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise CheckpointError(
                    f"{where}: {name} has shape {tuple(tensor.shape)}, the config implies {tuple(params[name].shape)}"
                )
        self.load_state_dict(state, strict=False, assign=True)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.model.rotary_emb.inv_freq = rope_frequencies(self.config)[0]  # built on meta above

    # ------------------------------------------------------------------ saving

    def save_pretrained(self, path: str | Path, max_shard_bytes: int | None = None) -> None:
        """Write a self-contained native checkpoint dir, atomically (temp dir, then rename)."""
        with atomic_directory(path) as tmp:
            meta = {"format": NATIVE_FORMAT, "version": 1, "model": to_dict(self.config)}
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            shard_kwargs = {"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}
            save_weights(self._weights_to_save(), tmp, **shard_kwargs)
            if self.layout is not None:
                self.layout.save(tmp / LAYOUT_FILE)
            if self.text_tokenizer is not None:
                self.text_tokenizer.save_pretrained(str(tmp / TEXT_TOKENIZER_DIR))
            self._save_modality_tokenizers(tmp)

    def _save_modality_tokenizers(self, directory: Path) -> None:
        for name, tokenizer in self.modality_tokenizers.items():
            tokenizer.save_pretrained(directory / MODALITY_TOKENIZERS_DIR / name)

    def _weights_to_save(self) -> dict[str, torch.Tensor]:
        """The LM's weights: never an attached plug-in's (`model.hooks.*`), which saves its own file
        beside them (registers, latent heads) and which `from_pretrained` would refuse as unexpected."""
        state = {name: tensor for name, tensor in self.state_dict().items() if not name.startswith("model.hooks.")}
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight")
        return state

    def export_hf(self, path: str | Path) -> None:
        """Write a HF dir that `AutoModelForCausalLM.from_pretrained` loads with identical logits.

        The tokenizer is saved with every layout id added under its name (`<|boi|>`,
        `<|image_0042|>`). The layout and the plain text tokenizer ride along, so
        `mmllm convert --from-hf` of an export gives back the native checkpoint.
        """
        if len(self.model.hooks):
            raise CheckpointError("plug-ins are attached; HF checkpoints cannot hold them (detach them first)")
        arch = hf.export_architecture(self.config)
        hf_config = hf.hf_config_class(arch)(**hf.config_to_hf(self.config, self.layout))
        with atomic_directory(path) as tmp:
            hf_config.save_pretrained(str(tmp))
            save_weights(self._weights_to_save(), tmp)
            if self.text_tokenizer is not None and self.layout is not None:
                hf.tokenizer_with_layout_tokens(self.text_tokenizer, self.layout).save_pretrained(str(tmp))
            elif self.text_tokenizer is not None:
                self.text_tokenizer.save_pretrained(str(tmp))
            if self.layout is not None:
                self.layout.save(tmp / LAYOUT_FILE)
                if self.text_tokenizer is not None:
                    self.text_tokenizer.save_pretrained(str(tmp / TEXT_TOKENIZER_DIR))
                self._save_modality_tokenizers(tmp)

    # ------------------------------------------------------------------ vocabulary

    @torch.no_grad()
    def extend_vocab(self, layout: VocabLayout, seed: int = 0) -> None:
        """Grow embedding and head to `layout.padded_size` rows and adopt the layout.

        The layout must have been built for this model: its `base_rows` equal the current
        rows. New rows start at the mean of the text rows plus small noise (NEW_ROW_NOISE).
        """
        rows = self.config.vocab_size
        if self.layout is not None and rows == layout.padded_size:
            self.layout = layout
            return
        if layout.base_rows != rows:
            raise CheckpointError(
                f"the model has {rows} embedding rows but the layout was built for {layout.base_rows} "
                f"(rebuild it with --base-rows {rows})"
            )
        if self.text_tokenizer is not None:
            check_text_tokenizer(layout, self.text_tokenizer, "extend_vocab")
        generator = torch.Generator().manual_seed(seed)
        added = layout.padded_size - rows
        embed = self.model.embed_tokens.weight
        new_embed = nn.Embedding(layout.padded_size, embed.shape[1], device=embed.device, dtype=embed.dtype)
        new_embed.weight.copy_(torch.cat([embed, _new_rows(embed[: layout.text_size], added, generator)]))
        self.model.embed_tokens = new_embed
        if self.config.tie_word_embeddings:
            self.lm_head = nn.Linear(embed.shape[1], layout.padded_size, bias=False, device=embed.device)
            self.lm_head.weight = new_embed.weight
        else:
            head = self.lm_head.weight
            new_head = nn.Linear(head.shape[1], layout.padded_size, bias=False, device=head.device, dtype=head.dtype)
            new_head.weight.copy_(torch.cat([head, _new_rows(head[: layout.text_size], added, generator)]))
            self.lm_head = new_head
        self.config.vocab_size = layout.padded_size
        self.layout = layout
        logger.info("extended the vocabulary from %d to %d rows", rows, layout.padded_size)


DISPATCH_UNIT = "DecoderLayer"  # accelerate never splits a decoder layer across devices


def _dispatched(cls, path, config, layout, text_tokenizer, dtype, device_map, max_memory, offload_folder) -> MMLLM:
    """The model built with empty weights and loaded shard by shard onto accelerate's device map."""
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights, load_checkpoint_in_model

    with init_empty_weights():
        model = cls(config, layout, text_tokenizer)
    model.model.rotary_emb.inv_freq = rope_frequencies(config)[0]
    if device_map == "auto":
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=[DISPATCH_UNIT])
    device_map = dict(device_map)
    if set(device_map.values()) == {"disk"}:
        raise CheckpointError(f"{path}: max_memory leaves no module on a device (raise it: the largest layer must fit)")
    if config.tie_word_embeddings:
        # One tensor serves as embedding and head: both live on the first real device (the
        # checkpoint stores it once, under the embedding's name).
        first = next(d for d in device_map.values() if d != "disk")
        device_map = {k: v for k, v in device_map.items() if k not in ("", "model")}
        device_map.update({"model.embed_tokens": first, "lm_head": first})
    offload = str(offload_folder) if offload_folder else None
    if "disk" in device_map.values() and offload is None:
        raise CheckpointError(f"{path}: the device map offloads to disk; give an offload folder (--offload-folder)")
    try:
        load_checkpoint_in_model(model, str(path), device_map=device_map, offload_folder=offload, dtype=dtype)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return dispatch_model(model, device_map=device_map, offload_dir=offload)
    except (ValueError, RuntimeError, KeyError) as err:
        raise CheckpointError(f"{path}: cannot dispatch the model ({type(err).__name__}: {err})") from None


def _new_rows(old: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    mean = old.float().mean(dim=0)
    std = old.float().std(dim=0) if old.shape[0] > 1 else torch.ones_like(mean)
    noise = torch.randn(count, old.shape[1], generator=generator) * std * NEW_ROW_NOISE
    return (mean + noise).to(old.dtype)


def _modality_tokenizer_dirs(path: Path) -> dict[str, Path]:
    """`tokenizers/NAME/` dirs of a checkpoint, by modality name."""
    root = path / MODALITY_TOKENIZERS_DIR
    return {d.name: d for d in root.iterdir() if d.is_dir()} if root.is_dir() else {}


def read_model_config(path: Path) -> ModelConfig:
    """The model config of a native or HF checkpoint dir."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint dir not found")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_FILE} (not a checkpoint dir, or a partial one)")
    raw = read_json_object(config_path, CheckpointError, CONFIG_FILE)
    if raw.get("format") == NATIVE_FORMAT:
        return from_dict(ModelConfig, raw.get("model", {}), str(config_path))
    return hf.config_from_hf(raw, str(config_path))


def _find_text_tokenizer(path: Path, layout: VocabLayout | None) -> Any:
    """The checkpoint's text tokenizer: `text_tokenizer/`, or a HF dir's own files (no layout)."""
    if has_tokenizer_files(path / TEXT_TOKENIZER_DIR):
        return load_text_tokenizer(path / TEXT_TOKENIZER_DIR)
    if layout is None and has_tokenizer_files(path):
        return load_text_tokenizer(path)
    return None
