"""`mmllm bench generate`: decode speed against transformers' `generate`, and batched CFG.

Two comparisons on one checkpoint (the demo model by default), in one run:

* decode tokens/s of our `Generator` against `AutoModelForCausalLM.generate` on the same
  weights (our `export_hf`), greedy, both producing exactly `tokens` new ids per row (HF with
  `min_new_tokens`, ours with no stop ids), at each batch size; prompts are toy-world captions
  of different lengths, left-padded for both. Ours also runs its modality state machine.
* classifier-free guidance for an image reply: conditional and unconditional rows batched
  into one forward per step, against the same generator running them as two forwards.

Timings are interleaved repeats (`bench.timing.interleaved`), so drift hits every contender alike.
"""

from __future__ import annotations

import platform
import tempfile
from pathlib import Path

import torch

from mmllm.bench.timing import interleaved
from mmllm.data.toyworld import caption_corpus
from mmllm.errors import CheckpointError
from mmllm.generation import GenerationConfig, Generator, Guidance, Prompt, encode_prompts
from mmllm.model.mmllm import MMLLM

CFG_SCALE = 3.0  # a typical image guidance scale (LlamaGen uses 2-4); the cost does not depend on it
WARMUP = 1


def _prompts(model: MMLLM, batch: int, reply: str) -> list:
    captions = caption_corpus(batch, seed=1)
    asks = [f"Describe {c}." if reply == "text" else f"Draw {c}." for c in captions]
    return encode_prompts(model, [Prompt([{"role": "user", "content": a}], reply_modality=reply) for a in asks])


def bench_generate(path: Path, tokens: int, batches: list[int], repeats: int, threads: int | None) -> dict:
    from transformers import AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)
    model = MMLLM.from_pretrained(path).eval()
    if model.layout is None or model.text_tokenizer is None:
        raise CheckpointError(f"{path}: bench generate needs a checkpoint with a vocab layout and text tokenizer")
    generator = Generator(model)
    with tempfile.TemporaryDirectory() as tmp:
        model.export_hf(tmp)
        hf_model = AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="sdpa").eval()
    result: dict = {
        "benchmark": "generate",
        "model": str(path),
        "parameters": model.config.num_parameters(),
        "tokens": tokens,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "decode": {},
        "cfg": {},
    }
    pad = model.layout.pad_id
    for batch in batches:
        prompts = [p.ids for p in _prompts(model, batch, "text")]
        ours_config = GenerationConfig(max_new_tokens=tokens, stop_ids=())
        hf_ids, hf_mask = _left_padded(prompts, pad)

        def ours(prompts=prompts, config=ours_config) -> None:
            outputs = generator.generate(prompts, config)
            assert all(len(o.ids) == tokens for o in outputs)

        def theirs(ids=hf_ids, mask=hf_mask) -> None:
            with torch.no_grad():
                out = hf_model.generate(
                    ids,
                    attention_mask=mask,
                    max_new_tokens=tokens,
                    min_new_tokens=tokens,
                    do_sample=False,
                    pad_token_id=pad,
                )
            assert out.shape[1] == ids.shape[1] + tokens

        timings = interleaved({"mmllm": ours, "hf": theirs}, repeats, WARMUP)
        new_tokens = batch * tokens
        rates = {name: timing.rate(new_tokens) for name, timing in timings.items()}
        result["decode"][str(batch)] = {
            "tokens_per_s": rates,
            "ratio": rates["mmllm"]["median"] / rates["hf"]["median"],
        }

        image = _prompts(model, batch, "image")
        cond, uncond = [p.ids for p in image], [p.unconditional(model.layout) for p in image]
        span = model.layout.modality("image").max_length + 1
        configs = {
            mode: GenerationConfig(max_new_tokens=span, guidance=Guidance({"image": CFG_SCALE}, mode=mode))
            for mode in ("batched", "sequential")
        }
        timings = interleaved(
            {
                mode: (lambda c=config, p=cond, u=uncond: generator.generate(p, c, u))
                for mode, config in configs.items()
            },
            repeats,
            WARMUP,
        )
        rates = {name: timing.rate(batch * span) for name, timing in timings.items()}
        result["cfg"][str(batch)] = {
            "tokens_per_s": rates,
            "ratio": rates["batched"]["median"] / rates["sequential"]["median"],
        }
    return result


def _left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :] = torch.tensor(prompt)
        mask[row, length - len(prompt) :] = 1
    return ids, mask


def format_generate_bench(result: dict) -> str:
    rows = [
        f"greedy decode, {result['tokens']} new tokens per row, {result['parameters'] / 1e6:.2f}M params, "
        f"{result['threads']} threads, {result['repeats']} interleaved repeats",
        f"{'batch':>5} {'mmllm tok/s':>12} {'HF tok/s':>10} {'ratio':>7}   "
        f"{'CFG batched':>12} {'CFG 2-pass':>11} {'ratio':>7}",
    ]
    for batch, decode in result["decode"].items():
        cfg = result["cfg"][batch]
        rows.append(
            f"{batch:>5} {decode['tokens_per_s']['mmllm']['median']:>12.0f} "
            f"{decode['tokens_per_s']['hf']['median']:>10.0f} {decode['ratio']:>7.2f}   "
            f"{cfg['tokens_per_s']['batched']['median']:>12.0f} "
            f"{cfg['tokens_per_s']['sequential']['median']:>11.0f} {cfg['ratio']:>7.2f}"
        )
    return "\n".join(rows)
