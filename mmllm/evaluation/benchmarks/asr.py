"""LibriSpeech-style speech recognition: audio -> transcript, scored by word error rate through jiwer.

Layout (`--data librispeech=DIR`, DIR being one split such as LibriSpeech/test-clean):

    DIR/{speaker}/{chapter}/{speaker}-{chapter}.trans.txt   one utterance per line: "ID TRANSCRIPT"
    DIR/{speaker}/{chapter}/{ID}.flac                       the utterance's audio (16 kHz mono)

WER is corpus-level, as LibriSpeech results are reported: the word edits (substitutions,
deletions, insertions; jiwer's alignment) of every utterance, summed, over the reference words,
summed. Both sides are normalised first: lower case, and every character but letters, digits and
apostrophes turned into a space (LibriSpeech's references are upper case, with no punctuation
but apostrophes). The audio is read at 16 kHz and resampled by the model's audio tokenizer.

The prompt is lmms-eval's LibriSpeech prompt, after the audio: TRANSCRIBE_PROMPT.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import jiwer

from mmllm.errors import InputError
from mmllm.evaluation.benchmarks.base import BenchmarkTask, MalformedRow, existing_file, keep_wellformed, text_reply
from mmllm.evaluation.tasks import EvalItem, ReplyPart, reply_text

TRANSCRIBE_PROMPT = "Please recognize the speech and only output the recognized content:"
TRANSCRIPT_TOKENS = 256  # the longest LibriSpeech test utterances (~35 s) run to ~90 words
NOT_A_WORD = re.compile(r"[^\w']+|_")


def asr_words(text: str) -> str:
    """Lower case; every character but letters, digits and apostrophes as a space; spaces collapsed."""
    return " ".join(NOT_A_WORD.sub(" ", text.lower()).split())


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, reference words) of one utterance, after `asr_words`."""
    reference, hypothesis = asr_words(reference), asr_words(hypothesis)
    alignment = jiwer.process_words(reference, hypothesis)
    return alignment.substitutions + alignment.deletions + alignment.insertions, len(reference.split())


@dataclass(frozen=True)
class Utterance:
    id: str
    audio: Path
    transcript: str


class LibriSpeechTask(BenchmarkTask):
    name = "librispeech"
    description = (
        "LibriSpeech split (e.g. test-clean): speech -> transcript; corpus WER via jiwer (--data librispeech=DIR)"
    )
    layout = "a LibriSpeech split dir of SPEAKER/CHAPTER/*.trans.txt and .flac files"
    input_modalities = ("audio",)
    metric = "wer"
    higher_is_better = False

    def read(self, path: Path) -> tuple[list[Utterance], list[str]]:
        transcripts = sorted(path.glob("*/*/*.trans.txt"))
        if not transcripts:
            raise InputError(f"{self.name}: {path}: wrong layout: no SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt in it")
        lines = [
            (f"{transcript.name} line {i}", (transcript.parent, line))
            for transcript in transcripts
            for i, line in enumerate(transcript.read_text(encoding="utf-8").splitlines(), start=1)
            if line.strip()
        ]
        return keep_wellformed(lines, self._parse)

    @staticmethod
    def _parse(entry: tuple[Path, str]) -> Utterance:
        folder, line = entry
        utterance_id, _, transcript = line.strip().partition(" ")
        if not asr_words(transcript):
            raise MalformedRow(f"{line!r:.60} is not 'ID TRANSCRIPT'")
        return Utterance(utterance_id, existing_file(folder / f"{utterance_id}.flac"), transcript.strip())

    def row_items(self, row: Utterance) -> list[EvalItem]:
        content = [{"type": "audio", "path": str(row.audio)}, {"type": "text", "text": TRANSCRIBE_PROMPT}]
        return [
            EvalItem(
                id=f"{self.name}-{row.id}",
                prompt=[{"role": "user", "content": content}],
                prompt_kind="chat",
                reply_modality="text",
                max_new_tokens=TRANSCRIPT_TOKENS,
                meta={"transcript": row.transcript},
                reference=row.transcript,
            )
        ]

    def score(self, item: EvalItem, reply: list[ReplyPart]) -> dict[str, float]:
        errors, words = word_errors(item.meta["transcript"], reply_text(reply))
        return {"wer": errors / words, "errors": float(errors), "reference_words": float(words)}

    def aggregate(self, scores: list[dict[str, float]]) -> dict[str, float]:
        """Corpus WER: summed edits over summed reference words (per-utterance WERs are not averaged)."""
        errors, words = sum(s["errors"] for s in scores), sum(s["reference_words"] for s in scores)
        return {"wer": errors / words if words else math.nan, "errors": errors, "reference_words": words}

    def chance_reply(self, item: EvalItem, rng: random.Random) -> list[ReplyPart]:
        """The transcript of another utterance, drawn at random: fluent, and not what was said."""
        k = rng.randrange(len(self.rows))
        if f"{self.name}-{self.rows[k].id}" == item.id:
            k = (k + 1) % len(self.rows)
        return text_reply(self.rows[k].transcript)
