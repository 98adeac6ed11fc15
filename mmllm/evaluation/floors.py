"""Quality floors: thresholds on an eval run's metrics that a pipeline must meet to pass.

A floor names a task, one of its metrics and the bound it must reach: at least `bound` for
metrics where higher is better (accuracy), at most `bound` where lower is better (WER, reach
error). `check_floors` reads them off a results.json dict; a metric the run did not produce
misses its floor (a floor is never met by absence). `floors_table` is the markdown the demo's
report shows, one row per floor with the measured value and whether it held.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mmllm.errors import MMLLMError
from mmllm.evaluation.report import format_value


class QualityFloorMissed(MMLLMError):
    """A metric of the run fell short of its floor."""


@dataclass(frozen=True)
class Floor:
    task: str
    metric: str
    bound: float
    higher_is_better: bool

    def describe(self) -> str:
        return f"{'≥' if self.higher_is_better else '≤'} {format_value(self.metric, self.bound)}"


@dataclass(frozen=True)
class FloorCheck:
    floor: Floor
    value: float | None  # None: the run has no such task or metric

    @property
    def held(self) -> bool:
        if self.value is None:
            return False
        if self.floor.higher_is_better:
            return self.value >= self.floor.bound
        return self.value <= self.floor.bound


def at_least(task: str, metric: str, bound: float) -> Floor:
    return Floor(task, metric, bound, higher_is_better=True)


def at_most(task: str, metric: str, bound: float) -> Floor:
    return Floor(task, metric, bound, higher_is_better=False)


def check_floors(results: dict[str, Any], floors: Sequence[Floor]) -> list[FloorCheck]:
    """Each floor against the model's metric in `results` (the runner's results.json)."""
    checks = []
    for floor in floors:
        value = results["tasks"].get(floor.task, {}).get("metrics", {}).get(floor.metric)
        checks.append(FloorCheck(floor, value))
    return checks


def floors_table(checks: Sequence[FloorCheck]) -> str:
    lines = ["| task | metric | floor | measured | held |", "|---|---|---|---|---|"]
    for check in checks:
        floor = check.floor
        measured = format_value(floor.metric, check.value)
        lines.append(
            f"| {floor.task} | {floor.metric} | {floor.describe()} | {measured} | {'yes' if check.held else '**no**'} |"
        )
    return "\n".join(lines)


def missed_summary(checks: Sequence[FloorCheck]) -> str:
    """One line naming each missed floor and its measured value; '' when every floor held."""
    missed = [c for c in checks if not c.held]
    return "; ".join(
        f"{c.floor.task} {c.floor.metric} {format_value(c.floor.metric, c.value)} (floor {c.floor.describe()})"
        for c in missed
    )
