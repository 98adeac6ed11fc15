"""Pretokenization and the DeepSpeed loop on CPU: rank equivalence, exact resume after kill -9 and
on fewer ranks, freeze stages, init_from_hf, the non-finite guard, and the errors raised before
any step."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mmllm.data.interleaved import read_jsonl
from mmllm.data.pretokenize import ShardDocuments, TokenizerBundle, load_shards, pretokenize
from mmllm.errors import ConfigError, LayoutError
from mmllm.model.weights import load_weights
from mmllm.training.launch import free_port

from .conftest import random_toy_tokenizers, save_tiny_hf, toy_vocab_layout, write_yaml

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "ds_worker.py"
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
LOSS_TOLERANCE = 1e-5  # the bound; float32 sums in another order differ by ~1e-7
ZERO2 = str(REPO / "configs" / "deepspeed" / "zero2.json")
ZERO3 = str(REPO / "configs" / "deepspeed" / "zero3.json")
VOCAB_WEIGHTS = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory, text_tokenizer_dir):
    """A tokenizer bundle (random tiny modality tokenizers sized to the toy layout) and toy-world shards."""
    from mmllm.data.toy_tasks import write_toyworld
    from mmllm.text_tokenizer import load_text_tokenizer

    root = tmp_path_factory.mktemp("pretrain")
    text_tokenizer = load_text_tokenizer(text_tokenizer_dir)
    layout = toy_vocab_layout(text_tokenizer)
    tokenizers = random_toy_tokenizers()
    TokenizerBundle(layout, text_tokenizer, tokenizers).save(root / "bundle")
    world = write_toyworld(root / "world", 6, seed=0)
    report = pretokenize(read_jsonl(world["path"]), Path(world["path"]).parent, root / "bundle", root / "shards")
    assert report.skipped == 0
    return root


def test_pretokenize_writes_documents_with_targets_per_modality(toy_data):
    dataset = load_shards(toy_data / "shards")
    assert len(dataset) == 72  # 12 tasks x 6
    docs = ShardDocuments(dataset)
    by_task = {dataset[i]["task"]: docs[i] for i in range(len(docs))}
    layout = TokenizerBundle.load(toy_data / "bundle").layout
    image = list(layout.modalities).index("image") + 1
    draw = by_task["toy-draw"]  # text -> image: the image is the target, the prompt is the condition
    assert (draw.modality[draw.loss_mask] == image).sum() == 64 + 2  # codes and delimiters
    assert draw.condition.any() and not (draw.condition & draw.loss_mask).any()
    caption = by_task["toy-caption"]  # image -> text: no generated media, no condition
    assert not caption.condition.any() and not (caption.loss_mask & (caption.modality != 0)).any()
    assert not draw.splittable


def test_pretokenize_resumes_and_skips_bad_samples(toy_data, tmp_path):
    world = toy_data / "world"
    jsonl = next(world.glob("*.jsonl"))
    records = list(read_jsonl(jsonl))[:20]
    bad = dict(records[3])
    bad["messages"] = [{"role": "user", "content": [{"type": "image", "path": "missing.png"}]}]
    records[3] = bad
    out = tmp_path / "shards"
    first = pretokenize(iter(records), world, toy_data / "bundle", out, chunk_size=8, progress=False)
    assert (first.records, first.written, first.skipped) == (20, 19, 1)
    assert "missing.png" in first.failures[0]["error"]
    report = json.loads((out / "part-00000-of-00001" / "report.json").read_text())
    assert report["skipped"] == 1
    # A rerun finds every chunk done and re-encodes nothing, yet reports the same totals.
    again = pretokenize(iter(records), world, toy_data / "bundle", out, chunk_size=8, progress=False)
    assert again.chunks_reused == 3 and (again.written, again.skipped) == (19, 1)
    # Shards split the records between jobs without overlap.
    halves = [
        pretokenize(iter(records), world, toy_data / "bundle", tmp_path / "split", shard=(i, 2), progress=False)
        for i in range(2)
    ]
    assert sum(h.written for h in halves) == 19
    assert len(load_shards(tmp_path / "split")) == 19


def test_shards_of_another_layout_are_refused(toy_data):
    from mmllm.vocab import ModalityRange, VocabLayout

    other = VocabLayout.build(400, [ModalityRange("image", 16, grid=(2, 2))])
    with pytest.raises(LayoutError, match="another vocab layout"):
        load_shards(toy_data / "shards", other)


def write_config(path: Path, toy_data: Path, **overrides) -> Path:
    config = {
        "model": str(REPO / "configs" / "model" / "tiny.yaml"),
        "vocab": str(toy_data / "bundle"),
        "out": str(path.parent / "run"),
        "data": {"sources": [{"path": str(toy_data / "shards")}], "packing": {"seq_len": 512}},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "steps": 4,
        "micro_batch_size": 4,
        "log_every": 100,
        "threads": 1,
    }
    return write_yaml(path, config, overrides)


def launch(ranks: int, config: Path, ds_config: str | None, out: Path, *extra: str, env=None, wait=True):
    command = [str(DEEPSPEED), "--num_gpus", str(ranks), "--master_port", str(free_port())]
    command += [str(WORKER), str(config), ds_config or "-", str(out), *extra]
    # PYTHONFAULTHANDLER: a rank that dies of a signal prints every thread's Python stack.
    environment = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    environment.update(env or {})
    process = subprocess.Popen(
        command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    if not wait:
        return process
    output = process.communicate(timeout=300)[0].decode(errors="replace")
    written = "after" if out.exists() else "before"
    assert process.returncode == 0, f"failed {written} writing its results:\n{output[-3000:]}"
    return json.loads(out.read_text())


def write_tied_model(path: Path) -> Path:
    config = yaml.safe_load((REPO / "configs" / "model" / "tiny.yaml").read_text())
    path.write_text(yaml.safe_dump({**config, "tie_word_embeddings": True}))
    return path


@pytest.mark.parametrize("stage,tied", [(0, False), (2, False), (3, True)])
def test_two_ranks_match_one_rank_with_the_same_global_batch(toy_data, tmp_path, stage, tied):
    model = {"model": str(write_tied_model(tmp_path / "tied.yaml"))} if tied else {}
    one = launch(1, write_config(tmp_path / "one" / "c.yaml", toy_data, **model), None, tmp_path / "one.json")
    two_config = write_config(tmp_path / "two" / "c.yaml", toy_data, micro_batch_size=2, **model)
    two = launch(2, two_config, str(REPO / "configs" / "deepspeed" / f"zero{stage}.json"), tmp_path / "two.json")
    steps = sorted(one["losses"])
    assert steps == sorted(two["losses"]) and len(steps) == 4
    diffs = [abs(one["losses"][s] - two["losses"][s]) for s in steps]
    assert max(diffs) < LOSS_TOLERANCE, diffs
    assert one["losses"][steps[-1]] < one["losses"][steps[0]]  # it learns
    assert two["fingerprints"][0] == two["fingerprints"][1]  # ranks hold identical parameters


def test_bf16_mixed_precision_trains_like_fp32_on_two_ranks(toy_data, tmp_path):
    """bf16 autocast on the CPU ranks: the same steps, losses within bf16's rounding of fp32's."""
    runs = {
        precision: launch(
            2,
            write_config(tmp_path / precision / "c.yaml", toy_data, micro_batch_size=2, precision=precision),
            ZERO2,
            tmp_path / f"{precision}.json",
        )
        for precision in ("fp32", "bf16-mixed")
    }
    fp32, mixed = runs["fp32"]["losses"], runs["bf16-mixed"]["losses"]
    steps = sorted(fp32)
    assert sorted(mixed) == steps
    # bf16 keeps 8 bits of mantissa: each matmul rounds at ~0.4%, the loss moves by well under 2%
    assert all(abs(mixed[s] - fp32[s]) < 0.02 * fp32[s] for s in steps), (fp32, mixed)
    assert any(mixed[s] != fp32[s] for s in steps)  # autocast did run in bf16
    assert mixed[steps[-1]] < mixed[steps[0]]


def test_resume_after_kill_matches_an_uninterrupted_run(toy_data, tmp_path):
    common = {"steps": 20, "micro_batch_size": 2, "objectives": ["slow_next_token"]}
    straight = launch(2, write_config(tmp_path / "a" / "c.yaml", toy_data, **common), ZERO2, tmp_path / "a.json")
    config = write_config(tmp_path / "b" / "c.yaml", toy_data, save_every=10, **common)
    latest = tmp_path / "b" / "run" / "checkpoints" / "latest"
    # From step 11 on each step pauses, so the kill lands between the step-10 checkpoint and the end.
    process = launch(2, config, ZERO2, tmp_path / "b.json", env={"SLOW_AFTER": "10"}, wait=False)
    deadline = time.time() + 240
    while not (latest.is_file() and latest.read_text().strip() == "step-000010"):
        assert process.poll() is None and time.time() < deadline, "the run ended before its step-10 checkpoint"
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    resumed = launch(2, config, ZERO2, tmp_path / "b.json", "--resume")
    assert sorted(resumed["losses"], key=int) == [str(s) for s in range(11, 21)]
    diffs = [abs(resumed["losses"][s] - straight["losses"][s]) for s in resumed["losses"]]
    assert max(diffs) < LOSS_TOLERANCE, diffs


def resume_from(checkpoint: Path, ranks: int, config: Path, ds_config: str, out: Path) -> dict:
    """Resume the run of `config` on `ranks` ranks from a copy of another run's `checkpoint`."""
    checkpoints = config.parent / "run" / "checkpoints"
    shutil.copytree(checkpoint, checkpoints / checkpoint.name)
    (checkpoints / "latest").write_text(checkpoint.name + "\n")
    result = launch(ranks, config, ds_config, out, "--resume")
    assert not list(checkpoints.glob(".*universal*"))  # the universal conversion is cleaned up
    return result


