"""Latent-reasoning heads: what every head shares, and how one is attached, found, saved and loaded.

A latent head is a backbone hook (it builds on `FeedbackLatent`, hooks.py) that owns the `<|latent|>`
slots of a latent span, `<|bolt|> <|latent|> x n <|eolt|>`: each slot's input embedding is computed
from the last hidden state of the position before it, so the model reasons in its own hidden space
instead of in words. A head subclass chooses the map from that state to the next input (its
`projection`): Coconut (coconut.py) feeds the state back, optionally through a small projection;
CoLaR's compressed-embedding predictor and Mirage's latent visual tokens are other maps of the same
slot, with losses of their own. Token Assorted's discrete latent codes are vocabulary codes and need
no head.

A slot needs the state just before it, so every latent step is a forward of its own over the new
position, the KV cache carrying everything before it (`latent_forward` for whole sequences,
training included; `mmllm.model.latent.generate` for decoding).

Knob common to every head:

    max_latent_steps   the most latent slots one sequence may hold (default 8: Coconut's
                       MAX_N_LATENT); asking for more is a one-line ConfigError.

A trained head is saved as `latent_head.safetensors` beside the checkpoint's weights (or its LoRA
adapter): its tensors, with its registry name, hidden size and knobs as metadata. `load_latent_head`
attaches the head of a checkpoint; a checkpoint without one is a one-line CheckpointError.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mmllm.errors import CheckpointError, ConfigError, InputError
from mmllm.model.hooks import FeedbackLatent
from mmllm.vocab import LATENT_TOKEN, VocabLayout

LATENT_HEAD_FILE = "latent_head.safetensors"  # beside model.safetensors (or the LoRA adapter)
# Coconut's MAX_N_LATENT: room for its longest curriculum (GSM8K: 3 stages x 2 thoughts = 6).
DEFAULT_MAX_LATENT_STEPS = 8


class LatentHead(FeedbackLatent):
    """Base class of latent heads: subclasses set `name`, build their `projection` and list their
    knobs in `options` (what `save` records and `read_latent_head` passes back to `__init__`)."""

    name: ClassVar[str] = ""
    objective: ClassVar[str] = ""  # the training objective (mmllm.training.objectives) that trains the head

    def __init__(
        self,
        layout: VocabLayout,
        hidden_size: int,
        max_latent_steps: int = DEFAULT_MAX_LATENT_STEPS,
        projection: nn.Module | None = None,
    ) -> None:
        if not isinstance(max_latent_steps, int) or max_latent_steps < 1:
            raise ConfigError(
                f"latent head {self.name}: max_latent_steps must be an integer >= 1, got {max_latent_steps}"
            )
        super().__init__(layout.token_id(LATENT_TOKEN), hidden_size, projection if projection is not None else False)
        self.hidden_size = hidden_size
        self.max_latent_steps = max_latent_steps
        self.begin_id, self.end_id = layout.begin_id("latent"), layout.end_id("latent")

    def options(self) -> dict[str, Any]:
        """The knobs this head was built with (JSON values), as `__init__` takes them."""
        return {"max_latent_steps": self.max_latent_steps}

    def architecture(self) -> dict[str, Any]:
        """The knobs that make two heads' weights interchangeable (training-only knobs left out), so
        a later stage can continue from a saved head."""
        return self.options()

    def check_steps(self, steps: Sequence[int]) -> None:
        """Refuse latent step counts outside [0, max_latent_steps], in one line."""
        if any(n < 0 for n in steps):
            raise InputError(f"latent steps must be >= 0, got {min(steps)}")
        if steps and max(steps) > self.max_latent_steps:
            raise ConfigError(
                f"{max(steps)} latent steps asked for; the {self.name} head is configured for at most "
                f"{self.max_latent_steps} (max_latent_steps)"
            )

    def save(self, directory: str | Path) -> None:
        """Write `latent_head.safetensors` in `directory`: the head's tensors, name, hidden size and knobs."""
        from safetensors.torch import save_file

        tensors = {key: value.detach().cpu().contiguous() for key, value in self.state_dict().items()}
        metadata = {
            "format": "pt",
            "head": self.name,
            "hidden_size": str(self.hidden_size),
            "options": json.dumps(self.options()),
        }
        save_file(tensors, str(Path(directory) / LATENT_HEAD_FILE), metadata=metadata)


HEADS: dict[str, type[LatentHead]] = {}


def register_head(cls: type[LatentHead]) -> type[LatentHead]:
    HEADS[cls.name] = cls
    return cls


def registry() -> dict[str, type[LatentHead]]:
    """Every registered head, the built-in ones included."""
    from mmllm.model.latent import coconut, colar, mirage  # noqa: F401  (registers the built-in heads)

    return HEADS


def build_head(name: str, model, **options: Any) -> LatentHead:
    """The head `name` with `options`, sized for `model` (its layout and width); not attached."""
    if model.layout is None:
        raise ConfigError("latent heads need a model with a vocab layout")
    return make_head(name, model.layout, model.config.hidden_size, **options)


def make_head(name: str, layout: VocabLayout, hidden_size: int, **options: Any) -> LatentHead:
    """The head `name` with `options` for a model of this layout and width; one-line ConfigErrors for
    an unknown head, knob or value (what a finetuning config's `latent_head` is checked with)."""
    if name not in registry():
        raise ConfigError(f"unknown latent head {name!r} (heads: {', '.join(sorted(HEADS))})")
    try:
        return HEADS[name](layout, hidden_size, **options)
    except TypeError as err:
        raise ConfigError(f"latent head {name}: {err}") from None


# ---------------------------------------------------------------- on a model


