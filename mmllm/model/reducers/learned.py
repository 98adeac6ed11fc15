"""Learned compression reducers, each registered under its spec name.

registers   Victor (Wen et al. 2025, "Efficient Vision-Language Models by Summarizing Visual Tokens
            into Compact Registers"), with the compression tokens of VoCo-LLaMA (Ye et al. 2024):
            `tokens` learned register embeddings are inserted after each image's `<|eoi|>`; the first
            `layer` decoder layers let them read the image, then every image code token leaves the
            sequence (and the KV cache of the later layers) while the registers and the text stay.
            `layer` equal to the model's depth inserts the registers and drops nothing. The registers
            train through the finetune path (`finetune.reducer: "registers:tokens=8,layer=2"`) and are
            saved as `registers.safetensors` beside the weights (the adapter of a LoRA run);
            `--reducer registers` loads them from the model's checkpoint dir (`path=DIR`: from DIR).
matryoshka  MQT (Hu et al. 2024, "Matryoshka Query Transformer for Large Vision-Language Models") on a
            1D prefix tokenizer (image-titok, trained with FlexTok's nested dropout): before the LLM,
            each image span keeps its first `tokens` codes, as if the image had been encoded with that
            budget. The training side is the packer's `nested_dropout` option, which shortens each
            span to a budget drawn per span, so one model serves every budget.

Both act where the visual tokens are, in the prefill; decode steps pass through. Both decide what
goes from the token ids alone, with no scoring: a learned reducer is therefore its own ideal slice
(`ideal_slice` returns the reducer; replaying its recorded cut would cost what computing it costs).
Only closed image spans (followed by their `<|eoi|>`) are compressed; a prompt that ends inside an
image keeps that image's codes.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from mmllm.errors import CheckpointError, ConfigError
from mmllm.model.backbone import BackboneHook, KVCache, TokenState
from mmllm.model.hooks import InsertTokens
from mmllm.model.reducers.base import Stage, TokenReducer, register_reducer
from mmllm.vocab import ModalityRange, VocabLayout

logger = logging.getLogger(__name__)

REGISTERS_FILE = "registers.safetensors"  # beside model.safetensors (or the LoRA adapter)
DEFAULT_REGISTERS = 8  # Victor's 8 registers: about 1% of LLaVA's 576 visual tokens, < 4% accuracy drop
# The image is read in the first 2 layers: FastV's finding that attention to visual tokens collapses
# after layer 2, and Victor's "first few layers".
DEFAULT_REGISTER_LAYER = 2
DEFAULT_BUDGET = 16  # MQT's 16-token operating point: 8x fewer TFLOPs for 2.4 MMBench points
PREFIX_TOKENIZERS = ("image-titok",)  # image tokenizers whose every prefix decodes (nested dropout)


class LearnedReducer(TokenReducer):
    """A reducer that depends on training: `prepare` (called by `attach_reducer`) checks the model and
    loads what was learned, or (`train`) sets it up to be learned; `trainable` ones have parameters
    that the finetune path trains and saves with `save`."""

    trainable: ClassVar[bool] = False

    def prepare(self, model, train: bool) -> None:
        raise NotImplementedError

    def ideal_slice(self, stages: list[Stage] | None = None) -> BackboneHook:
        """The reducer itself, whatever `stages`: its cut is read off the token ids of the prompt, so
        replaying it would compute what the reducer computes (no scores to skip)."""
        return self

    def find_image(self, layout: VocabLayout) -> ModalityRange:
        """The layout's image range; its code ids and delimiters become attributes."""
        if "image" not in layout.modalities:
            raise ConfigError(f"reducer {self.name}: the layout has no image modality")
        image = layout.modalities["image"]
        self.code_start, self.code_end = image.start, image.end
        self.boi_id, self.eoi_id = layout.begin_id("image"), layout.end_id("image")
        return image

    def image_codes(self, state: TokenState) -> Tensor:
        """(B, T) bool: the image code tokens of the state."""
        return (state.token_ids >= self.code_start) & (state.token_ids < self.code_end)

    def closed_codes(self, state: TokenState) -> Tensor:
        """(B, T) bool: the image code tokens of spans closed by an `<|eoi|>` later in the row."""
        closed = (state.token_ids == self.eoi_id).flip(1).cumsum(dim=1).flip(1) > 0  # an <|eoi|> at or after
        codes = self.image_codes(state) & closed
        return codes if state.valid is None else codes & state.valid