def test_resume_on_one_rank_continues_a_two_rank_zero2_run(toy_data, tmp_path):
    # The checkpoint falls inside a freeze stage, so the resumed run must also re-enter it.
    stages = [{"steps": 4, "train": ["new_rows", "norms"]}, {"train": "all"}]
    common = {"steps": 6, "micro_batch_size": 2, "stages": stages}
    straight = launch(
        2, write_config(tmp_path / "a" / "c.yaml", toy_data, save_every=3, **common), ZERO2, tmp_path / "a.json"
    )
    # One rank with twice the accumulation takes the same global batch, so the same rows per step.
    config = write_config(tmp_path / "b" / "c.yaml", toy_data, gradient_accumulation_steps=2, **common)
    checkpoint = tmp_path / "a" / "run" / "checkpoints" / "step-000003"
    resumed = resume_from(checkpoint, 1, config, ZERO2, tmp_path / "b.json")
    assert sorted(resumed["losses"], key=int) == ["4", "5", "6"]
    diffs = [abs(resumed["losses"][s] - straight["losses"][s]) for s in resumed["losses"]]
    assert max(diffs) < LOSS_TOLERANCE, diffs


def assert_only_new_rows_and_norms_moved(before, after, base_rows: int) -> None:
    for name, tensor in after.items():
        if name in VOCAB_WEIGHTS:
            assert torch.equal(tensor[:base_rows], before[name][:base_rows]), name
            assert not torch.equal(tensor[base_rows:], before[name][base_rows:]), name
        elif "norm" in name:
            assert not torch.equal(tensor, before[name]), name
        else:
            assert torch.equal(tensor, before[name]), name


