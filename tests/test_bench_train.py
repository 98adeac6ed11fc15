"""`mmllm bench train` on the tiny model: the contenders train on the same documents and compute the
same function, and the CLI prints its table and writes its JSON. No timing is asserted: rates
measured on a shared 2-core machine say nothing about the targets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mmllm.bench.train import (
    CONTENDERS,
    bench_train,
    build_toy_data,
    format_train_bench,
    pad_documents,
    split_documents,
)
from mmllm.cli import main
from mmllm.data.packing import Document, Packer, PackingConfig
from mmllm.model.loss import IGNORE_INDEX

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "model" / "tiny.yaml")
LOSS_TOLERANCE = 1e-4  # the same fp32 model on the same rows, with and without DeepSpeed


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> tuple[Path, Path]:
    return build_toy_data(tmp_path_factory.mktemp("bench_train"), items_per_task=2)


@pytest.fixture(scope="module")
def result(toy_data) -> dict:
    shards, bundle = toy_data
    return bench_train(
        TINY, steps=3, warmup=1, seq_len=128, batch=2, data=shards, vocab=bundle, threads=1, progress=False
    )


def test_packed_rows_split_back_into_their_documents_and_pad(toy_layout):
    rng = np.random.default_rng(0)
    documents = [
        Document(
            rng.integers(0, 100, length),
            np.arange(length) >= 2,  # the first two tokens are a prompt: no loss
            np.zeros(length, dtype=np.int8),
            np.zeros(length, dtype=bool),
            splittable=False,
        )
        for length in (5, 9, 3, 12, 7, 4)
    ]
    packer = Packer(PackingConfig(seq_len=16, condition_dropout=0.0), toy_layout)
    rows = list(packer.rows(iter(documents)))
    pieces = split_documents(rows)
    assert sorted(tuple(p["input_ids"]) for p in pieces) == sorted(tuple(d.input_ids.tolist()) for d in documents)
    for piece in pieces:
        assert piece["labels"][:2] == [IGNORE_INDEX] * 2 and piece["labels"][2:] == piece["input_ids"][2:]
    batch = pad_documents(pieces, toy_layout.pad_id)
    assert batch["input_ids"].shape == (len(documents), 12)
    assert int(batch["attention_mask"].sum()) == sum(len(d) for d in documents) == sum(r.real_tokens for r in rows)
    padding = batch["attention_mask"] == 0
    assert bool((batch["labels"][padding] == IGNORE_INDEX).all())
    assert bool((batch["input_ids"][padding] == toy_layout.pad_id).all())


def test_every_contender_trains_on_the_same_documents(result):
    contenders = result["contenders"]
    assert list(contenders) == list(CONTENDERS)
    for name, c in contenders.items():
        assert c["tokens_per_s"] > 0 and c["min"] > 0, name
        assert all(math.isfinite(step["loss"]) for step in c["steps"]), name
        assert sum(step["useful_tokens"] for step in c["steps"]) == c["useful_tokens"]
    # Over the timed steps: the same documents, the same useful tokens, for everyone.
    assert len({c["documents"] for c in contenders.values()}) == 1
    assert len({c["useful_tokens"] for c in contenders.values()}) == 1
    packed = contenders["mmllm"]
    assert len(packed["steps"]) == result["steps"] == 3
    assert packed["slots"] == 3 * 2 * 128 and packed["fill"] <= 1
    # The padded step's budget is the packed step's documents, on average.
    assert result["documents_per_step"] == round(packed["documents"] / result["steps"])
    for name in ("hf-padded", "hf-grouped"):
        steps = contenders[name]["steps"]
        assert len(steps) == math.ceil(packed["documents"] / result["documents_per_step"])
        assert all(step["useful_tokens"] <= step["slots"] for step in steps)
    assert contenders["hf-padded"]["fill"] < 1  # one document per row: padding is there to be counted
    assert result["grouping_window"] == 1  # 3 steps of documents: LengthGroupedSampler sorts single batches
    assert "hf-grouped sorted within 1-batch windows" in format_train_bench(result)


def test_contenders_compute_the_same_losses(result):
    checks = result["checks"]
    assert abs(checks["first_step_loss_packed"] - checks["first_step_loss_padded"]) < LOSS_TOLERANCE
    ours = [step["loss"] for step in result["contenders"]["mmllm"]["steps"]]
    raw = [step["loss"] for step in result["contenders"]["raw"]["steps"]]
    assert max(abs(a - b) for a, b in zip(ours, raw, strict=True)) < LOSS_TOLERANCE
    ratios = result["ratios"]
    assert set(ratios) == {"mmllm/hf-padded", "mmllm/hf-grouped", "loop overhead"}
    speed = {name: c["tokens_per_s"] for name, c in result["contenders"].items()}
    assert ratios["loop overhead"]["value"] == pytest.approx(1 - speed["mmllm"] / speed["raw"])


def test_cli_builds_toy_data_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["-q", "bench", "train", "--model", TINY, "--steps", "2", "--warmup", "1", "--seq-len", "64"]
    argv += ["--batch", "2", "--toy-items", "1", "--only", "raw,hf-grouped", "--precision", "bf16-mixed"]
    assert main([*argv, "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "raw " in table and "hf-grouped " in table and "generated toy world" in table and "bf16-mixed" in table
    written = json.loads(out.read_text())
    assert list(written["contenders"]) == ["raw", "hf-grouped"] and written["ratios"] == {}
    assert written["precision"] == "bf16-mixed"
    for contender in written["contenders"].values():
        assert all(math.isfinite(step["loss"]) for step in contender["steps"])


def test_cli_refuses_bad_arguments(capsys):
    assert main(["bench", "train", "--only", "mmllm,typo"]) == 2
    assert "unknown contender 'typo'" in capsys.readouterr().err
    assert main(["bench", "train", "--data", "shards"]) == 2
    assert "--data and --vocab together" in capsys.readouterr().err
    assert main(["bench", "train", "--precision", "fp16"]) == 2
    assert "unknown precision 'fp16'" in capsys.readouterr().err
