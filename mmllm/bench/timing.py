"""Interleaved repeated timing: every contender runs once per round, in alternating order, so
slow drift of the machine (thermal, other load) falls on all of them alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Timing:
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """(max - min) / median: how far apart the repeats landed."""
        return (max(self.seconds) - min(self.seconds)) / self.median

    def rate(self, units: float) -> dict[str, float]:
        """Units per second at the median, fastest and slowest repeat, and the spread."""
        return {
            "median": units / self.median,
            "min": units / max(self.seconds),
            "max": units / min(self.seconds),
            "spread": self.spread,
        }


def interleaved(contenders: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, Timing]:
    """Time each callable `repeats` times after `warmup` untimed rounds, alternating the order."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else reversed(names):
            start = time.perf_counter()
            contenders[name]()
            seconds[name].append(time.perf_counter() - start)
    return {name: Timing(values) for name, values in seconds.items()}