def assert_everything_moved(before, after, base_rows: int) -> None:
    for name, tensor in after.items():
        assert not torch.equal(tensor, before[name]), name
        if name in VOCAB_WEIGHTS:
            assert not torch.equal(tensor[:base_rows], before[name][:base_rows]), name


@pytest.fixture(scope="module")
def anole_run(toy_data, tmp_path_factory, text_tokenizer_dir):
    """Anole's recipe on a tiny random HF Llama whose vocabulary is the text tokenizer's: the run
    extends it (init_from_hf), trains new rows + norms for 2 steps, then everything for 2; a
    checkpoint after each stage. Returns the run's config path, the HF dir and the losses."""
    from mmllm.text_tokenizer import load_text_tokenizer

    root = tmp_path_factory.mktemp("anole")
    hf_dir = save_tiny_hf(root / "hf", vocab_size=len(load_text_tokenizer(text_tokenizer_dir)))
    stages = [{"steps": 2, "train": ["new_rows", "norms"]}, {"train": "all"}]
    config = write_config(root / "c.yaml", toy_data, init_from_hf=str(hf_dir), stages=stages, save_every=2)
    return config, hf_dir, launch(1, config, None, root / "r.json")["losses"]


def test_init_from_hf_starts_from_the_hf_weights_with_the_vocabulary_extended(anole_run):
    import transformers

    from mmllm.training.config import load_pretrain_config
    from mmllm.training.loop import initial_model

    config_path, hf_dir, losses = anole_run
    model = initial_model(load_pretrain_config(config_path))
    layout = model.layout
    assert model.config.vocab_size == layout.padded_size > layout.base_rows == layout.text_size
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir)
    ids = torch.randint(0, layout.text_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits[..., : layout.text_size], hf(ids).logits)
    # The run itself started there: the text rows and layers, frozen for stage 1, are HF's bit for bit.
    hf_weights = load_weights(hf_dir)
    after_stage = load_weights(config_path.parent / "run" / "checkpoints" / "step-000002" / "model")
    for name, tensor in hf_weights.items():
        if "norm" not in name:
            assert torch.equal(after_stage[name][: layout.text_size], tensor), name
    published = load_weights(config_path.parent / "run" / "model")
    assert published["model.embed_tokens.weight"].shape[0] == layout.padded_size
    assert losses["4"] < losses["1"]  # it learns


