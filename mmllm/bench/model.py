"""`mmllm bench model`: our backbone against transformers' LlamaForCausalLM, forward + backward.

Both models get the same config and the same weights; the inputs are the same random ids
(labels = inputs). Losses are checked equal before timing, so the two compute the same thing.
"""

from __future__ import annotations

import platform

import torch

from mmllm.bench.timing import interleaved
from mmllm.model import hf
from mmllm.model.backbone import CausalLM
from mmllm.model.config import ModelConfig


def bench_model(
    config: ModelConfig, batch: int = 8, seq: int = 512, repeats: int = 5, warmup: int = 1, seed: int = 0
) -> dict:
    """Training-step tokens/s of ours and HF's Llama on the same weights; ratio = ours / HF."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if hf.export_architecture(config) != "LlamaForCausalLM":
        raise ValueError("bench model compares against LlamaForCausalLM; use a Llama-shaped config")
    torch.manual_seed(seed)
    ours = CausalLM(config).train()
    hf_config = LlamaConfig(**hf.config_to_hf(config, None))
    theirs = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa").train()
    theirs.load_state_dict(ours.state_dict())
    ids = torch.randint(config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))

    def step(model: torch.nn.Module) -> float:
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.item()

    loss_ours, loss_hf = step(ours), step(theirs)
    if abs(loss_ours - loss_hf) > 1e-4:
        raise RuntimeError(f"the two models disagree (loss {loss_ours:.6f} vs {loss_hf:.6f}); timing would mislead")
    timings = interleaved({"mmllm": lambda: step(ours), "hf": lambda: step(theirs)}, repeats, warmup)
    tokens = batch * seq
    ours_rate, hf_rate = timings["mmllm"].rate(tokens), timings["hf"].rate(tokens)
    return {
        "benchmark": "model forward+backward",
        "batch": batch,
        "seq": seq,
        "repeats": repeats,
        "parameters": config.num_parameters(),
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "loss": loss_ours,
        "tokens_per_s": {"mmllm": ours_rate, "hf": hf_rate},
        "ratio": ours_rate["median"] / hf_rate["median"],
    }


def format_model_bench(result: dict) -> str:
    rows = [
        f"forward+backward, batch {result['batch']} x seq {result['seq']}, {result['parameters'] / 1e6:.1f}M params, "
        f"{result['threads']} threads, {result['repeats']} interleaved repeats",
        f"{'model':<8} {'tokens/s (median)':>18} {'min':>10} {'max':>10} {'spread':>8}",
    ]
    for name, label in (("mmllm", "mmllm"), ("hf", "HF Llama")):
        r = result["tokens_per_s"][name]
        rows.append(f"{label:<8} {r['median']:>18.0f} {r['min']:>10.0f} {r['max']:>10.0f} {r['spread']:>7.1%}")
    rows.append(f"ratio mmllm / HF: {result['ratio']:.3f}")
    return "\n".join(rows)
