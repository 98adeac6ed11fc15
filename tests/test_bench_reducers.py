"""`mmllm bench reducers`: every row measured on the same items, the ideal slice beside each
method, the FLOPs and paired test computed as documented, and the outputs written."""

from __future__ import annotations

import json

import pytest

from mmllm.bench.reducers import bench_reducers, mcnemar_p, prefill_flops
from mmllm.cli import main
from mmllm.errors import ConfigError, InputError


@pytest.fixture()
def model_dir(toy_model, tmp_path):
    path = tmp_path / "model"
    toy_model.save_pretrained(path)
    return path


def test_mcnemar_matches_hand_computed_values():
    assert mcnemar_p([1, 1, 0, 0], [1, 1, 0, 0]) == 1.0  # no discordant pair
    # 3 discordant pairs, all one way: 2 * (1/2)^3
    assert mcnemar_p([1, 1, 1, 0], [0, 0, 0, 0]) == pytest.approx(0.25)
    # 6 discordant, 1 against 5: 2 * (C(6,0) + C(6,1)) / 2^6
    assert mcnemar_p([1] + [0] * 5 + [1], [0] + [1] * 5 + [1]) == pytest.approx(2 * 7 / 64)


def test_prefill_flops_by_hand(toy_model):
    c = toy_model.config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    weights = c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
    head = 2 * c.hidden_size * c.vocab_size
    tokens = [10] + [4] * (c.num_hidden_layers - 1)
    expected = head + sum(2 * weights * t + 2 * q * t * (t + 1) for t in tokens)
    assert prefill_flops(toy_model, tokens) == pytest.approx(expected)
    assert prefill_flops(toy_model, [4] * c.num_hidden_layers) < prefill_flops(toy_model, [10] * c.num_hidden_layers)


def test_bench_rows_measure_the_same_items(model_dir):
    result = bench_reducers(
        model_dir, "toy-vqa-multi", ["fastv", "dart", "prellm"], [0.5, 0.75], layer=1, items=6, batch_size=3,
        timing_batches=1, repeats=1, decode_steps=2, progress=lambda line: None,
    )  # fmt: skip
    rows = {row["label"]: row for row in result["rows"]}
    assert set(rows) == {
        "none",
        "no image tokens",
        "fastv 0.5",
        "fastv 0.75",
        "dart 0.5",
        "dart 0.75",
        "prellm 0.5",
        "prellm 0.75",
    }
    assert result["image_tokens_per_item"] == 4 * 64  # four 8x8 images
    base = rows["none"]
    assert base["prefill_ratio"] == 1.0 and base["image_tokens_removed"] == 0.0
    assert rows["no image tokens"]["image_tokens_removed"] == pytest.approx(1.0)  # the model answers blind
    for row in rows.values():
        assert row["decode_tokens_per_s"] > 0 and 0.0 <= row["p_value"] <= 1.0
        if row["ratio"] is None:
            continue
        assert row["image_tokens_removed"] == pytest.approx(row["ratio"], abs=0.02)
        assert row["prefill_gflops"] < base["prefill_gflops"]
        assert row["kv_cache_kib"] < base["kv_cache_kib"]
        assert row["ideal_ratio"] > 0
        assert row["gap_to_ideal"] == pytest.approx(row["prefill_ratio"] - row["ideal_ratio"])
    # more removed, less computed and cached
    assert rows["fastv 0.75"]["prefill_gflops"] < rows["fastv 0.5"]["prefill_gflops"]
    assert rows["prellm 0.5"]["prefill_gflops"] < rows["fastv 0.5"]["prefill_gflops"]  # cut before layer 0, not 1


def test_bench_refuses_bad_input_before_running(model_dir):
    with pytest.raises(ConfigError, match="unknown reducer 'nope'"):
        bench_reducers(model_dir, "toy-vqa-multi", ["nope"], [0.5], items=2)
    with pytest.raises(ConfigError, match=r"ratio must be in \[0, 1\)"):
        bench_reducers(model_dir, "toy-vqa-multi", ["fastv"], [1.2], layer=1, items=2)
    with pytest.raises(InputError, match="no image or video input"):
        bench_reducers(model_dir, "toy-transcribe", ["fastv"], [0.5], layer=1, items=2)


def test_cli_writes_table_json_and_plot(model_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    main(
        ["bench", "reducers", "--model", str(model_dir), "--methods", "fastv", "--ratios", "0.5", "--layer", "1",
         "--items", "3", "--batch-size", "3", "--timing-batches", "1", "--repeats", "1", "--decode-steps", "1",
         "--out", str(out)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "| fastv 0.5 |" in printed
    result = json.loads((out / "reducers.json").read_text())
    assert [row["label"] for row in result["rows"]] == ["none", "no image tokens", "fastv 0.5"]
    assert (out / "reducers.md").read_text().count("\n") >= 4
    assert (out / "reducers.png").read_bytes()[:4] == b"\x89PNG"


def test_a_learned_method_runs_on_the_checkpoint_trained_for_it(model_dir, tmp_path):
    from mmllm.model.mmllm import MMLLM
    from mmllm.model.reducers import attach_reducer

    trained_dir = tmp_path / "with_registers"
    model = MMLLM.from_pretrained(model_dir)
    model.save_pretrained(trained_dir)
    attach_reducer(model, "registers:tokens=4,layer=1", train=True).save(trained_dir)
    kwargs = dict(items=3, batch_size=3, timing_batches=1, repeats=1, decode_steps=1, progress=lambda line: None)
    skipped = bench_reducers(model_dir, "toy-vqa-multi", ["registers"], [0.5], **kwargs)["rows"][-1]
    assert "has no trained registers" in skipped["skipped"]  # the base checkpoint was not trained with them
    result = bench_reducers(
        model_dir, "toy-vqa-multi", ["registers"], [0.5], method_models={"registers": trained_dir}, **kwargs
    )
    row = result["rows"][-1]
    assert row["model"] == str(trained_dir) and row["spec"] == "registers"
    # four images lose their 64 codes each and gain 4 registers: (256 - 16) / 256 fewer tokens after layer 1
    assert row["image_tokens_removed"] == pytest.approx((256 - 16) / 256)
    assert row["kv_cache_kib"] < result["rows"][0]["kv_cache_kib"]
