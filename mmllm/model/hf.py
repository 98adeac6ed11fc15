"""Hugging Face Llama / Qwen2 / Mistral / Qwen3 configs to `ModelConfig` and back.

Parameter names are already equal, so conversion is only about configs (and the tokenizer
with its added tokens on export). Everything HF-specific lives in this one module.
"""

from __future__ import annotations

from typing import Any

from mmllm.errors import CheckpointError
from mmllm.model.config import ModelConfig
from mmllm.vocab import END_OF_TURN, VocabLayout

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
    "Qwen3ForCausalLM": "qwen3",
}
MODEL_TYPES = {model_type: arch for arch, model_type in ARCHITECTURES.items()}


def architecture_of(hf_config: dict[str, Any], where: str) -> str:
    """The supported architecture a HF config.json describes, or a one-line error."""
    names = hf_config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return name
    model_type = hf_config.get("model_type")
    if model_type in MODEL_TYPES and not names:
        return MODEL_TYPES[model_type]
    found = ", ".join(names) or model_type or "none"
    raise CheckpointError(f"{where}: unsupported architecture {found} (supported: {', '.join(ARCHITECTURES)})")


def config_from_hf(hf_config: dict[str, Any], where: str) -> ModelConfig:
    """Our config for a HF Llama-family config.json (transformers 4.x or 5.x keys)."""
    arch = architecture_of(hf_config, where)
    family = ARCHITECTURES[arch]
    if hf_config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act {hf_config['hidden_act']!r} is not supported (only silu)")
    rope = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", hf_config.get("rope_theta", 10000.0))
    partial = rope.pop("partial_rotary_factor", hf_config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise CheckpointError(f"{where}: partial rotary embeddings (factor {partial}) are not supported")
    if rope.get("rope_type", rope.get("type", "default")) == "default":
        rope = {}
    attention_bias = bool(hf_config.get("attention_bias", False))
    heads = hf_config["num_attention_heads"]
    config = dict(
        vocab_size=hf_config["vocab_size"],
        hidden_size=hf_config["hidden_size"],
        intermediate_size=hf_config["intermediate_size"],
        num_hidden_layers=hf_config["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=hf_config.get("num_key_value_heads") or heads,
        head_dim=hf_config.get("head_dim") or hf_config["hidden_size"] // heads,
        max_position_embeddings=hf_config.get("max_position_embeddings", 4096),
        rms_norm_eps=hf_config.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=rope or None,
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        initializer_range=hf_config.get("initializer_range", 0.02),
        hf_architecture=arch,
    )
    if family == "llama":
        config.update(qkv_bias=attention_bias, o_proj_bias=attention_bias, mlp_bias=bool(hf_config.get("mlp_bias")))
    elif family == "qwen2":
        config.update(qkv_bias=True)  # Qwen2 always has q/k/v biases and no o_proj bias
    elif family == "qwen3":
        config.update(qkv_bias=attention_bias, o_proj_bias=attention_bias, qk_norm=True)
    config.update(_sliding_window_from_hf(hf_config, family))
    try:
        return ModelConfig(**config)
    except Exception as err:
        raise CheckpointError(f"{where}: {err}") from None


def _sliding_window_from_hf(hf_config: dict[str, Any], family: str) -> dict[str, Any]:
    window = hf_config.get("sliding_window")
    if family == "mistral":
        return {"sliding_window": window}
    if family in ("qwen2", "qwen3") and hf_config.get("use_sliding_window") and window:
        layer_types = hf_config.get("layer_types")
        if layer_types is None:
            cutoff = hf_config.get("max_window_layers", hf_config["num_hidden_layers"])
            layer_types = [
                "sliding_attention" if i >= cutoff else "full_attention" for i in range(hf_config["num_hidden_layers"])
            ]
        return {"sliding_window": window, "layer_types": tuple(layer_types)}
    return {}


def export_architecture(config: ModelConfig) -> str:
    """The HF class that represents this config exactly, or a one-line error."""
    if config.qk_norm:
        if config.qkv_bias != config.o_proj_bias or config.mlp_bias:
            raise CheckpointError("q/k-norm models export as Qwen3, which needs qkv bias == o_proj bias, no mlp bias")
        return "Qwen3ForCausalLM"
    all_sliding = config.sliding_window is not None and (
        config.layer_types is None or all(t == "sliding_attention" for t in config.layer_types)
    )
    if config.qkv_bias and not config.o_proj_bias:
        if config.mlp_bias:
            raise CheckpointError("qkv bias without o_proj bias exports as Qwen2, which has no mlp bias")
        return "Qwen2ForCausalLM"
    if config.sliding_window is not None:
        if not all_sliding or config.qkv_bias or config.o_proj_bias or config.mlp_bias:
            raise CheckpointError(
                "a sliding window exports as Mistral (every layer, no biases) or Qwen2/3 (qkv bias or q/k-norm)"
            )
        return "MistralForCausalLM"
    if config.qkv_bias != config.o_proj_bias:
        raise CheckpointError("Llama needs qkv bias and o_proj bias together (its attention_bias)")
    return "LlamaForCausalLM"


def config_to_hf(config: ModelConfig, layout: VocabLayout | None) -> dict[str, Any]:
    """Keyword arguments of the HF config class that reproduces this model."""
    arch = export_architecture(config)
    family = ARCHITECTURES[arch]
    rope = {"rope_theta": config.rope_theta, "rope_type": "default", **(config.rope_scaling or {})}
    kwargs: dict[str, Any] = dict(
        architectures=[arch],
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters=rope,
        tie_word_embeddings=config.tie_word_embeddings,
        initializer_range=config.initializer_range,
        hidden_act="silu",
    )
    if family == "qwen2" and config.head_dim != config.hidden_size // config.num_attention_heads:
        raise CheckpointError("Qwen2 derives head_dim from hidden_size / heads; this config sets another head_dim")
    if family in ("llama", "qwen3"):
        kwargs["attention_bias"] = config.qkv_bias
    if family == "llama":
        kwargs["mlp_bias"] = config.mlp_bias
    if family == "mistral":
        kwargs["sliding_window"] = config.sliding_window
    elif family in ("qwen2", "qwen3"):
        sliding = config.sliding_window is not None
        kwargs.update(use_sliding_window=sliding, sliding_window=config.sliding_window)
        kwargs["layer_types"] = list(config.layer_types or ["full_attention"] * config.num_hidden_layers)
        if sliding and config.layer_types is None:
            kwargs["layer_types"] = ["sliding_attention"] * config.num_hidden_layers
    if layout is not None:
        kwargs.update(
            bos_token_id=layout.token_id("<|bos|>"),
            eos_token_id=[layout.token_id("<|eos|>"), layout.token_id(END_OF_TURN)],
            pad_token_id=layout.pad_id,
        )
    return kwargs


def hf_config_class(architecture: str):
    import transformers

    return getattr(transformers, architecture.replace("ForCausalLM", "Config"))


def tokenizer_with_layout_tokens(text_tokenizer, layout: VocabLayout):
    """A copy of the text tokenizer whose added tokens give every layout id its name.

    Ids must come out equal to the layout's, so unused padding rows get `<|unused_N|>`
    fillers; the result is checked id by id.
    """
    import copy

    from tokenizers import AddedToken

    tokenizer = copy.deepcopy(text_tokenizer)
    if len(tokenizer) != layout.text_size:
        raise CheckpointError(
            f"text tokenizer has {len(tokenizer)} tokens but vocab_layout.json says {layout.text_size}"
        )
    names = [layout.token_name(i) for i in range(layout.text_size, layout.padded_size)]
    special = set(layout.special_tokens)
    tokenizer.add_tokens(
        [AddedToken(name, special=name in special, normalized=False) for name in names],
    )
    if len(tokenizer) != layout.padded_size or tokenizer.convert_tokens_to_ids(names[-1]) != layout.padded_size - 1:
        raise CheckpointError(
            "the text tokenizer already defines some layout token names; export cannot keep ids aligned"
        )
    specials = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
    tokenizer.add_special_tokens(specials)
    return tokenizer
