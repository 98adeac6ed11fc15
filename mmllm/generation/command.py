"""`mmllm generate`: one prompt (text plus attached media files) -> a reply saved as files.

The reply's text streams to stdout as it is generated; OUT/reply.txt holds it, each medium is
saved as OUT/reply-<k>.png / .wav / .gif / .json, and OUT/reply.json lists the parts with their
files and any decode flags.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmllm.data.media import read_media
from mmllm.errors import ConfigError
from mmllm.generation.generator import GenerationConfig, Generator
from mmllm.generation.guidance import Guidance
from mmllm.generation.media_files import save_reply_media
from mmllm.generation.prompts import Prompt, decode_replies, encode_prompts, reply_text
from mmllm.generation.sampling import SamplingParams, parse_sampling
from mmllm.generation.streaming import TextStream

MEDIA_FLAGS = ("image", "audio", "video", "action")


def sampling_settings(specs: list[str]) -> tuple[SamplingParams, dict[str, SamplingParams]]:
    """`--sampling temperature=0.7 --sampling image:top_k=100` -> (default, per modality)."""
    default, per_modality = SamplingParams(), {}
    for spec in specs:
        head, sep, rest = spec.partition(":")
        if sep and "=" not in head:
            per_modality[head] = parse_sampling(rest, per_modality.get(head, default))
        else:
            default = parse_sampling(spec, default)
    return default, per_modality


def build_prompt(args: argparse.Namespace) -> Prompt:
    content = []
    for modality in MEDIA_FLAGS:
        for path in getattr(args, modality):
            content.append({"type": modality, "array": read_media(modality, path)})
    content.append({"type": "text", "text": args.prompt})
    return Prompt([{"role": "user", "content": content}], reply_modality=args.reply)


def run_generate(model, args: argparse.Namespace) -> None:
    from mmllm.cli import parse_scales

    layout = model.layout
    if args.reply != "text" and args.reply not in layout.modalities:
        raise ConfigError(f"--reply {args.reply}: the model's modalities are {', '.join(layout.modalities)}")
    default, per_modality = sampling_settings(args.sampling)
    generator = Generator(model)
    if args.reply != "text" and args.reply not in generator.generatable:
        raise ConfigError(f"--reply {args.reply}: the model's {args.reply} tokenizer cannot decode (encode-only)")
    guidance = Guidance(parse_scales(args.guidance))
    (prompt,) = encode_prompts(model, [build_prompt(args)])
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens, default=default, sampling=per_modality, guidance=guidance, seed=args.seed
    )
    stream = TextStream(layout, model.text_tokenizer, sys.stdout)
    for token in prompt.reply_prefix:
        stream(0, token)
    uncond = [prompt.unconditional(layout)] if guidance.active else None
    (output,) = generator.generate([prompt.ids], config, uncond, on_token=stream)
    stream.close()
    (parts,) = decode_replies(model, [prompt.reply(output.ids)])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = iter(save_reply_media(parts, out, "reply"))
    listing = []
    for part in parts:
        entry = {"type": part.kind, "text": part.text} if part.kind == "text" else {"type": part.kind}
        if part.kind != "text" and part.media is not None:
            entry["file"] = next(files).name
        if part.flag:
            entry["flag"] = part.flag
        listing.append(entry)
    (out / "reply.txt").write_text(reply_text(parts) + "\n", encoding="utf-8")
    summary = {"parts": listing, "finish_reason": output.finish_reason, "new_tokens": len(output.ids)}
    (out / "reply.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"reply -> {out} ({len(output.ids)} new ids, {output.finish_reason})", file=sys.stderr)
