"""The tokenizer contract around every tokenizer: registry, training and evaluation entry points,
the checkpoint slot, and the benchmark command."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmllm.cli import main
from mmllm.data import interleaved, media
from mmllm.errors import CheckpointError, LayoutError
from mmllm.tokenizers import load_tokenizer
from mmllm.tokenizers.base import CONFIG_FILE, WEIGHTS_FILE
from mmllm.tokenizers.training import load_train_config, train_tokenizer
from mmllm.vocab import ModalityRange, VocabLayout
from tests.conftest import REPO


def test_registry_loads_by_name_and_refuses_what_is_not_a_tokenizer(tmp_path):
    bins = load_tokenizer("action-bins", chunk=4)
    assert bins.grid == (4, 2) and bins.tokens_per_item == 8
    with pytest.raises(CheckpointError, match="unknown modality tokenizer 'nope'.*action-bins"):
        load_tokenizer("nope")
    with pytest.raises(CheckpointError, match="not a saved modality tokenizer"):
        load_tokenizer(tmp_path)
    bins.save_pretrained(tmp_path / "bins")
    (tmp_path / "bins" / CONFIG_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_tokenizer(tmp_path / "bins")
    bins.save_pretrained(tmp_path / "bins")
    (tmp_path / "bins" / WEIGHTS_FILE).write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_tokenizer(tmp_path / "bins")


def test_malformed_codes_are_repaired_and_flagged_never_raised():
    bins = load_tokenizer("action-bins")
    well_formed = bins.encode([np.zeros((10, 2), dtype=np.float32)]).items()
    bad = [np.full((10, 2), 999), np.zeros((3, 2)), np.zeros((0,)), np.array([[1.5, np.nan]]), "garbage"]
    decoded = bins.decode(well_formed + bad)
    assert decoded.flags[0] == ""
    assert all(flag for flag in decoded.flags[1:])
    assert all(m.shape == (10, 2) and m.dtype == np.float32 for m in decoded.media)
    assert "clamped" in decoded.flags[1] and "3 frames" in decoded.flags[2]


def test_training_from_a_folder_skips_and_lists_bad_files(tmp_path):
    folder = tmp_path / "actions"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        media.write_action(folder / f"{i}.json", rng.uniform(-1, 1, size=(10, 2)).astype(np.float32))
    (folder / "broken.json").write_text("[[0.1, 0.2], [", encoding="utf-8")
    config = load_train_config(
        REPO / "configs/tokenizer/action_bins.yaml",
        [f"data.source={folder}", "config.mode=quantile", f"out={tmp_path / 'out'}"],
    )
    result = train_tokenizer(config, show_progress=False)
    assert result.items == 6 and len(result.skipped) == 1 and "broken.json" in result.skipped[0]
    assert "broken.json" in (tmp_path / "out" / "skipped.txt").read_text()
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["skipped"] == 1 and summary["items"] == 6
    reloaded = load_tokenizer(tmp_path / "out")
    items = [rng.uniform(-1, 1, size=(10, 2)).astype(np.float32) for _ in range(3)]
    np.testing.assert_array_equal(reloaded.encode(items).codes, result.tokenizer.encode(items).codes)


def test_gradient_training_logs_and_checkpoints(tmp_path):
    config = load_train_config(
        REPO / "configs/tokenizer/action_vqbet.yaml",
        [
            "data.num_items=64",
            "train.steps=6",
            "train.batch_size=8",
            "train.log_every=2",
            "train.save_every=3",
            f"out={tmp_path / 'vqbet'}",
        ],
    )
    result = train_tokenizer(config, show_progress=False)
    log = [json.loads(line) for line in (tmp_path / "vqbet" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [0, 2, 4, 5] and all(np.isfinite(row["loss"]) for row in log)
    assert (tmp_path / "vqbet" / "checkpoint-3" / CONFIG_FILE).is_file()
    reloaded = load_tokenizer(tmp_path / "vqbet")
    chunk = [np.linspace(-1, 1, 20, dtype=np.float32).reshape(10, 2)]
    np.testing.assert_array_equal(reloaded.encode(chunk).codes, result.tokenizer.encode(chunk).codes)


def test_cli_trains_and_evaluates_with_oracle_agreement(tmp_path, capsys):
    out = tmp_path / "bins"
    assert main(["tokenizer", "train", "--config", "configs/tokenizer/action_bins.yaml", f"out={out}"]) == 0
    report_path = tmp_path / "report.json"
    assert main(["tokenizer", "evaluate", "--tokenizer", str(out), "--n", "40", "--out", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["items"] == 40 and report["tokens_per_item"] == 20 and report["flagged"] == 0
    assert report["oracle_agreement"] == 1.0  # 256 uniform bins move the end point by < 0.4% of the width
    assert report["mse"] < 1e-4
    capsys.readouterr()
    assert main(["tokenizer", "train", "--config", "configs/tokenizer/action_bins.yaml", "tokenizer=nope"]) == 2
    assert "unknown modality tokenizer 'nope'" in capsys.readouterr().err


def test_checkpoint_carries_its_modality_tokenizers(tmp_path, tiny_config, text_tokenizer):
    from mmllm.model.mmllm import MMLLM
    from mmllm.text_tokenizer import fingerprint

    bins = load_tokenizer("action-bins")
    layout = VocabLayout.build(
        len(text_tokenizer), [bins.modality_range()], text_tokenizer_fingerprint=fingerprint(text_tokenizer)
    )
    model = MMLLM.from_config(tiny_config, layout, text_tokenizer, {"action": bins})
    model.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "tokenizers" / "action" / CONFIG_FILE).is_file()
    reloaded = MMLLM.from_pretrained(tmp_path / "model")
    chunk = [np.full((10, 2), 0.3, dtype=np.float32)]
    np.testing.assert_array_equal(reloaded.modality_tokenizers["action"].encode(chunk).codes, bins.encode(chunk).codes)
    coarse = load_tokenizer("action-bins", bins=128)
    with pytest.raises(LayoutError, match="codebook_size 128 but the layout's 'action' range has 256"):
        model.set_modality_tokenizer("action", coarse)
    short = ModalityRange("action", 256, grid=(5, 2))
    with pytest.raises(LayoutError, match="grid"):
        bins.check_fits(short)


def test_toyworld_command_writes_tasks_and_media(tmp_path, capsys):
    assert main(["toyworld", "--out", str(tmp_path), "--n", "2", "--tasks", "toy-caption,toy-speak"]) == 0
    assert "4 records" in capsys.readouterr().out
    records = list(interleaved.read_jsonl(tmp_path / "train.jsonl", check_media=True))
    assert {r["task"] for r in records} == {"toy-caption", "toy-speak"}


def test_bench_tokenizers_prints_a_row_per_tokenizer(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "tokenizers", "--only", "action-bins", "--n", "16", "--repeats", "1", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| action-bins (action-bins) | 20 | 100.0% |" in table
    (row,) = json.loads(out.read_text())
    assert row["encode_per_s"] > 0 and row["decode_per_s"] > 0 and row["unit"] == "chunks"
    assert main(["bench", "tokenizers", "--only", "pictures"]) == 2
