"""COCO captions: image -> a one-sentence caption, scored by BLEU-4 and CIDEr as pycocoevalcap scores them.

Layout (`--data coco-caption=DIR`), as the official COCO 2014 downloads unpack:

    DIR/annotations/captions_val2014.json  {"images": [{"id", "file_name", ...}],
                                            "annotations": [{"image_id", "caption", ...}]}
    DIR/val2014/{file_name}

Each image is one item; its references are all its captions (five for most COCO images).

Both metrics are computed here, equal to pycocoevalcap's `Bleu(4)` and `Cider()` on the same
tokens (a test checks it); pycocoevalcap is a 100 MB install, for two short formulas:

* BLEU-4, corpus-level: n-gram matches (each clipped to its largest count in any one reference)
  and n-gram totals are summed over all images, the four precisions' geometric mean is taken
  (with pycocoevalcap's 1e-15 / 1e-9 guards, so no match gives ~0, not an error) and multiplied by
  the brevity penalty exp(1 - r / c) when the summed hypothesis length c is below the summed
  reference length r, each image's r being its reference length closest to its hypothesis.
* CIDEr (pycocoevalcap's CIDEr-D): each caption becomes, for n = 1..4, a vector of n-gram counts
  times log(images / images whose references hold the n-gram); per n, the hypothesis is
  compared with each reference by sum(min(h, r) * r) / (|h| |r|), damped by
  exp(-(len_h - len_r)^2 / (2 * 6^2)) where a caption's length is its number of bigrams; the mean
  over n and references, times 10, is the image's score, and CIDEr is the mean over images. The
  document frequencies come from the scored images' references, so `--limit` changes them.

Tokens: pycocoevalcap runs Stanford's PTBTokenizer (Java) and drops its punctuation tokens; we
have no Java, so `caption_tokens` stands in: lower case, clitics split off as PTB splits them
("dog's" -> "dog 's", "don't" -> "do n't"), words keep inner hyphens, apostrophes and decimal
points ("t-shirt", "o'clock", "3.5"), and every other mark is dropped.

The prompt is lmms-eval's COCO caption prompt, after the image: CAPTION_PROMPT.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mmllm.evaluation.benchmarks.base import (
    BenchmarkTask,
    MalformedRow,
    existing_file,
    field,
    image_question,
    keep_wellformed,
    layout_value,
    read_json,
    require_dir,
    text_reply,
)
from mmllm.evaluation.metrics import mean_and_stderr
from mmllm.evaluation.tasks import EvalItem, ReplyPart, reply_text

CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
CAPTION_TOKENS = 64  # COCO captions run ~10 words; a sentence of 64 tokens is already far longer than any reference
MAX_N = 4  # BLEU-4 and CIDEr both use 1- to 4-grams
BLEU_TINY, BLEU_SMALL = 1e-15, 1e-9  # pycocoevalcap's guards: (matches + tiny) / (total + small)
CIDER_SIGMA = 6.0  # width of CIDEr-D's length penalty, in tokens
CIDER_SCALE = 10.0  # CIDEr-D's scale, so that scores read like the original CIDEr's

CLITIC = re.compile(r"(?<=[^\W_])(n't|'s|'re|'ve|'ll|'d|'m)\b")
TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|[^\W_]+(?:[-.'][^\W_]+)*")

Ngram = tuple[str, ...]


def caption_tokens(text: str) -> list[str]:
    """A caption as the words PTBTokenizer keeps after pycocoevalcap drops punctuation (module docstring)."""
    return TOKEN.findall(CLITIC.sub(r" \1", text.lower()))


def ngram_counts(tokens: Sequence[str]) -> Counter[Ngram]:
    """Counts of every 1- to 4-gram of `tokens`."""
    return Counter(tuple(tokens[i : i + n]) for n in range(1, MAX_N + 1) for i in range(len(tokens) - n + 1))


# ---------------------------------------------------------------- BLEU-4


def bleu_statistics(hypothesis: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """What corpus BLEU sums over images: clipped matches and totals per n, the hypothesis length, and the
    reference length closest to it (the shorter one on a tie)."""
    counts = ngram_counts(hypothesis)
    most = Counter()
    for reference in references:
        most |= ngram_counts(reference)  # Counter union keeps each n-gram's largest count
    stats = {"length": float(len(hypothesis))}
    stats["reference_length"] = float(min((len(r) for r in references), key=lambda n: (abs(n - len(hypothesis)), n)))
    for n in range(1, MAX_N + 1):
        stats[f"bleu_matches_{n}"] = float(sum(min(c, most[g]) for g, c in counts.items() if len(g) == n))
        stats[f"bleu_total_{n}"] = float(max(0, len(hypothesis) - n + 1))
    return stats


def corpus_bleu(statistics: Sequence[dict[str, float]]) -> float:
    """BLEU-4 of a corpus from each image's `bleu_statistics`."""
    precision_product = 1.0
    for n in range(1, MAX_N + 1):
        matches = sum(s[f"bleu_matches_{n}"] for s in statistics)
        total = sum(s[f"bleu_total_{n}"] for s in statistics)
        precision_product *= (matches + BLEU_TINY) / (total + BLEU_SMALL)
    bleu = precision_product ** (1 / MAX_N)
    ratio = (sum(s["length"] for s in statistics) + BLEU_TINY) / (
        sum(s["reference_length"] for s in statistics) + BLEU_SMALL
    )
    return bleu * math.exp(1 - 1 / ratio) if ratio < 1 else bleu