@register_reducer
class Registers(LearnedReducer):
    name = "registers"
    trainable = True

    def __init__(self, layout, num_layers: int, tokens: int | None = None, layer: int | None = None, path: str = ""):
        super().__init__(layout, num_layers)
        self.find_image(layout)
        if tokens is not None and (not isinstance(tokens, int) or tokens < 1):
            raise ConfigError(f"reducer registers: tokens must be an integer >= 1, got {tokens}")
        if layer is not None and (not isinstance(layer, int) or not 1 <= layer <= num_layers):
            raise ConfigError(f"reducer registers: layer must be in [1, {num_layers}], got {layer}")
        self.tokens, self.layer, self.path = tokens, layer, str(path)
        self.inserter: InsertTokens | None = None  # built by `prepare`, once the registers' size is known

    def prepare(self, model, train: bool) -> None:
        """Load the trained registers from the model's checkpoint dir (or `path`); with `train`, start
        from them when they match, else from a fresh initialisation."""
        directory = Path(self.path) if self.path else _source_dir(model)
        found = directory is not None and (directory / REGISTERS_FILE).is_file()
        if not train and not found:
            if directory is None:
                raise ConfigError(
                    "reducer registers: the model does not say which checkpoint dir it came from; "
                    "give registers:path=DIR"
                )
            raise ConfigError(
                f"reducer registers: {directory} has no trained registers ({REGISTERS_FILE}); "
                "train them with finetune.reducer, or give registers:path=DIR"
            )
        hidden = model.config.hidden_size
        saved = read_registers(directory / REGISTERS_FILE, hidden) if found else None
        if not train:
            embeddings, tokens, layer = saved
            for key, want, have in (("tokens", self.tokens, tokens), ("layer", self.layer, layer)):
                if want is not None and want != have:
                    raise ConfigError(
                        f"reducer registers: {directory} holds registers trained with tokens={tokens},layer={layer}, "
                        f"not {key}={want}"
                    )
            self.tokens, self.layer = tokens, layer
        else:
            self.tokens = self.tokens or DEFAULT_REGISTERS
            self.layer = self.layer or min(DEFAULT_REGISTER_LAYER, self.num_layers)
            # Continue from saved registers of the same shape and layer, as finetuning continues the weights.
            same = saved is not None and (saved[1], saved[2]) == (self.tokens, self.layer)
            embeddings = saved[0] if same else None
            if same:
                logger.info("reducer registers: training continues from %s", directory / REGISTERS_FILE)
        # Registers start like a new embedding row of this model (its initializer_range).
        self.inserter = InsertTokens(self.eoi_id, self.tokens, hidden, init_std=model.config.initializer_range)
        if embeddings is not None:
            self.inserter.embeddings.data.copy_(embeddings)
        reference = model.model.norm.weight  # the model's device and dtype (never wrapped by peft)
        self.inserter.to(device=reference.device, dtype=reference.dtype)

    def save(self, directory: str | Path) -> None:
        """Write `registers.safetensors` in `directory`: the embeddings, with `tokens` and `layer`."""
        from safetensors.torch import save_file

        embeddings = self._inserter().embeddings.detach().cpu().contiguous()
        metadata = {"format": "pt", "reducer": self.name, "tokens": str(self.tokens), "layer": str(self.layer)}
        save_file({"embeddings": embeddings}, str(Path(directory) / REGISTERS_FILE), metadata=metadata)

    def before_llm(self, state: TokenState, cache: KVCache | None) -> TokenState:
        if state.hidden.shape[1] == 1:  # a decode step: never a whole image
            return state
        inserted = self._inserter().on_embed(state, cache)
        if inserted is state:
            logger.info("reducer registers: the prompt has no image; nothing to compress")
            return state
        if cache is not None and inserted.valid is not None:
            return compact(inserted, inserted.valid, pad_first=True)  # InsertTokens pads rows at the end
        return inserted

    def on_layer_end(self, layer_idx: int, state: TokenState, cache: KVCache | None) -> TokenState:
        if layer_idx != self.layer - 1 or self.layer == self.num_layers or state.hidden.shape[1] == 1:
            return state
        codes = self.closed_codes(state)
        if not bool(codes.any()):
            return state
        keep = ~codes if state.valid is None else state.valid & ~codes
        self.kept_counts = (keep & self.image_codes(state)).sum(dim=1).tolist()
        self.record(self.layer, keep)
        return compact(state, keep, pad_first=cache is not None)

    def _inserter(self) -> InsertTokens:
        if self.inserter is None:
            raise ConfigError("reducer registers: attach it with attach_reducer(model, spec) so it loads its registers")
        return self.inserter


