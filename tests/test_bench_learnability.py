"""`mmllm bench learnability` end to end at the demo's --fast scale: checkpoints, evals, curve."""

from __future__ import annotations

import json

from mmllm.cli import main
from mmllm.demo import EVAL_TASKS


def test_learnability_scores_every_checkpoint_against_training_minutes(tmp_path, capsys):
    out = tmp_path / "learn"
    argv = ["--steps", "4", "--save-every", "2", "--eval-items", "2"]
    assert main(["--quiet", "bench", "learnability", "--fast", "--out", str(out), *argv]) == 0
    result = json.loads((out / "learnability.json").read_text())
    rows = result["rows"]
    assert [r["row"] for r in rows] == ["untrained", "chance", "model", "model"]
    steps = [r for r in rows if r["row"] == "model"]
    assert [r["step"] for r in steps] == [2, 4]
    assert 0 < steps[0]["minutes"] < steps[1]["minutes"]  # wall time of training, from the run's own log
    for row in rows:
        assert set(row["scores"]) == set(EVAL_TASKS)
    assert steps[1]["scores"]["toy-text-ppl"] < rows[0]["scores"]["toy-text-ppl"]  # 4 steps already beat random init
    assert (out / "learnability.png").read_bytes()[:4] == b"\x89PNG"
    assert "| untrained | 0.0 |" in capsys.readouterr().out
