"""Latent reasoning in the user-facing pipeline (issue 8): `finetune.latent_head`, the curriculum driver
(`mmllm latent-train`), the reasoning eval tasks with their modes and token counts (`mmllm eval --latent`),
merge-lora and save_pretrained with a head, and the one-line errors of bad input."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
import yaml

from mmllm.cli import main
from mmllm.errors import ConfigError, InputError
from mmllm.evaluation import report
from mmllm.evaluation.reasoning import ReasoningMode, mode_generator, parse_answer, parse_mode
from mmllm.evaluation.runner import EvalSettings, evaluate
from mmllm.evaluation.tasks import get_task
from mmllm.generation import GenerationConfig, Generator, Prompt, encode_prompts
from mmllm.model.latent import LATENT_HEAD_FILE, CoconutHead, attach_latent_head, latent_generate, load_latent_head
from mmllm.model.latent.train import load_latent_train_config, train_latent
from mmllm.model.mmllm import MMLLM
from mmllm.model.weights import load_weights

from .conftest import REPO, random_toy_tokenizers, toy_vocab_layout, write_yaml

PUZZLES = ("toy-prosqa", "toy-arith", "toy-visual-count")
ZERO3 = str(REPO / "configs" / "deepspeed" / "zero3.json")
SHIPPED = ("toy_cot", "toy_nocot", "toy_pause", "toy_coconut", "toy_colar", "toy_assorted", "toy_mirage")


@pytest.fixture(scope="module")
def base(tmp_path_factory, text_tokenizer_dir) -> Path:
    """A random tiny native checkpoint on the toy layout, with random tiny modality tokenizers."""
    from mmllm.model.config import ModelConfig
    from mmllm.text_tokenizer import load_text_tokenizer

    text_tokenizer = load_text_tokenizer(text_tokenizer_dir)
    torch.manual_seed(0)
    config = ModelConfig.from_yaml(REPO / "configs" / "model" / "tiny.yaml")
    path = tmp_path_factory.mktemp("latent_pipeline") / "base"
    MMLLM.from_config(
        config, toy_vocab_layout(text_tokenizer), text_tokenizer, random_toy_tokenizers()
    ).save_pretrained(path)
    return path


def curriculum_yaml(path: Path, base: Path, **overrides) -> Path:
    """A tiny Coconut curriculum: stages 1 and 2 (one thought, then every step replaced), 2 steps each."""
    config = {
        "method": "coconut",
        "curriculum": {"c_thought": 1, "max_latent_stage": 1},
        "first_stage": 1,
        "steps": 2,
        "puzzles": {"tasks": ["toy-arith", "toy-visual-count"], "items": 3},  # text, and images in the question
        "out": str(path.parent / "out"),
        "ranks": 1,
        "run": {
            "finetune": {
                "base_model": str(base),
                "method": "full",
                "latent_head": {"kind": "coconut", "projection": "mlp", "max_latent_steps": 2},
            },
            "objectives": ["coconut"],
            "data": {"packing": {"seq_len": 512, "condition_dropout": 0.0}},
            "optim": {"lr": 1e-2, "warmup_steps": 1, "weight_decay": 0.0},  # a high rate: 2 steps visibly move
            "micro_batch_size": 2,
            "log_every": 1,
            "threads": 1,
        },
    }
    return write_yaml(path, config, overrides)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- training


def test_a_tiny_curriculum_runs_stage_by_stage_and_its_head_reloads(base, one_rank, tmp_path, caplog):
    config = load_latent_train_config(curriculum_yaml(tmp_path / "c.yaml", base))
    with caplog.at_level(logging.INFO, logger="mmllm.model.latent.curriculum"):
        summary = train_latent(config, progress=False)
    out = tmp_path / "out"
    assert [s["stage"] for s in summary["stages"]] == [1, 2] and summary["eval"] == "coconut:steps=1"
    assert all(math.isfinite(s["first_loss"]) and math.isfinite(s["last_loss"]) for s in summary["stages"])
    log = [json.loads(line) for line in (out / "stage-2" / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss/text"]) for r in log if "loss" in r)  # the coconut objective's token loss
    stage_two = yaml.safe_load((out / "stage-2" / "finetune.yaml").read_text())
    assert stage_two["finetune"]["base_model"] == str(out / "stage-1" / "model")  # each stage from the one before
    assert f"training continues from {out / 'stage-1' / 'model' / LATENT_HEAD_FILE}" in caplog.text
    heads = []
    for directory in (out / "stage-1" / "model", out / "model"):
        model = MMLLM.from_pretrained(directory)  # no head weights among the model's (they would be unexpected)
        heads.append(load_latent_head(model))
        assert heads[-1].options() == {"max_latent_steps": 2, "projection": "mlp"}
    assert not torch.equal(heads[0].projection.down.weight, heads[1].projection.down.weight)  # stage 2 trained it
    assert json.loads((out / "summary.json").read_text()) == summary


def test_a_lora_stage_merges_its_adapter_and_carries_the_head(base, one_rank, tmp_path):
    overrides = {"first_stage": 2, "run.finetune.method": "lora", "run.finetune.lora": {"r": 2, "alpha": 4}}
    summary = train_latent(load_latent_train_config(curriculum_yaml(tmp_path / "c.yaml", base, **overrides)), False)
    stage = tmp_path / "out" / "stage-2"
    assert [s["stage"] for s in summary["stages"]] == [2]
    assert (stage / "adapter" / LATENT_HEAD_FILE).is_file()  # saved beside the adapter
    merged = MMLLM.from_pretrained(stage / "model")  # merge-lora copied it over
    assert load_latent_head(merged).options() == {"max_latent_steps": 2, "projection": "mlp"}


def test_save_pretrained_with_a_hook_attached_writes_no_hook_weights(toy_model, tmp_path):
    head = attach_latent_head(toy_model, CoconutHead(toy_model.layout, toy_model.config.hidden_size, 4, "linear"))
    toy_model.save_pretrained(tmp_path / "model")
    assert not [name for name in load_weights(tmp_path / "model") if name.startswith("model.hooks.")]
    head.save(tmp_path / "model")
    loaded = MMLLM.from_pretrained(tmp_path / "model")
    torch.testing.assert_close(load_latent_head(loaded).state_dict(), head.state_dict(), rtol=0, atol=0)


# ---------------------------------------------------------------- eval


def test_reasoning_tasks_score_the_answer_after_answer_colon():
    assert parse_answer("3 + 4 = 7\nanswer: 7") == "7" and parse_answer("Answer: no.\nmore") == "no."
    assert parse_answer("7") is None and parse_answer("answer:") == ""
    for name in PUZZLES:
        task = get_task(name)
        for item in task.items(4, seed=1):
            assert task.score(item, task.reference_reply(item)) == {"accuracy": 1.0, "unreadable": 0.0}
            assert len(item.reference.encode()) < item.max_new_tokens  # a whole CoT reply fits
            assert task.score(item, [])["unreadable"] == 1.0
        chance = task.chance_reply(item, None)
        assert task.score(item, chance)["unreadable"] == 0.0


def item_prompts(model, name: str, n: int) -> list[list[int]]:
    items = get_task(name).items(n, seed=0)
    return [p.ids for p in encode_prompts(model, [Prompt(i.prompt, i.prompt_kind, i.reply_modality) for i in items])]


@pytest.mark.parametrize("mode", ["cot", "no-cot", "pause:k=3", "coconut:steps=2"])
def test_each_reasoning_mode_scores_accuracy_and_tokens_per_answer(toy_model, tmp_path, mode):
    if mode.startswith("coconut"):
        attach_latent_head(toy_model, CoconutHead(toy_model.layout, toy_model.config.hidden_size, 4, "none"))
    settings = EvalSettings(list(PUZZLES), limit=2, untrained=False, progress=False, latent=parse_mode(mode))
    results = evaluate(toy_model, settings, tmp_path / "results.json")
    assert results["settings"]["latent"] == mode
    for name in PUZZLES:
        entry = results["tasks"][name]
        assert entry["mode"] == mode and entry["metrics"]["accuracy"] is not None
        assert entry["metrics"]["generated_tokens"] > 0
    # The first prosqa item again, outside the runner: thoughts or pause tokens count beside the reply's ids.
    prompt = item_prompts(toy_model, "toy-prosqa", 1)
    config = GenerationConfig(max_new_tokens=get_task("toy-prosqa").max_new_tokens, stop_after_span=True)
    if mode.startswith("coconut"):
        (output,) = latent_generate(toy_model, prompt, 2, config)
        expected = 2 + len(output.ids)
    elif mode.startswith("pause"):
        pauses = [toy_model.layout.token_id(f"<|pause_{i}|>") for i in range(3)]
        expected = 3 + len(Generator(toy_model).generate([[*prompt[0], *pauses]], config)[0].ids)
    else:
        expected = len(Generator(toy_model).generate(prompt, config)[0].ids)
    assert results["tasks"]["toy-prosqa"]["samples"][0]["scores"]["generated_tokens"] == expected
    table = report.results_table(results)
    assert table.splitlines()[0].endswith("| n | mode | tokens/answer |") and f"| {mode} |" in table


def test_eval_cli_loads_the_head_beside_the_weights_and_compares_runs(capsys, toy_model, tmp_path):
    head = attach_latent_head(toy_model, CoconutHead(toy_model.layout, toy_model.config.hidden_size, 3, "linear"))
    toy_model.save_pretrained(tmp_path / "model")
    head.save(tmp_path / "model")
    runs = []
    for mode in ("coconut:steps=3", "nocot"):
        out = tmp_path / mode.split(":")[0] / "results.json"
        argv = ["--quiet", "eval", "--model", str(tmp_path / "model"), "--tasks", "toy-arith", "--limit", "2"]
        assert main([*argv, "--latent", mode, "--out", str(out)]) == 0
        runs.append(str(out))
    results = json.loads(Path(runs[0]).read_text())
    assert results["tasks"]["toy-arith"]["references"]["untrained"]["generated_tokens"] >= 3  # with a fresh head
    capsys.readouterr()
    assert main(["--quiet", "eval", "--compare", *runs]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| method | model | toy-arith accuracy | toy-arith tokens/answer |"
    assert table[2].startswith("| coconut:steps=3 |") and table[3].startswith("| no-cot |")
    assert table[4].startswith("| chance | — |")


# ---------------------------------------------------------------- bad input


def test_eval_refuses_what_a_mode_cannot_run_in_one_line(capsys, toy_model, tmp_path):
    toy_model.save_pretrained(tmp_path / "plain")
    argv = ["eval", "--model", str(tmp_path / "plain"), "--out", str(tmp_path / "r.json")]
    for extra, message in (
        (["--tasks", "toy-prosqa", "--latent", "coconut:steps=2"], "needs the model's latent head"),
        (["--tasks", "toy-prosqa", "--latent", "coconut"], "expected coconut:steps=N"),
        (["--tasks", "toy-prosqa", "--latent", "think"], "unknown reasoning mode"),
        (["--tasks", "toy-caption", "--latent", "cot"], "toy-caption is no reasoning task"),
    ):
        capsys.readouterr()
        assert main(["--quiet", *argv, *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "r.json").exists()
    attach_latent_head(toy_model, CoconutHead(toy_model.layout, toy_model.config.hidden_size, 2))
    settings = EvalSettings(["toy-arith"], limit=1, latent=ReasoningMode("coconut", 3), progress=False)
    with pytest.raises(ConfigError, match="3 latent steps asked for.*at most 2") as error:
        evaluate(toy_model, settings, tmp_path / "r.json")
    one_line(error)
    with pytest.raises(InputError, match="pause needs k >= 1"):
        parse_mode("pause:k=0")


def test_finetune_refuses_a_latent_head_it_cannot_train(base, tmp_path):
    from mmllm.training.finetune import finetune, load_finetune_config

    (tmp_path / "shards").mkdir()
    config = {
        "finetune": {"base_model": str(base), "method": "full"},
        "data": {"sources": [{"path": str(tmp_path / "shards")}]},
    }
    path = write_yaml(tmp_path / "c.yaml", config, {})
    head = "finetune.latent_head={kind: coconut}"
    for overrides, message in (
        (["objectives=[coconut]"], "objective coconut trains a latent head; set finetune.latent_head"),
        ([head], "latent_head coconut trains through objective coconut"),
        (["finetune.latent_head={kind: quiet-star}", "objectives=[coconut]"], "unknown latent head 'quiet-star'"),
        (["finetune.latent_head={kind: coconut, projection: big}", "objectives=[coconut]"], "projection must be"),
        ([head, "objectives=[coconut]", "finetune.reducer=registers"], "latent_head and finetune.reducer"),
    ):
        with pytest.raises(ConfigError, match=message) as error:
            load_finetune_config(path, overrides)
        one_line(error)
    with pytest.raises(ConfigError, match="finetune.latent_head runs with ZeRO-0/1/2"):
        finetune(load_finetune_config(path, [head, "objectives=[coconut]"]), ZERO3)


def test_latent_train_refuses_an_inconsistent_config(base, tmp_path):
    path = curriculum_yaml(tmp_path / "c.yaml", base)
    for overrides, message in (
        (["run.finetune.latent_head={}"], "method coconut needs run.finetune.latent_head"),
        (["method=cot"], "method cot has no head"),
        (["run.out=elsewhere"], "remove run.out"),
        (["curriculum.max_latent_stage=3"], "reaches 3 thoughts .*max_latent_steps 2"),
        (["method=pause", "run.finetune.latent_head={}"], "pause needs pause >= 1"),
        (["first_stage=5"], "first_stage must be in 0..2"),
        (["puzzles.tasks=[toy-caption]"], "puzzles.tasks: name toy puzzles"),
    ):
        with pytest.raises(ConfigError, match=message) as error:
            load_latent_train_config(path, overrides)
        one_line(error)


def test_the_shipped_configs_train_one_method_each_within_the_budget():
    modes, steps, starts = {}, {}, {}
    for name in SHIPPED:
        config = load_latent_train_config(REPO / "configs" / "finetune" / f"{name}.yaml")
        modes[name], steps[name] = config.eval_mode(), config.steps * len(config.stages())
        starts[name] = config.from_scratch or config.run["finetune"]["base_model"]
    assert modes == {
        "toy_cot": "cot",
        "toy_nocot": "no-cot",
        "toy_pause": "pause:k=4",
        "toy_coconut": "coconut:steps=4",
        "toy_colar": "colar:steps=1,c=5",  # without the traces; the driver sizes it to the longest one
        "toy_assorted": "assorted",
        "toy_mirage": "mirage:steps=4",
    }
    # The baselines train a fresh model for the same steps; the heads start from the chain-of-thought model
    # (Coconut's stage 0) and train at most as many steps again; Mirage trains a fresh model on its own task.
    assert {starts[n] for n in ("toy_cot", "toy_nocot", "toy_pause")} == {"configs/model/reasoning.yaml"}
    assert {starts[n] for n in ("toy_coconut", "toy_colar", "toy_assorted")} == {"runs/latent/cot/model"}
    assert starts["toy_mirage"] == "configs/model/toy.yaml"
    assert steps["toy_cot"] == steps["toy_nocot"] == steps["toy_pause"]
    assert max(steps[n] for n in ("toy_coconut", "toy_colar", "toy_assorted")) <= steps["toy_cot"]


# ---------------------------------------------------------------- Mirage and Token Assorted


@pytest.fixture(scope="module")
def latent_bundle(tmp_path_factory, text_tokenizer_dir) -> Path:
    """A tokenizer bundle of configs/vocab/latent.yaml (image and latent_codes ranges) with a random
    tiny image tokenizer: what `from_scratch` builds a model for."""
    from mmllm.config import load_config
    from mmllm.model.config import ModelConfig
    from mmllm.text_tokenizer import fingerprint, load_text_tokenizer
    from mmllm.vocab import VocabLayout, VocabSpec

    text_tokenizer = load_text_tokenizer(text_tokenizer_dir)
    spec = load_config(VocabSpec, REPO / "configs" / "vocab" / "latent.yaml")
    layout = VocabLayout.build(
        len(text_tokenizer), spec.modality_ranges(), text_tokenizer_fingerprint=fingerprint(text_tokenizer)
    )
    tokenizers = {"image": random_toy_tokenizers()["image"]}
    path = tmp_path_factory.mktemp("latent_bundle") / "bundle"
    config = ModelConfig.from_yaml(REPO / "configs" / "model" / "tiny.yaml")
    MMLLM.from_config(config, layout, text_tokenizer, tokenizers).save_pretrained(path)
    return path


def method_yaml(path: Path, method: str, start: dict, tasks: list[str], **overrides) -> Path:
    """A tiny run of `method`: 3 puzzles of `tasks`, 2 steps per stage, from `start` (base_model or from_scratch)."""
    config = {
        "method": method,
        "steps": 2,
        "puzzles": {"tasks": tasks, "items": 3},
        "out": str(path.parent / "out"),
        "ranks": 1,
        **{k: v for k, v in start.items() if k != "base_model"},
        "run": {
            "finetune": {"method": "full", **({"base_model": start["base_model"]} if "base_model" in start else {})},
            "objectives": ["next_token"],
            "data": {"packing": {"seq_len": 512, "condition_dropout": 0.0}},
            "optim": {"lr": 1e-2, "warmup_steps": 1, "weight_decay": 0.0},
            "micro_batch_size": 2,
            "log_every": 1,
            "threads": 1,
        },
    }
    return write_yaml(path, config, overrides)


def mirage_yaml(path: Path, bundle: Path, **overrides) -> Path:
    scratch = {"from_scratch": str(REPO / "configs" / "model" / "tiny.yaml"), "vocab": str(bundle)}
    overrides = {
        "latent_steps_mirage": 2,
        "run.finetune.latent_head": {"kind": "mirage", "projection": "mlp", "max_latent_steps": 4},
        "run.objectives": ["mirage"],
        **overrides,
    }
    return method_yaml(path, "mirage", scratch, ["toy-visual-count"], **overrides)


def test_a_tiny_mirage_run_distils_then_trains_on_text_alone(latent_bundle, one_rank, tmp_path):
    summary = train_latent(load_latent_train_config(mirage_yaml(tmp_path / "m.yaml", latent_bundle)), progress=False)
    out = tmp_path / "out"
    assert (out / "init" / "model" / "config.json").is_file()  # from scratch: a fresh model, then the stages
    assert [s["stage"] for s in summary["stages"]] == [1, 2] and summary["eval"] == "mirage:steps=2"
    first, second = summary["stages"]
    assert first["thoughts"] == second["thoughts"] == 2
    assert math.isfinite(first["first_loss/distill"]) and "first_loss/distill" not in second
    for stage in (1, 2):
        run = yaml.safe_load((out / f"stage-{stage}" / "finetune.yaml").read_text())
        assert run["finetune"]["latent_head"]["stage"] == stage
    head = load_latent_head(MMLLM.from_pretrained(out / "model"))
    assert head.name == "mirage" and head.stage == 2
    results_path = tmp_path / "eval" / "results.json"
    argv = ["--quiet", "eval", "--model", str(out / "model"), "--tasks", "toy-visual-count", "--limit", "2"]
    assert main([*argv, "--no-untrained", "--latent", "mirage:steps=2", "--out", str(results_path)]) == 0
    entry = json.loads(results_path.read_text())["tasks"]["toy-visual-count"]
    assert entry["mode"] == "mirage:steps=2" and all(s["scores"]["generated_tokens"] > 2 for s in entry["samples"])


def test_a_tiny_assorted_run_fits_its_codes_and_decodes_them(latent_bundle, one_rank, tmp_path):
    from mmllm.model.latent import CODES_MODALITY, CotVQVAE

    overrides = {"assorted": {"chunk_len": 8, "codebook_size": 16, "steps": 40}}
    path = method_yaml(tmp_path / "a.yaml", "assorted", {"base_model": str(latent_bundle)}, ["toy-arith"], **overrides)
    summary = train_latent(load_latent_train_config(path), progress=False)
    out = tmp_path / "out"
    assert summary["eval"] == "assorted" and summary["vqvae"]["last_loss"] < summary["vqvae"]["first_loss"]
    assert CotVQVAE.load(out / "cot_vqvae.safetensors").config.chunk_len == 8
    model = MMLLM.from_pretrained(out / "model").eval()
    codes = model.layout.modality(CODES_MODALITY)
    shards = out / "stage-0" / "shards"
    from datasets import load_from_disk

    rows = load_from_disk(str(next(shards.glob("part-*/chunk-*/data"))))
    written = [i for row in rows["input_ids"] for i in row if codes.start <= i < codes.end]
    assert written  # some puzzles write their leading chunks as codes
    # The assorted mode's generator may open a codes span, which the default one cannot (no tokenizer
    # decodes it), and a reply continues in text after the span closes.
    assert CODES_MODALITY in mode_generator(model, parse_mode("assorted")).generatable
    assert CODES_MODALITY not in Generator(model).generatable
    prompt = item_prompts(model, "toy-arith", 1)
    config = GenerationConfig(max_new_tokens=30, stop_after_span=False)
    generator = mode_generator(model, parse_mode("assorted"))
    (output,) = generator.generate(prompt, config, forced=[[model.layout.begin_id(CODES_MODALITY)]])
    closed = output.ids.index(model.layout.end_id(CODES_MODALITY))
    assert all(codes.start <= i < codes.end for i in output.ids[:closed]) and len(output.ids) > closed + 1
    results_path = tmp_path / "eval" / "results.json"
    argv = ["--quiet", "eval", "--model", str(out / "model"), "--tasks", "toy-arith", "--limit", "2"]
    assert main([*argv, "--no-untrained", "--latent", "assorted", "--out", str(results_path)]) == 0
    assert json.loads(results_path.read_text())["tasks"]["toy-arith"]["mode"] == "assorted"


@pytest.mark.parametrize("method", ["colar", "mirage"])
def test_every_head_trains_under_lora_and_merges_with_its_head(latent_bundle, one_rank, tmp_path, method):
    lora = {"run.finetune.method": "lora", "run.finetune.lora": {"r": 2, "alpha": 4}}
    if method == "mirage":
        path = mirage_yaml(tmp_path / "m.yaml", latent_bundle, **lora)
    else:
        path = colar_yaml(tmp_path / "c.yaml", latent_bundle, **lora)
    summary = train_latent(load_latent_train_config(path), progress=False)
    last = tmp_path / "out" / f"stage-{summary['stages'][-1]['stage']}"
    assert (last / "adapter" / LATENT_HEAD_FILE).is_file()  # saved beside the adapter
    assert load_latent_head(MMLLM.from_pretrained(last / "model")).name == method  # merge-lora carried it


def test_mirage_and_assorted_refuse_what_they_cannot_run_in_one_line(latent_bundle, base, toy_model, tmp_path):
    path = mirage_yaml(tmp_path / "m.yaml", latent_bundle)
    for overrides, message in (
        (["run.finetune.latent_head={kind: coconut}"], "method mirage needs run.finetune.latent_head: {kind: mirage}"),
        (["latent_steps_mirage=5"], "latent_steps_mirage must be in 1..4"),
        (["run.finetune.latent_head.stage=2"], "remove run.finetune.latent_head.stage"),
        ([f"run.finetune.base_model={base}"], "from run.finetune.base_model .* or from_scratch"),
        (["vocab="], "from_scratch needs vocab"),
        (["from_scratch=configs/model/missing.yaml"], "from_scratch configs/model/missing.yaml: no such model YAML"),
    ):
        with pytest.raises(ConfigError, match=message) as error:
            load_latent_train_config(path, overrides)
        one_line(error)
    attach_latent_head(toy_model, CoconutHead(toy_model.layout, toy_model.config.hidden_size, 4))
    for mode, message in (
        ("mirage:steps=2", "needs a mirage latent head, the model has a coconut head"),
        ("assorted", "has no latent_codes range"),
    ):
        settings = EvalSettings(["toy-arith"], limit=1, latent=parse_mode(mode), progress=False)
        with pytest.raises(InputError, match=message) as error:
            evaluate(toy_model, settings, tmp_path / "r.json")
        one_line(error)


# ---------------------------------------------------------------- CoLaR


def colar_yaml(path: Path, base: Path, **overrides) -> Path:
    """A tiny CoLaR run: toy-arith's chains of thought (41-53 tokens) compressed 2-fold, 2 steps."""
    overrides = {
        "run.finetune.latent_head": {"kind": "colar", "compression_factors": [2], "max_latent_steps": 32},
        "run.objectives": ["colar"],
        **overrides,
    }
    return method_yaml(path, "colar", {"base_model": str(base)}, ["toy-arith"], **overrides)