# ---------------------------------------------------------------- CIDEr


class CiderCorpus:
    """CIDEr-D's idf statistics over the scored images' references; `score` rates one image's hypothesis."""

    def __init__(self, references: Sequence[Sequence[Sequence[str]]]) -> None:
        self.log_images = math.log(len(references))
        self.document_frequency: Counter[Ngram] = Counter()
        for image_references in references:
            self.document_frequency.update({g for reference in image_references for g in ngram_counts(reference)})

    def vector(self, tokens: Sequence[str]) -> tuple[list[dict[Ngram, float]], list[float], int]:
        """tf-idf weights per n-gram length, their norms, and the caption's length in bigrams."""
        weights: list[dict[Ngram, float]] = [{} for _ in range(MAX_N)]
        counts = ngram_counts(tokens)
        for gram, count in counts.items():
            weights[len(gram) - 1][gram] = count * (self.log_images - math.log(max(1, self.document_frequency[gram])))
        norms = [math.sqrt(sum(w * w for w in by_n.values())) for by_n in weights]
        return weights, norms, sum(count for gram, count in counts.items() if len(gram) == 2)

    def score(self, hypothesis: Sequence[str], references: Sequence[Sequence[str]]) -> float:
        """The image's CIDEr-D: mean over n and references of the damped clipped cosine, times 10."""
        hyp, hyp_norms, hyp_length = self.vector(hypothesis)
        total = 0.0
        for reference in references:
            ref, ref_norms, ref_length = self.vector(reference)
            penalty = math.exp(-((hyp_length - ref_length) ** 2) / (2 * CIDER_SIGMA**2))
            for n in range(MAX_N):
                overlap = sum(min(w, ref[n].get(g, 0.0)) * ref[n].get(g, 0.0) for g, w in hyp[n].items())
                if hyp_norms[n] and ref_norms[n]:
                    overlap /= hyp_norms[n] * ref_norms[n]
                total += overlap * penalty
        return CIDER_SCALE * total / (MAX_N * len(references))


# ---------------------------------------------------------------- the task


@dataclass(frozen=True)
class CaptionedImage:
    id: int
    image: Path
    captions: tuple[str, ...]


class CocoCaptionTask(BenchmarkTask):
    name = "coco-caption"
    description = "COCO captions val2014: image -> one sentence; CIDEr and BLEU-4 (--data coco-caption=DIR)"
    layout = "a dir with annotations/captions_val2014.json and val2014/"
    metric = "cider"
    annotations_file = Path("annotations") / "captions_val2014.json"

    def read(self, path: Path) -> tuple[list[CaptionedImage], list[str]]:
        annotations_path = path / self.annotations_file
        data = read_json(self.name, annotations_path)
        images = layout_value(self.name, annotations_path, data, "images", list)
        annotations = layout_value(self.name, annotations_path, data, "annotations", list)
        folder = require_dir(self.name, path / "val2014")
        captions: dict[int, list[str]] = {}
        skipped = []
        for i, annotation in enumerate(annotations):
            try:
                image_id, caption = field(annotation, "image_id", int), field(annotation, "caption")
            except MalformedRow as err:
                skipped.append(f"{annotations_path.name} annotations[{i}]: {err}")
                continue
            captions.setdefault(image_id, []).append(caption)

        def parse(image: object) -> CaptionedImage:
            image_id = field(image, "id", int)
            if image_id not in captions:
                raise MalformedRow("no captions")
            return CaptionedImage(
                image_id, existing_file(folder / field(image, "file_name")), tuple(captions[image_id])
            )

        rows, malformed = keep_wellformed(
            ((f"{annotations_path.name} images[{i}]", im) for i, im in enumerate(images)), parse
        )
        return rows, skipped + malformed

    def items(self, n: int, seed: int) -> list[EvalItem]:
        """One item per image; every item shares the CIDEr statistics of the scored images' references."""
        items = super().items(n, seed)
        corpus = CiderCorpus([[caption_tokens(c) for c in item.meta["captions"]] for item in items])
        for item in items:
            item.meta["corpus"] = corpus
        return items

    def row_items(self, row: CaptionedImage) -> list[EvalItem]:
        meta, reference = {"captions": list(row.captions)}, row.captions[0]
        return [image_question(f"{self.name}-{row.id}", row.image, CAPTION_PROMPT, meta, reference, CAPTION_TOKENS)]

    def score(self, item: EvalItem, reply: list[ReplyPart]) -> dict[str, float]:
        hypothesis = caption_tokens(reply_text(reply))
        references = [caption_tokens(caption) for caption in item.meta["captions"]]
        return {"cider": item.meta["corpus"].score(hypothesis, references), **bleu_statistics(hypothesis, references)}

    def aggregate(self, scores: list[dict[str, float]]) -> dict[str, float]:
        """Corpus CIDEr (the mean over images, with its standard error) and corpus BLEU-4."""
        cider, stderr = mean_and_stderr([s["cider"] for s in scores])
        return {"cider": cider, "cider_stderr": stderr, "bleu4": corpus_bleu(scores) if scores else math.nan}

    def chance_reply(self, item: EvalItem, rng: random.Random) -> list[ReplyPart]:
        """A caption of another image, drawn at random: fluent, and about the wrong picture."""
        k = rng.randrange(len(self.rows))
        if f"{self.name}-{self.rows[k].id}" == item.id:
            k = (k + 1) % len(self.rows)
        return text_reply(self.rows[k].captions[0])
