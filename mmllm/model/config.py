"""`ModelConfig`: every hyperparameter of the backbone in one dataclass.

Names follow Hugging Face's Llama-family configs where one exists, so importing a HF
`config.json` is a rename, not a translation. Reference configs live in `configs/model/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mmllm.config import load_config
from mmllm.errors import ConfigError

LayerType = Literal["full_attention", "sliding_attention"]


@dataclass
class ModelConfig:
    # Set from `VocabLayout.padded_size` when a model is built for a layout; 8192 is only the
    # default for bare backbone benchmarks (a multiple of 64, like every padded vocabulary).
    vocab_size: int = 8192
    hidden_size: int = 256
    # SwiGLU width: 8/3 of hidden (LLaMA), rounded up to a multiple of 64 for matmul tiling.
    intermediate_size: int = 704
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # HF `rope_parameters` other than theta, e.g. {"rope_type": "llama3", "factor": 8.0, ...};
    # None is plain RoPE. Supported types: default, linear, llama3, yarn.
    rope_scaling: dict[str, Any] | None = None
    qkv_bias: bool = False  # Qwen2 has it
    o_proj_bias: bool = False  # Llama's `attention_bias` sets it with qkv_bias
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each head's queries and keys (Qwen3, Chameleon)
    tie_word_embeddings: bool = False
    # Attend to at most this many most recent positions (the token itself included), on the
    # layers that `layer_types` marks "sliding_attention" (all layers when it is None).
    sliding_window: int | None = None
    layer_types: tuple[LayerType, ...] | None = None
    # Weight of the z-loss, mean(logsumexp(logits)^2); PaLM uses 1e-4 to keep logits from drifting.
    z_loss: float = 0.0
    initializer_range: float = 0.02
    # The HF family this model was imported from (LlamaForCausalLM, ...); export keeps it.
    hf_architecture: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")

    def window_for_layer(self, layer_idx: int) -> int | None:
        """The sliding window of one layer, or None for full causal attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is not None and self.layer_types[layer_idx] != "sliding_attention":
            return None
        return self.sliding_window

    def num_parameters(self) -> int:
        """Parameter count implied by the config (tied embeddings counted once)."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        q = self.num_attention_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        attn += (q + 2 * kv) * self.qkv_bias + h * self.o_proj_bias + 2 * self.head_dim * self.qk_norm
        mlp = 3 * h * self.intermediate_size
        mlp += (2 * self.intermediate_size + h) * self.mlp_bias
        per_layer = attn + mlp + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return embed + self.num_hidden_layers * per_layer + h

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        """The config of a checkpoint dir, as HF's `PretrainedConfig.from_pretrained` gives it (peft
        reads the base model's through it, to see whether the vocabulary was resized)."""
        from mmllm.model.mmllm import read_model_config

        return read_model_config(Path(path))

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ModelConfig:
        return load_config(cls, path, overrides)
