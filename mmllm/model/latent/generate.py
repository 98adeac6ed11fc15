"""Batched, KV-cached latent decoding: a question, a latent span of n steps per sample, then the answer.

    outputs = latent_generate(model, prompt_ids, latent_steps=[6, 6, 3], config=GenerationConfig(...))

Each prompt (ids ending with `<|assistant|>`, as `encode_prompts` makes them) gets `<|bolt|>`, the
prefill runs, then every row feeds its `<|latent|>` steps and `<|eolt|>` one forward each (the
generator's forced ids), the head turning each latent slot's input into the previous position's
state; then the reply is decoded as usual (greedy by default) until end of turn. Rows with fewer
steps close their span and start their answer while others are still thinking, in the same
forwards, so a batch with ragged step counts costs max(steps) + answer forwards, never a forward
per row. Coconut's reference decodes one question at a time; this is the batched version.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mmllm.errors import ConfigError, InputError
from mmllm.generation.generator import GenerationConfig, GenerationOutput, Generator
from mmllm.model.latent.base import require_latent_head


@dataclass
class LatentOutput(GenerationOutput):
    latent_steps: int = 0

    @property
    def generated_tokens(self) -> int:
        """What the answer cost, counted as Coconut counts it: each continuous thought is a token."""
        return self.latent_steps + len(self.ids)


def latent_generate(
    model,
    prompts: Sequence[Sequence[int]],
    latent_steps: int | Sequence[int],
    config: GenerationConfig | None = None,
    generator: Generator | None = None,
) -> list[LatentOutput]:
    """Continue each prompt with a latent span of its number of steps, then its reply; `generator`
    (default: a new one) is the model's, whose `stats` then time this call (as `mmllm eval` reads them)."""
    head = require_latent_head(model)
    steps = [latent_steps] * len(prompts) if isinstance(latent_steps, int) else list(latent_steps)
    if len(steps) != len(prompts):
        raise InputError(f"latent steps: {len(steps)} counts for {len(prompts)} prompts")
    head.check_steps(steps)
    if config is not None and config.guidance.active:  # a twin's forward would overwrite the fed-back state
        raise ConfigError("latent decoding does not take classifier-free guidance")
    forced = [[head.latent_id] * n + [head.end_id] for n in steps]
    generator = generator if generator is not None else Generator(model)
    outputs = generator.generate([[*p, head.begin_id] for p in prompts], config, forced=forced)
    return [LatentOutput(o.ids, o.finish_reason, o.prompt_tokens, n) for o, n in zip(outputs, steps, strict=True)]
