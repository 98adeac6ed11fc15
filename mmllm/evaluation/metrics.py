"""Metrics shared by the evaluation tasks: word error rate, exact match, mean and standard error.

WER is computed here (Levenshtein distance over word lists) rather than by a library, so the
definition is the one written below: (substitutions + deletions + insertions) / reference words.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence


def edit_distance(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Levenshtein distance between two word lists: the fewest substitutions, deletions and insertions."""
    previous = list(range(len(hypothesis) + 1))  # distance from an empty reference prefix: all insertions
    for i, ref_word in enumerate(reference, start=1):
        current = [i]  # distance to an empty hypothesis prefix: all deletions
        for j, hyp_word in enumerate(hypothesis, start=1):
            substitution = previous[j - 1] + (ref_word != hyp_word)
            current.append(min(substitution, previous[j] + 1, current[j - 1] + 1))
        previous = current
    return previous[-1]


def word_error_rate(reference: Sequence[str], hypothesis: Sequence[str]) -> float:
    """Edits / reference words; against an empty reference each hypothesis word is one error (0.0 if both are empty)."""
    return edit_distance(reference, hypothesis) / max(1, len(reference))


def normalise_answer(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed: 'Top  Left.' -> 'top left'."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the two answers agree after `normalise_answer`, else 0.0."""
    return float(normalise_answer(prediction) == normalise_answer(reference))


def accuracy(hits: Iterable[bool | float]) -> float:
    """Fraction of hits; NaN for no items (an empty evaluation has no accuracy, not 0%)."""
    values = [float(hit) for hit in hits]
    return sum(values) / len(values) if values else math.nan


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n)); stderr is 0 below two values."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def mean_per_key(scores: Sequence[dict[str, float]], stderr_of: Iterable[str] = ()) -> dict[str, float]:
    """Mean of every key over the samples that have it, plus f"{key}_stderr" for each key in `stderr_of`."""
    columns: dict[str, list[float]] = {}
    for sample in scores:
        for key, value in sample.items():
            columns.setdefault(key, []).append(float(value))
    out = {key: mean_and_stderr(values)[0] for key, values in columns.items()}
    for key in stderr_of:
        if key in columns:
            out[f"{key}_stderr"] = mean_and_stderr(columns[key])[1]
    return out
