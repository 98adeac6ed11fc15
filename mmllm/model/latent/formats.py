"""One puzzle record, several ways to answer it: the baselines and the latent heads train on the same items.

A reasoning record of the toy world (`toy-prosqa`, `toy-arith`, `toy-visual-count`) keeps its
question (the user turn, images included), its chain-of-thought steps and its answer apart in
`meta` (Coconut's layout). The assistant turn is rebuilt per format:

    no-cot    "answer: X"                                      (Deng et al.'s no-CoT baseline)
    cot       step 1 \\n ... step n \\n "answer: X"              (plain chain of thought)
    pause     <|pause_0|> <|pause_1|> ... x `pause`, "answer: X"  (Goyal et al. 2024, pause tokens)
    coconut   <|bolt|> <|latent|> x m <|eolt|> steps k+1.. n, "answer: X"  (stage k of the curriculum)
    colar     <|bolt|> step 1 \\n ... step n \\n <|eolt|> "answer: X"   (CoLaR: the `colar` objective
              compresses the span's tokens into ceil(len/c) latent slots, c drawn per batch)
    mirage    <|bolt|> <|latent|> x `latent_steps` <|eolt|> "answer: X"  (Mirage: latent visual tokens, then
              the answer; the `mirage` objective distils the slots toward the question's image codes)
    assorted  <|begin_latent_codes|> codes of chunks 1..m <|end_latent_codes|> rest of the trace, "answer: X"
              (Token Assorted: a fitted `CotVQVAE` codes the first m chunks of L trace tokens, m drawn
              per example from 0..all chunks (at most `max_chunks`), keyed by `seed` and the puzzle)

The loss falls on the text and the `<|end_of_turn|>`, and on assorted's codes span, which the model
learns to write: pause tokens, latent spans and their delimiters are inputs, which inference feeds
too (`prompt_suffix`; `latent_generate` for the span).
Pause fillers cycle through the layout's distinct pause tokens rather than repeating one, since a
single shared thinking-token embedding trains worse ("Rethinking Thinking Tokens", 2025).

The chat template encodes text with special-token parsing off, so these turns are built as ids
here (`encode_puzzle`) and written as pretokenized shards (`write_puzzle_shards`) that the
finetuning loop reads like any other.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mmllm.chat_template import SPECIAL, EncodedConversation, encode_conversation, encode_text
from mmllm.data.toy_tasks import Puzzle
from mmllm.errors import ConfigError, InputError
from mmllm.model.latent.assorted import CODES_MODALITY, CotVQVAE, check_codes_fit, trace_ids
from mmllm.model.latent.curriculum import CoconutCurriculum
from mmllm.vocab import END_OF_TURN, LATENT_TOKEN, VocabLayout

Kind = Literal["no-cot", "cot", "pause", "coconut", "colar", "mirage", "assorted"]
KINDS = ("no-cot", "cot", "pause", "coconut", "colar", "mirage", "assorted")


@dataclass(frozen=True)
class PuzzleFormat:
    kind: Kind = "cot"
    stage: int = 0  # coconut: the curriculum stage (its first steps become latent thoughts)
    pause: int = 0  # pause: filler tokens before the answer
    latent_steps: int = 0  # mirage: latent visual tokens before the answer
    curriculum: CoconutCurriculum = field(default_factory=CoconutCurriculum)
    vqvae: CotVQVAE | None = field(default=None, compare=False)  # assorted: the fitted chunk VQ-VAE
    max_chunks: int | None = None  # assorted: the most leading chunks replaced by codes (None: all)
    seed: int = 0  # assorted: keys the per-example draw of m

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"puzzle format {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.pause < 0 or self.stage < 0:
            raise ConfigError(f"puzzle format {self.kind}: pause and stage must be >= 0")
        if self.kind == "mirage" and self.latent_steps < 1:
            raise ConfigError("puzzle format mirage needs latent_steps >= 1 latent visual tokens")
        if self.kind == "assorted" and self.vqvae is None:
            raise ConfigError("puzzle format assorted needs a fitted cot vq-vae (vqvae=...)")
        if self.max_chunks is not None and self.max_chunks < 0:
            raise ConfigError(f"puzzle format {self.kind}: max_chunks must be >= 0")


def reply_ids(meta: dict[str, Any], fmt: PuzzleFormat, layout: VocabLayout, text_tokenizer) -> tuple[list[int], int]:
    """The assistant turn's ids, `<|end_of_turn|>` included, and how many leading ids are inputs only."""
    steps, answer = list(meta["steps"]), str(meta["answer"])
    if fmt.kind == "assorted":
        span, text = assorted_reply(meta, fmt, layout, text_tokenizer)
        return [*span, *text, layout.token_id(END_OF_TURN)], 0
    fed: list[int] = []
    if fmt.kind in ("no-cot", "pause", "mirage"):
        steps = []
    if fmt.kind == "pause":
        fed = pause_ids(layout, fmt.pause)
    elif fmt.kind == "coconut":
        skipped, thoughts = fmt.curriculum.split(fmt.stage, len(steps))
        steps = steps[skipped:]
        fed = [layout.begin_id("latent"), *[layout.token_id(LATENT_TOKEN)] * thoughts, layout.end_id("latent")]
    elif fmt.kind == "mirage":
        fed = [layout.begin_id("latent"), *[layout.token_id(LATENT_TOKEN)] * fmt.latent_steps, layout.end_id("latent")]
    elif fmt.kind == "colar":
        cot = encode_text("".join(f"{step}\n" for step in steps), text_tokenizer) if steps else []
        fed = [layout.begin_id("latent"), *cot, layout.end_id("latent")]
        steps = []
    text = encode_text(Puzzle("", steps, answer, {}).solution, text_tokenizer)
    return [*fed, *text, layout.token_id(END_OF_TURN)], len(fed)


