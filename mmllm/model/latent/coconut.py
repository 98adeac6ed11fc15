"""Continuous thought: Coconut (Hao et al. 2024, "Training Large Language Models to Reason in a
Continuous Latent Space").

Inside a latent span `<|bolt|> <|latent|> x n <|eolt|>`, the input embedding of each latent slot is
the last hidden state (after the final norm, as Coconut takes `hidden_states[-1]`) of the position
before it: the model's "continuous thought", never decoded to a token. Each slot is one forward over
the new position, the KV cache of everything before reused (`latent_forward`, and decoding through
`latent_generate`). Coconut's training curriculum is in curriculum.py, its data formats in formats.py.

Knobs (`CoconutHead` arguments, saved with the head):

    projection         "none": the state as it is (the paper); "linear": through a Linear layer;
                       "mlp": through a residual two-layer MLP. Both learned maps start as the
                       identity, so training starts from the paper's head and learns what to change.
    max_latent_steps   the most latent slots a sequence may hold (base.py; default 8, Coconut's
                       MAX_N_LATENT).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from mmllm.errors import ConfigError
from mmllm.model.latent.base import DEFAULT_MAX_LATENT_STEPS, LatentHead, register_head
from mmllm.vocab import VocabLayout

Projection = Literal["none", "linear", "mlp"]
PROJECTIONS = ("none", "linear", "mlp")


class ResidualMLP(nn.Module):
    """x + down(gelu(up(x))), with `down` zero-initialised: the identity until trained."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.up = nn.Linear(hidden_size, hidden_size)  # as wide as the state: a small head, not a second MLP block
        self.down = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.down(nn.functional.gelu(self.up(x)))


def identity_linear(hidden_size: int) -> nn.Linear:
    layer = nn.Linear(hidden_size, hidden_size)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(hidden_size))
        layer.bias.zero_()
    return layer


@register_head
class CoconutHead(LatentHead):
    name = "coconut"
    objective = "coconut"  # curriculum.py

    def __init__(
        self,
        layout: VocabLayout,
        hidden_size: int,
        max_latent_steps: int = DEFAULT_MAX_LATENT_STEPS,
        projection: Projection = "none",
    ) -> None:
        if projection not in PROJECTIONS:
            raise ConfigError(
                f"latent head coconut: projection must be one of {', '.join(PROJECTIONS)}, got {projection!r}"
            )
        module = {"none": None, "linear": identity_linear, "mlp": ResidualMLP}[projection]
        super().__init__(layout, hidden_size, max_latent_steps, module(hidden_size) if module else None)
        self.projection_kind = projection

    def options(self) -> dict[str, Any]:
        return {**super().options(), "projection": self.projection_kind}