@register_reducer
class Matryoshka(LearnedReducer):
    name = "matryoshka"

    def __init__(self, layout, num_layers: int, tokens: int = DEFAULT_BUDGET) -> None:
        super().__init__(layout, num_layers)
        image = self.find_image(layout)
        if image.grid is not None or image.row_end:
            grid = "x".join(map(str, image.grid))
            raise ConfigError(
                f"reducer matryoshka: the image range is a {grid} grid; it needs a 1D prefix image tokenizer "
                f"({', '.join(PREFIX_TOKENIZERS)})"
            )
        if not isinstance(tokens, int) or not 1 <= tokens <= image.max_frames:
            raise ConfigError(f"reducer matryoshka: tokens must be in [1, {image.max_frames}], got {tokens}")
        self.tokens = tokens
        self.ids_per_image = tokens * image.stream_levels

    def prepare(self, model, train: bool) -> None:
        tokenizer = model.modality_tokenizers.get("image")
        name = tokenizer.name if tokenizer is not None else "none"
        if name not in PREFIX_TOKENIZERS:
            raise ConfigError(
                f"reducer matryoshka: the model's image tokenizer is {name}, not a 1D prefix tokenizer "
                f"({', '.join(PREFIX_TOKENIZERS)})"
            )

    def before_llm(self, state: TokenState, cache: KVCache | None) -> TokenState:
        """Keep the first `tokens` codes of each image span; the tokens after a shortened span move
        up, so the sequence is exactly the one the shorter encoding gives (what training saw)."""
        if state.hidden.shape[1] == 1:
            return state
        codes = self.closed_codes(state)
        if not bool(codes.any()):
            logger.info("reducer matryoshka: the prompt has no image; nothing to reduce")
            return state
        counted = codes.long().cumsum(dim=1)
        at_begin = torch.where(state.token_ids == self.boi_id, counted, torch.zeros_like(counted))
        index = counted - at_begin.cummax(dim=1).values - 1  # each code's index within its span
        drop = codes & (index >= self.ids_per_image)
        self.kept_counts = (codes & ~drop).sum(dim=1).tolist()
        if not bool(drop.any()):
            return state
        keep = ~drop if state.valid is None else state.valid & ~drop
        self.record(0, keep)
        shift = drop.long().cumsum(dim=1)
        if state.document_ids is not None:  # positions shift within their own document only
            starts = torch.ones_like(drop)
            starts[:, 1:] = state.document_ids[:, 1:] != state.document_ids[:, :-1]
            shift = shift - torch.where(starts, shift, torch.zeros_like(shift)).cummax(dim=1).values
        moved = dataclasses.replace(state, position_ids=state.position_ids - shift)
        return compact(moved, keep, pad_first=cache is not None)


def compact(state: TokenState, keep: Tensor, pad_first: bool) -> TokenState:
    """The state with only its `keep` (B, T) tokens, in order (`keep` excludes invalid slots).

    Rows keeping fewer are padded with invalid slots that carry no token and no label (token id
    and source index -1). The padding goes after the kept tokens when no KV cache is given (a
    training forward reads each token's target from the next slot), before them in a prefill with
    a cache (the generator reads every row's next-token logits from the last slot).
    """
    if bool(keep.all()):
        return state
    counts = keep.sum(dim=1)
    t, width = keep.shape[1], int(counts.max())
    slots = torch.arange(t, device=keep.device).expand_as(keep)
    columns = torch.arange(width, device=keep.device)[None, :]
    if pad_first:
        index = torch.where(keep, slots + t, slots).argsort(dim=1)[:, t - width :]
        padded = columns < (width - counts)[:, None]
    else:
        index = torch.where(keep, slots, slots + t).argsort(dim=1)[:, :width]
        padded = columns >= counts[:, None]
    reduced = state.select(index)
    reduced.token_ids = reduced.token_ids.masked_fill(padded, -1)
    reduced.source_index = reduced.source_index.masked_fill(padded, -1)
    reduced.valid = None if not bool(padded.any()) else ~padded
    return reduced


def read_registers(path: Path, hidden_size: int) -> tuple[Tensor, int, int]:
    """(embeddings (K, hidden), K, layer) of a `registers.safetensors`, checked against the model."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            embeddings = f.get_tensor("embeddings")
        tokens, layer = int(metadata["tokens"]), int(metadata["layer"])
    except (SafetensorError, KeyError, ValueError, OSError) as err:
        raise CheckpointError(f"{path}: not a registers file ({type(err).__name__}: {err})") from None
    if tuple(embeddings.shape) != (tokens, hidden_size):
        raise CheckpointError(
            f"{path}: registers of shape {tuple(embeddings.shape)}, this model needs ({tokens}, {hidden_size})"
        )
    return embeddings, tokens, layer


def _source_dir(model) -> Path | None:
    """The checkpoint dir the model was loaded from (`name_or_path`, as on Hugging Face models)."""
    return Path(model.name_or_path) if model.name_or_path else None
