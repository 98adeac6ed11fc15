"""`mmllm demo`: the largest end-to-end piece of the pipeline that exists, on the toy world.

Today that is: toy-world captions -> a SentencePiece text tokenizer -> the vocabulary layout
-> a toy model built for it -> a native checkpoint -> a Hugging Face export that transformers
loads -> back to native, with every hand-off checked for identical logits. Later stages
(tokenizers, pretraining, finetuning, chat, eval) extend it. It writes OUT/report.md and
leaves OUT/model/, a self-contained checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from mmllm.chat_template import encode_conversation
from mmllm.config import load_config
from mmllm.data.toyworld import caption_corpus
from mmllm.errors import MMLLMError
from mmllm.model.config import ModelConfig
from mmllm.model.mmllm import MMLLM
from mmllm.text_tokenizer import fingerprint, train_text_tokenizer
from mmllm.vocab import VocabLayout, VocabSpec

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PARITY_TOLERANCE = 1e-4  # fp32 logits; the parity tests use the same bound


class DemoCheckFailed(MMLLMError):
    """A hand-off in the demo changed the model's outputs."""


def run_demo(out: Path, fast: bool = False, seed: int = 0) -> Path:
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    stages: list[tuple[str, float, str]] = []

    def stage(name: str, began: float, detail: str) -> None:
        stages.append((name, time.perf_counter() - began, detail))
        print(f"[demo] {name}: {detail}", flush=True)

    t = time.perf_counter()
    captions = caption_corpus(2000 if fast else 20000, seed)
    corpus = out / "data" / "captions.txt"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    corpus.write_text("\n".join(captions) + "\n", encoding="utf-8")
    stage("toy-world captions", t, f"{len(captions)} captions, e.g. '{captions[0]}'")

    t = time.perf_counter()
    tokenizer = train_text_tokenizer([corpus], out / "text_tokenizer", vocab_size=512)
    pieces = len(tokenizer(captions[0], add_special_tokens=False)["input_ids"])
    stage("text tokenizer", t, f"SentencePiece BPE, {len(tokenizer)} tokens; the first caption is {pieces} pieces")

    t = time.perf_counter()
    spec = load_config(VocabSpec, CONFIGS / "vocab" / "toy.yaml")
    layout = VocabLayout.build(
        len(tokenizer), spec.modality_ranges(), None, spec.registers, spec.pause, spec.spare, fingerprint(tokenizer)
    )
    stage("vocab layout", t, f"{layout.total_size} ids in use, padded to {layout.padded_size}")

    t = time.perf_counter()
    torch.manual_seed(seed)
    config = ModelConfig.from_yaml(CONFIGS / "model" / ("tiny.yaml" if fast else "toy.yaml"))
    model = MMLLM.from_config(config, layout, tokenizer).eval()
    model.save_pretrained(out / "model")
    stage("toy model", t, f"{model.config.num_parameters() / 1e6:.2f}M parameters -> {out / 'model'}")

    rng = np.random.default_rng(seed)
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is in this image?"},
                {"type": "image", "codes": rng.integers(0, layout.modalities["image"].codebook_size, (8, 8))},
            ],
        },
        {"role": "assistant", "content": captions[0]},
    ]
    encoded = encode_conversation(conversation, layout, tokenizer)
    ids = torch.tensor([encoded.input_ids])
    with torch.no_grad():
        reference = model(ids).logits

    checks: list[tuple[str, float]] = []

    def check(name: str, other: MMLLM) -> None:
        with torch.no_grad():
            diff = (other.eval()(ids).logits - reference).abs().max().item()
        checks.append((name, diff))
        if diff > PARITY_TOLERANCE:
            raise DemoCheckFailed(f"{name}: logits differ by {diff:.2e} (> {PARITY_TOLERANCE})")

    t = time.perf_counter()
    check("native checkpoint reload", MMLLM.from_pretrained(out / "model"))
    model.export_hf(out / "hf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(str(out / "hf")).eval()
    with torch.no_grad():
        hf_diff = (hf_model(ids).logits - reference).abs().max().item()
    checks.append(("transformers AutoModelForCausalLM on the export", hf_diff))
    if hf_diff > PARITY_TOLERANCE:
        raise DemoCheckFailed(f"HF export: logits differ by {hf_diff:.2e}")
    check("re-import of the HF export", MMLLM.from_pretrained(out / "hf"))
    hf_tokens = AutoTokenizer.from_pretrained(str(out / "hf")).convert_ids_to_tokens(encoded.input_ids)
    stage("checkpoints and HF parity", t, f"max logit difference {max(d for _, d in checks):.1e}")

    t = time.perf_counter()
    cache = model.new_kv_cache()
    with torch.no_grad():
        prefill = model(ids[:, :-8], kv_cache=cache).logits
        steps = [model(ids[:, i : i + 1], kv_cache=cache).logits for i in range(ids.shape[1] - 8, ids.shape[1])]
    cached = torch.cat([prefill, *steps], dim=1)
    cache_diff = (cached - reference).abs().max().item()
    checks.append(("KV-cached decoding (8 steps) vs full forward", cache_diff))
    if cache_diff > PARITY_TOLERANCE:
        raise DemoCheckFailed(f"KV cache: logits differ by {cache_diff:.2e}")
    stage("KV cache", t, f"8 cached steps match the full forward ({cache_diff:.1e})")

    report = out / "report.md"
    report.write_text(
        _report(layout, model, encoded.input_ids, hf_tokens, stages, checks, time.perf_counter() - start),
        encoding="utf-8",
    )
    return report


def _elide_span(tokens: list[str], begin: str, end: str, keep: int = 3) -> list[str]:
    """The tokens with a long span shortened to its first few codes, '...', and its last."""
    start, stop = tokens.index(begin), tokens.index(end)
    if stop - start - 1 <= keep + 1:
        return tokens
    hidden = stop - start - 1 - keep - 1
    return [*tokens[: start + 1 + keep], f"...({hidden} more)", *tokens[stop - 1 :]]


def _report(layout, model, input_ids, hf_tokens, stages, checks, seconds) -> str:
    lines = ["# mmllm demo report", "", f"Wall time: {seconds:.1f} s.", "", "## Stages", ""]
    lines += ["| stage | seconds | result |", "|---|---|---|"]
    lines += [f"| {name} | {secs:.1f} | {detail} |" for name, secs, detail in stages]
    lines += ["", "## Vocabulary layout", "", "```", layout.describe(), "```", ""]
    lines += ["## A conversation through the chat template", ""]
    lines += [f"{len(input_ids)} ids, as the exported HF tokenizer names them (image codes elided):", ""]
    lines += ["```", " ".join(_elide_span(hf_tokens, "<|boi|>", "<|eoi|>")), "```", ""]
    lines += ["## Checks (max absolute logit difference, fp32)", "", "| check | max diff |", "|---|---|"]
    lines += [f"| {name} | {diff:.1e} |" for name, diff in checks]
    lines += ["", f"Model: {model.config.num_parameters():,} parameters, {model.config.num_hidden_layers} layers.", ""]
    return "\n".join(lines)