def test_freeze_stage_trains_new_rows_and_norms_then_everything(anole_run):
    from mmllm.training.config import load_pretrain_config
    from mmllm.training.loop import initial_model

    config_path, _, _ = anole_run
    model = initial_model(load_pretrain_config(config_path))
    checkpoints = config_path.parent / "run" / "checkpoints"
    after_stage, final = (load_weights(checkpoints / f"step-00000{s}" / "model") for s in (2, 4))
    assert_only_new_rows_and_norms_moved(model.state_dict(), after_stage, model.layout.base_rows)
    assert_everything_moved(after_stage, final, model.layout.base_rows)


@pytest.fixture(scope="module")
def zero3_tied_run(toy_data, tmp_path_factory):
    """Two ZeRO-3 ranks, tied embeddings, stages all (1 step), new rows + norms (2), all (1); a
    checkpoint every step. The vocabulary rows train in stage 1, so stage 2 must also clear their
    Adam momentum. Returns the run's dir, its YAML settings and its result."""
    root = tmp_path_factory.mktemp("zero3")
    stages = [{"steps": 1, "train": "all"}, {"steps": 2, "train": ["new_rows", "norms"]}, {"train": "all"}]
    settings = {"model": str(write_tied_model(root / "tied.yaml")), "micro_batch_size": 2, "stages": stages}
    config = write_config(root / "c.yaml", toy_data, save_every=1, keep_last=4, **settings)
    return root, settings, launch(2, config, ZERO3, root / "r.json")


def test_freeze_stages_on_two_zero3_ranks_with_tied_embeddings(toy_data, zero3_tied_run):
    root, _, result = zero3_tied_run
    assert result["fingerprints"][0] == result["fingerprints"][1]
    checkpoints = root / "run" / "checkpoints"
    first, frozen, final = (load_weights(checkpoints / f"step-00000{s}" / "model") for s in (1, 3, 4))
    assert "lm_head.weight" not in first  # tied: one tensor holds both
    base_rows = TokenizerBundle.load(toy_data / "bundle").layout.base_rows
    assert_only_new_rows_and_norms_moved(first, frozen, base_rows)
    assert_everything_moved(frozen, final, base_rows)


