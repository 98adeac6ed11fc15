"""Quality floors over an eval run's results: which hold, which are missed, and the report table."""

from __future__ import annotations

from mmllm.demo import FAST, FULL, STANDARD
from mmllm.evaluation.floors import at_least, at_most, check_floors, floors_table, missed_summary


def results(**metrics: dict[str, float]) -> dict:
    return {"tasks": {task.replace("_", "-"): {"metrics": values} for task, values in metrics.items()}}


def test_floors_hold_at_their_bound_and_miss_beyond_it():
    run = results(toy_caption={"accuracy": 0.9}, toy_transcribe={"wer": 0.1000001}, toy_speak={"wer": 0.35})
    checks = check_floors(
        run,
        [
            at_least("toy-caption", "accuracy", 0.9),  # exactly at the floor: held
            at_most("toy-transcribe", "wer", 0.1),  # just above a ceiling: missed
            at_most("toy-speak", "wer", 0.35),
        ],
    )
    assert [check.held for check in checks] == [True, False, True]
    assert missed_summary(checks) == "toy-transcribe wer 0.100 (floor ≤ 0.100)"


def test_a_metric_the_run_lacks_misses_its_floor():
    checks = check_floors(results(toy_vqa={"accuracy": 1.0}), [at_least("toy-draw", "accuracy", 0.5)])
    assert not checks[0].held and checks[0].value is None
    table = floors_table(checks)
    assert "| toy-draw | accuracy | ≥ 50.0% | — | **no** |" in table


def test_every_held_floor_leaves_no_summary():
    checks = check_floors(results(toy_act={"final_error": 0.05}), [at_most("toy-act", "final_error", 0.1)])
    assert missed_summary(checks) == "" and "| toy-act | final_error | ≤ 0.100 | 0.050 | yes |" in floors_table(checks)


def test_demo_scales_bind_the_issue_floors():
    assert FAST.floors == ()  # --fast checks mechanics, not quality
    standard = {(f.task, f.metric): (f.bound, f.higher_is_better) for f in STANDARD.floors}
    assert standard == {
        ("toy-caption", "accuracy"): (0.9, True),
        ("toy-vqa", "accuracy"): (0.9, True),
        ("toy-transcribe", "wer"): (0.1, False),
        ("toy-motion", "direction_accuracy"): (0.8, True),
        ("toy-act", "final_error"): (0.1, False),
        ("toy-draw", "accuracy"): (0.5, True),
        ("toy-speak", "wer"): (0.35, False),
        ("toy-animate", "accuracy"): (0.5, True),
    }
    full = {(f.task, f.metric): f.bound for f in FULL.floors}
    assert full[("toy-draw", "accuracy")] == 0.8 and full[("toy-speak", "wer")] == 0.2
    assert full[("toy-animate", "accuracy")] == 0.8 and full[("toy-caption", "accuracy")] == 0.9
    assert STANDARD.budget_minutes == 30 and FULL.budget_minutes == 90
