"""Generation: batched, KV-cached decoding of text and media with per-modality masks,
sampling and classifier-free guidance (generator.py), and the prompt/reply codecs around it."""

from mmllm.generation.generator import GenerationConfig, GenerationOutput, Generator
from mmllm.generation.guidance import Guidance
from mmllm.generation.prompts import OutputPart, Prompt, decode_replies, encode_prompts, reply_text
from mmllm.generation.sampling import SamplingParams

__all__ = [
    "GenerationConfig",
    "GenerationOutput",
    "Generator",
    "Guidance",
    "OutputPart",
    "Prompt",
    "SamplingParams",
    "decode_replies",
    "encode_prompts",
    "reply_text",
]