def test_resume_on_one_rank_from_a_two_rank_zero3_checkpoint(toy_data, zero3_tied_run, tmp_path):
    root, settings, straight = zero3_tied_run
    config = write_config(tmp_path / "c.yaml", toy_data, gradient_accumulation_steps=2, **settings)
    resumed = resume_from(root / "run" / "checkpoints" / "step-000002", 1, config, ZERO3, tmp_path / "r.json")
    assert sorted(resumed["losses"], key=int) == ["3", "4"]
    diffs = [abs(resumed["losses"][s] - straight["losses"][s]) for s in resumed["losses"]]
    assert max(diffs) < LOSS_TOLERANCE, diffs


def test_nonfinite_losses_skip_steps_then_stop_the_run(toy_data, tmp_path):
    config = write_config(tmp_path / "c" / "c.yaml", toy_data, steps=6, objectives=["flaky_next_token"])
    result = launch(1, config, None, tmp_path / "r.json", env={"NAN_CALLS": "2,4"})
    assert result["nonfinite"] == 2 and len(result["losses"]) == 6
    assert np.isnan(result["losses"]["2"]) and np.isfinite(result["losses"]["6"])
    flaky = {"steps": 6, "max_nonfinite": 2, "objectives": ["flaky_next_token"]}
    stopping = write_config(tmp_path / "d" / "c.yaml", toy_data, **flaky)
    process = launch(1, stopping, None, tmp_path / "s.json", env={"NAN_CALLS": "2,3"}, wait=False)
    output = process.communicate(timeout=300)[0].decode(errors="replace")
    assert process.returncode != 0 and "2 non-finite losses in a row at step 2" in output


def test_errors_before_the_first_step(toy_data, tmp_path):
    from mmllm.training.config import load_pretrain_config
    from mmllm.training.deepspeed_config import resolve_deepspeed_config
    from mmllm.training.objectives import get_objective

    good = write_config(tmp_path / "c.yaml", toy_data)
    with pytest.raises(ConfigError, match="no such shard dir"):
        load_pretrain_config(good, [f"data.sources=[{{path: {tmp_path / 'nowhere'}}}]"])
    config = load_pretrain_config(good)
    with pytest.raises(ConfigError, match="train_batch_size is 64 but the run's YAML implies 8"):
        resolve_deepspeed_config({"train_batch_size": 64}, config, world_size=2)
    with pytest.raises(ConfigError, match="remove the 'optimizer' section"):
        resolve_deepspeed_config({"optimizer": {"type": "Adam"}}, config, world_size=1)
    with pytest.raises(ConfigError, match="unknown objective 'typo'"):
        get_objective("typo")
    with pytest.raises(ConfigError, match=r"stages\[1\]: unknown trainable part 'new_row'; choose from all, new_rows"):
        load_pretrain_config(good, ["stages=[{steps: 2, train: all}, {train: [new_row, norms]}]"])
    with pytest.raises(ConfigError, match="the stages cover 3 steps but the run has 4"):
        load_pretrain_config(good, ["stages=[{steps: 3, train: [new_rows]}]"])
    resolved = resolve_deepspeed_config({"train_batch_size": "auto", "bf16": {"enabled": "auto"}}, config, 2)
    assert resolved["train_batch_size"] == 8 and resolved["bf16"]["enabled"] is False


def test_shipped_configs_parse_and_resolve():
    from mmllm.config import load_config
    from mmllm.training.config import PretrainConfig
    from mmllm.training.deepspeed_config import load_deepspeed_config, resolve_deepspeed_config, zero_stage

    config = load_config(PretrainConfig, REPO / "configs" / "pretrain" / "toy.yaml")
    assert config.data.packing.seq_len == 1024
    for path in sorted((REPO / "configs" / "deepspeed").glob("*.json")):
        resolved = resolve_deepspeed_config(load_deepspeed_config(path), config, world_size=2)
        assert resolved["train_batch_size"] == 2 * config.micro_batch_size
        assert zero_stage(resolved) == (0 if "zero0" in path.name else int(path.stem[4]))