def test_a_tiny_colar_run_trains_the_head_and_eval_decodes_through_it(base, one_rank, tmp_path):
    from mmllm.model.latent import ColarHead, colar_generate

    summary = train_latent(load_latent_train_config(colar_yaml(tmp_path / "c.yaml", base)), progress=False)
    out = tmp_path / "out"
    steps = int(summary["eval"].removeprefix("colar:steps=").removesuffix(",c=2"))
    assert summary["method"] == "colar" and 21 <= steps <= 27  # ceil(41..53 / 2): the longest trace's slots
    log = [json.loads(line) for line in (out / "stage-0" / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss/latent"]) for r in log if "loss" in r)
    model = MMLLM.from_pretrained(out / "model")
    head = load_latent_head(model)
    assert isinstance(head, ColarHead)
    assert head.options() == {"max_latent_steps": 32, "compression_factors": [2], "latent_loss": "nll"}
    results_path = tmp_path / "eval" / "results.json"
    argv = ["--quiet", "eval", "--model", str(out / "model"), "--tasks", "toy-prosqa", "--limit", "2"]
    argv += ["--no-untrained", "--latent", "colar:steps=2,c=2", "--out", str(results_path)]  # no reference row: fast
    assert main(argv) == 0
    entry = json.loads(results_path.read_text())["tasks"]["toy-prosqa"]
    assert entry["mode"] == "colar:steps=2,c=2" and entry["metrics"]["accuracy"] is not None
    config = GenerationConfig(max_new_tokens=get_task("toy-prosqa").max_new_tokens, stop_after_span=True)
    outputs = colar_generate(model, item_prompts(model, "toy-prosqa", 2), 2, 2, config)
    assert [s["scores"]["generated_tokens"] for s in entry["samples"]] == [2 + len(o.ids) for o in outputs]


def test_latent_train_refuses_an_inconsistent_colar_config(base, tmp_path):
    path = colar_yaml(tmp_path / "c.yaml", base)
    for overrides, message in (
        (["run.finetune.latent_head={kind: coconut}"], "method colar needs run.finetune.latent_head: {kind: colar}"),
        (["compression=3"], "compression 3 is not among the head's compression_factors \\[2\\]"),
        (["latent_steps=33"], "latent_steps must be in 0..32"),
    ):
        with pytest.raises(ConfigError, match=message) as error:
            load_latent_train_config(path, overrides)
        one_line(error)
    config = load_latent_train_config(path, ["run.finetune.latent_head.max_latent_steps=8"])
    with pytest.raises(ConfigError, match="longest training trace takes .* latent slots at compression 2") as error:
        train_latent(config, progress=False)  # before any step runs
    one_line(error)
    assert not (tmp_path / "out" / "stage-0").exists()