def assorted_reply(
    meta: dict[str, Any], fmt: PuzzleFormat, layout: VocabLayout, text_tokenizer
) -> tuple[list[int], list[int]]:
    """Assorted's reply without `<|end_of_turn|>`: the codes span of the first m chunks (empty when
    m = 0) and the text ids after them (the rest of the trace, then the answer)."""
    vqvae = fmt.vqvae
    trace = trace_ids(meta, text_tokenizer)
    chunks = vqvae.chunk(trace)
    limit = len(chunks) if fmt.max_chunks is None else min(len(chunks), fmt.max_chunks)
    check_codes_fit(layout, vqvae, limit * vqvae.config.codes_per_chunk)  # the longest span m may give
    # A str seed hashes with SHA-512: the same m for the same puzzle and seed on every machine.
    m = random.Random(f"assorted/{fmt.seed}/{meta.get('question', '')}/{trace}").randint(0, limit)
    answer = encode_text(f"answer: {meta['answer']}", text_tokenizer)
    rest = trace[m * vqvae.config.chunk_len :] + answer
    if m == 0:
        return [], rest
    codes = vqvae.encode(chunks[:m]).reshape(-1)
    return layout.span_ids(CODES_MODALITY, codes.numpy()), rest


def pause_ids(layout: VocabLayout, count: int) -> list[int]:
    """`count` pause fillers, cycling through the layout's pause tokens."""
    pauses = sorted((i for name, i in layout.special_tokens.items() if name.startswith("<|pause_")))
    if count and not pauses:
        raise ConfigError("the vocab layout has no pause tokens (build it with pause > 0)")
    return [pauses[i % len(pauses)] for i in range(count)]


def prompt_suffix(fmt: PuzzleFormat, layout: VocabLayout) -> list[int]:
    """Ids to append to a generation prompt (after `<|assistant|>`) in this format: the pause
    fillers; a latent span is not a suffix but `latent_generate`'s forced steps."""
    return pause_ids(layout, fmt.pause) if fmt.kind == "pause" else []


def encode_puzzle(
    record: dict[str, Any], fmt: PuzzleFormat, layout: VocabLayout, text_tokenizer
) -> EncodedConversation:
    """The record's question turns (media parts carrying codes) and its assistant turn in `fmt`."""
    meta = record.get("meta") or {}
    if "steps" not in meta or "answer" not in meta:
        raise InputError(f"record {record.get('id', '?')}: not a reasoning puzzle (its meta has no steps and answer)")
    question = [m for m in record["messages"] if m["role"] != "assistant"]
    encoded = encode_conversation(question, layout, text_tokenizer, add_generation_prompt=True)
    ids, fed = reply_ids(meta, fmt, layout, text_tokenizer)
    if fmt.kind == "assorted" and ids[0] == layout.begin_id(CODES_MODALITY):
        span = ids.index(layout.end_id(CODES_MODALITY)) + 1
        encoded.append(ids[:span], True, CODES_MODALITY, "assistant")
        ids = ids[span:]
    encoded.append(ids[:fed], False, SPECIAL, "assistant")
    encoded.append(ids[fed:-1], True, "text", "assistant")
    encoded.append(ids[-1:], True, SPECIAL, "assistant")
    return encoded


def write_puzzle_shards(
    records: Iterable[dict[str, Any]], bundle_dir: str | Path, out: str | Path, fmt: PuzzleFormat, root=None
) -> int:
    """Pretokenized shards of `records` in `fmt` at `out` (what `mmllm pretokenize` writes, so
    `data.sources` of a finetuning run reads them); `root` is the folder media paths are relative
    to. Returns the number of rows written; a record that fails is a one-line error."""
    from datasets import Dataset, disable_progress_bars

    from mmllm.data.pretokenize import TokenizerBundle, _write_manifest, shard_features, tokenize_media
    from mmllm.model.weights import atomic_directory

    disable_progress_bars()
    bundle = TokenizerBundle.load(bundle_dir)
    records = list(records)
    if not records:
        raise InputError(f"{out}: no puzzle records to write")
    for record, error in zip(records, tokenize_media(records, Path(root) if root else None, bundle), strict=True):
        if error is not None:
            raise InputError(f"record {record.get('id', '?')}: {error}")
    index_of = {name: i + 1 for i, name in enumerate(bundle.layout.modalities)}
    rows = [_shard_row(r, encode_puzzle(r, fmt, bundle.layout, bundle.text_tokenizer), index_of) for r in records]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_manifest(out, bundle, bundle_dir)
    columns = {name: [row[name] for row in rows] for name in shard_features()}
    with atomic_directory(out / "part-00000-of-00001" / "chunk-000000") as tmp:
        Dataset.from_dict(columns, features=shard_features()).save_to_disk(str(tmp / "data"))
    return len(rows)


def _shard_row(record: dict[str, Any], encoded: EncodedConversation, index_of: dict[str, int]) -> dict[str, Any]:
    n = len(encoded.input_ids)
    return {
        "id": str(record.get("id", "")),
        "task": str(record.get("task", "")),
        "input_ids": np.asarray(encoded.input_ids, dtype=np.int32),
        "loss_mask": np.asarray(encoded.loss_mask, dtype=bool),
        "modality": np.array([index_of.get(part, 0) for part in encoded.parts], dtype=np.int8),
        "condition": np.zeros(n, dtype=bool),  # reasoning answers are text: nothing for guidance to drop
        "splittable": False,  # a conversation: never cut across packed rows
    }