def base_model(model):
    """The `MMLLM` inside a DeepSpeed engine (`.module`) or a peft wrapper (`get_base_model`)."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def find_latent_head(model) -> LatentHead | None:
    """The latent head attached to `model` (or to the model a wrapper holds), or None."""
    return next((hook for hook in base_model(model).model.hooks if isinstance(hook, LatentHead)), None)


def require_latent_head(model) -> LatentHead:
    head = find_latent_head(model)
    if head is None:
        raise InputError(
            "a latent span needs a model with a latent head, and this model has none "
            f"(load a checkpoint's {LATENT_HEAD_FILE} with load_latent_head)"
        )
    return head


def require_head_kind(model, kind: type[LatentHead]) -> LatentHead:
    """The model's latent head when it is a `kind`; else a one-line error naming what it has."""
    head = find_latent_head(model)
    if not isinstance(head, kind):
        found = "none" if head is None else f"a {head.name} head"
        raise ConfigError(f"{kind.name} needs a model with a {kind.name} latent head attached, this one has {found}")
    return head


def attach_latent_head(model, head: LatentHead) -> LatentHead:
    """Attach `head` at the model's hook points, on the model's device and dtype; one head per model."""
    model = base_model(model)
    if find_latent_head(model) is not None:
        raise ConfigError("the model already has a latent head attached; detach it first")
    reference = model.model.norm.weight  # the model's device and dtype (never wrapped by peft)
    head.to(device=reference.device, dtype=reference.dtype)
    return model.attach_hook(head)


def read_latent_head(path: str | Path, layout: VocabLayout, hidden_size: int) -> LatentHead:
    """The head saved at `path` (a `latent_head.safetensors`), rebuilt for a model of this width."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        name, saved_size, options = metadata["head"], int(metadata["hidden_size"]), json.loads(metadata["options"])
    except (SafetensorError, KeyError, ValueError, OSError) as err:
        raise CheckpointError(f"{path}: not a latent head file ({type(err).__name__}: {err})") from None
    if name not in registry():
        raise CheckpointError(f"{path}: holds a {name!r} head, which this version does not know ({', '.join(HEADS)})")
    if saved_size != hidden_size:
        raise CheckpointError(f"{path}: a head for hidden size {saved_size}, this model's is {hidden_size}")
    head = HEADS[name](layout, hidden_size, **options)
    try:
        head.load_state_dict(tensors)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: the tensors do not fit a {name} head ({str(err).splitlines()[0]})") from None
    return head


def load_latent_head(model, directory: str | Path | None = None) -> LatentHead:
    """Attach the head saved in `directory` (default: the checkpoint dir the model was loaded from)."""
    model = base_model(model)
    source = directory if directory is not None else model.name_or_path
    if not source:
        raise CheckpointError("the model does not say which checkpoint dir it came from; give the head's directory")
    path = Path(source) / LATENT_HEAD_FILE
    if not path.is_file():
        raise CheckpointError(f"{source}: no latent head ({LATENT_HEAD_FILE}); the checkpoint was trained without one")
    return attach_latent_head(model, read_latent_head(path, model.layout, model.config.hidden_size))


def check_latent_prompts(model, prompts: Sequence[Sequence[int]], forced: Sequence[Sequence[int]] = ()) -> None:
    """One-line errors for latent steps a generator cannot run: any for a model without a head, and
    any inside a prompt (each must be a forward of its own: forced ids). A span without steps,
    `<|bolt|> <|eolt|>`, is plain tokens."""
    latent = base_model(model).layout.token_id(LATENT_TOKEN)
    in_prompt = any(latent in p for p in prompts)
    if (in_prompt or any(latent in f for f in forced)) and find_latent_head(model) is None:
        require_latent_head(model)
    if in_prompt:
        raise InputError(
            "latent steps cannot be part of a prompt (each is a forward of its own); end the prompt with <|bolt|> "
            "and give the steps as forced ids, as mmllm.model.latent.latent_generate does"
        )


# ---------------------------------------------------------------- whole sequences


def latent_forward(model, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Logits (B, T, V) of sequences holding latent slots, each slot fed by the attached head.

    The columns are cut before every column where some row has a latent slot, and each piece is
    one forward over the KV cache of everything before it: n + 1 forwards for rows whose n slots
    share their columns (Coconut's schedule; `align_latent_spans` lines rows up that way), the
    prefix never recomputed. With gradients enabled the cache keeps them, so the loss reaches
    every earlier position through the fed-back states. Rows may hold slots in different columns
    or none; a row's non-latent token in a cut column is embedded as usual. Hooks must keep the
    number of tokens (no token reducer alongside).
    """
    head = find_latent_head(model)
    is_latent = input_ids == (head.latent_id if head is not None else base_model(model).layout.token_id(LATENT_TOKEN))
    if head is None and bool(is_latent.any()):
        require_latent_head(model)
    if head is not None:
        head.last_hidden = None  # no state from an earlier call may feed this one's slots
    columns = is_latent.any(dim=0).nonzero().flatten().tolist()
    bounds = [0, *columns, input_ids.shape[1]]
    cache = base_model(model).new_kv_cache()
    logits = []
    for start, stop in itertools.pairwise(bounds):
        if start == stop:  # a slot in column 0: the head refuses it (no state before it)
            continue
        mask = attention_mask[:, start:stop] if attention_mask is not None else None
        out = model(input_ids=input_ids[:, start:stop], attention_mask=mask, kv_cache=cache)
        if out.logits.shape[1] != stop - start:
            raise ConfigError("latent_forward needs hooks that keep the number of tokens (no token reducer alongside)")
        logits.append(out.logits)
    return torch.cat(logits, dim=1)
