"""The `mmllm` command: vocab, convert, bench and demo, and one clear line for each bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
import transformers

from mmllm.cli import main
from mmllm.data.media import read_media
from mmllm.demo import EVAL_TASKS
from mmllm.model.mmllm import MMLLM

from .conftest import REPO, save_tiny_hf


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop output of the test's own set-up
    code = main(["--quiet", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture()
def hf_dir(tmp_path, text_tokenizer):
    """A tiny HF Llama with its own tokenizer files, as a user would download it."""
    return save_tiny_hf(tmp_path / "hf", vocab_size=len(text_tokenizer), tokenizer=text_tokenizer)


def build_layout(capsys, text_tokenizer_dir, out, *options: str) -> None:
    code, _, err = run(
        capsys, "vocab", "build", "--text-tokenizer", str(text_tokenizer_dir), "--out", str(out), *options
    )
    assert code == 0, err


def test_vocab_build_and_show(capsys, tmp_path, text_tokenizer_dir):
    out = tmp_path / "layout" / "vocab_layout.json"
    code, stdout, _ = run(
        capsys,
        "vocab",
        "build",
        "--text-tokenizer",
        str(text_tokenizer_dir),
        "--modality",
        "image=64,action=256",
        "--modality",
        "audio=32:levels=2:max_frames=20",
        "--out",
        str(out),
    )
    assert code == 0 and "image" in stdout and (out.parent / "text_tokenizer" / "tokenizer.json").is_file()
    layout = json.loads(out.read_text())
    assert list(layout["modalities"]) == ["image", "action", "audio"]
    assert layout["modalities"]["image"]["grid"] == [8, 8]
    code, stdout, _ = run(capsys, "vocab", "show", str(out.parent))
    assert code == 0 and "audio" in stdout and "padded to" in stdout


def test_vocab_build_from_config(capsys, tmp_path, text_tokenizer_dir):
    out = tmp_path / "vocab_layout.json"
    build_layout(capsys, text_tokenizer_dir, out, "--config", str(REPO / "configs" / "vocab" / "toy.yaml"))
    assert set(json.loads(out.read_text())["modalities"]) == {"image", "audio", "video", "action"}


def test_vocab_build_bundles_modality_tokenizers_that_fit(capsys, tmp_path, text_tokenizer_dir):
    from mmllm.data.pretokenize import TokenizerBundle
    from mmllm.tokenizers import load_tokenizer

    load_tokenizer("action-bins").save_pretrained(tmp_path / "bins256")
    load_tokenizer("action-bins", bins=128).save_pretrained(tmp_path / "bins128")
    toy = str(REPO / "configs" / "vocab" / "toy.yaml")
    out = tmp_path / "bundle" / "vocab_layout.json"
    build_layout(capsys, text_tokenizer_dir, out, "--config", toy, "--tokenizer", f"action={tmp_path / 'bins256'}")
    bundle = TokenizerBundle.load(out.parent)
    assert set(bundle.modality_tokenizers) == {"action"}
    # a tokenizer whose codebook does not match its range is refused before anything is written
    code, _, err = run(
        capsys, "vocab", "build", "--text-tokenizer", str(text_tokenizer_dir), "--config", toy,
        "--tokenizer", f"action={tmp_path / 'bins128'}", "--out", str(tmp_path / "bad" / "vocab_layout.json"),
    )  # fmt: skip
    assert code == 2 and "codebook_size" in err and not (tmp_path / "bad").exists()


def test_convert_from_hf_with_layout_then_to_hf(capsys, tmp_path, hf_dir, text_tokenizer_dir):
    layout_path = tmp_path / "layout" / "vocab_layout.json"
    build_layout(capsys, text_tokenizer_dir, layout_path, "--modality", "image=64")
    code, _, err = run(
        capsys, "convert", "--from-hf", str(hf_dir), "--layout", str(layout_path), "--out", str(tmp_path / "native")
    )
    assert code == 0, err
    native = MMLLM.from_pretrained(tmp_path / "native")
    assert native.layout is not None and native.config.vocab_size == native.layout.padded_size
    code, _, err = run(
        capsys, "convert", "--to-hf", str(tmp_path / "native"), "--out", str(tmp_path / "export"), "--dtype", "bfloat16"
    )
    assert code == 0, err
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert exported.dtype == torch.bfloat16 and exported.config.vocab_size == native.config.vocab_size


def test_bench_model_reports_both_and_the_ratio(capsys, tmp_path):
    out = tmp_path / "bench.json"
    code, stdout, err = run(
        capsys,
        "bench",
        "model",
        "--config",
        str(REPO / "configs" / "model" / "tiny.yaml"),
        "--batch",
        "2",
        "--seq",
        "16",
        "--repeats",
        "2",
        "--warmup",
        "0",
        "--out",
        str(out),
    )
    assert code == 0, err
    result = json.loads(out.read_text())
    assert set(result["tokens_per_s"]) == {"mmllm", "hf"} and result["ratio"] > 0
    assert "ratio mmllm / HF" in stdout


def test_demo_fast_pretrains_on_two_ranks_and_reports_falling_losses(capsys, tmp_path):
    out = tmp_path / "demo"
    code, _, err = run(capsys, "demo", "--fast", "--out", str(out))
    assert code == 0, err
    report = (out / "report.md").read_text()
    assert "transformers AutoModelForCausalLM on the export" in report and "![loss curves](loss_curves.png)" in report
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (out / "pretrain" / "log.jsonl").read_text().splitlines()]
    for modality in ("text", "image", "audio", "video", "action"):
        losses = [r[f"loss/{modality}"] for r in records if f"loss/{modality}" in r]
        assert len(losses) > 10, modality
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, modality  # falls by half a nat at least
    state = json.loads((out / "pretrain" / "checkpoints" / "step-000040" / "trainer_state.json").read_text())
    assert len(state["ranks"]) == 2  # each rank saved its RNG state: a real 2-rank run
    model = MMLLM.from_pretrained(out / "model")
    assert model.layout is not None and model.text_tokenizer is not None
    assert set(model.modality_tokenizers) == {"image", "audio", "video", "action"}
    results = json.loads((out / "eval" / "results.json").read_text())
    assert set(results["tasks"]) == set(EVAL_TASKS)
    for name, task in results["tasks"].items():
        assert task["n"] >= 200, name  # every task on 200 held-out items (--fast)
        for row in (task["metrics"], task["references"]["chance"], task["references"]["untrained"]):
            assert row[task["metric"]] is not None, name
    ppl = results["tasks"]["toy-text-ppl"]
    assert ppl["metrics"]["perplexity"] < ppl["references"]["untrained"]["perplexity"] / 2  # pretraining shows
    assert "| toy-draw | accuracy ↑ |" in report and "![image grid](image_grid.png)" in report
    generated = {"toy-draw": "image", "toy-speak": "audio", "toy-animate": "video", "toy-act": "action"}
    for name, modality in generated.items():
        files = [media for sample in results["tasks"][name]["samples"] for media in sample["media"]]
        assert files, name
        for media in files:
            read_media(modality, out / "eval" / media)  # raises MediaError on a file that does not decode
    wav = re.search(r"\]\((eval/media/toy-speak/[^)]+\.wav)\)", report)
    assert wav and (out / wav.group(1)).is_file()
    sft = [json.loads(line) for line in (out / "finetune" / "log.jsonl").read_text().splitlines()]
    assert len([r for r in sft if "loss" in r]) == 10
    assert (out / "finetune" / "adapter" / "adapter_config.json").is_file()
    assert not any("lora" in name for name, _ in model.named_parameters())  # merged: a plain checkpoint
    transcript = json.loads((out / "chat" / "transcript.json").read_text())["messages"]
    replies = [part["type"] for message in transcript[1::2] for part in message["content"] if part["type"] != "text"]
    assert replies == ["image", "audio", "action"]  # drawn, spoken, acted
    assert "| [image](chat/scene.png) Describe the image. |" in report
    assert "- `GET /v1/models`: demo" in report and "-byte PNG" in report  # the openai client talked to `serve`
    reduction = json.loads((out / "reducers.json").read_text())
    none, blind, fastv = reduction["rows"]
    assert blind["image_tokens_removed"] == pytest.approx(1.0)
    assert fastv["spec"] == "fastv:ratio=0.5,layer=1" and fastv["image_tokens_removed"] == pytest.approx(0.5)
    assert fastv["prefill_gflops"] < none["prefill_gflops"] and fastv["accuracy"] is not None
    assert "| fastv 0.5 | 50% |" in report


# ---------------------------------------------------------------------- bad input: one line each


def one_line_error(capsys, *argv: str) -> str:
    code, _, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_missing_checkpoint_dir(capsys, tmp_path):
    assert "checkpoint dir not found" in one_line_error(
        capsys, "convert", "--to-hf", str(tmp_path / "x"), "--out", str(tmp_path / "y")
    )


def test_partial_checkpoint_dir(capsys, tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"format": "mmllm.model", "model": {}}))
    assert "no weights" in one_line_error(
        capsys, "convert", "--to-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "y")
    )


def test_unsupported_architecture(capsys, tmp_path):
    transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    ).save_pretrained(tmp_path / "gpt2")
    line = one_line_error(capsys, "convert", "--from-hf", str(tmp_path / "gpt2"), "--out", str(tmp_path / "y"))
    assert "unsupported architecture GPT2LMHeadModel" in line


def test_embedding_size_disagreeing_with_layout(capsys, tmp_path, hf_dir, text_tokenizer_dir):
    layout_path = tmp_path / "vocab_layout.json"
    build_layout(capsys, text_tokenizer_dir, layout_path, "--modality", "image=64", "--base-rows", "1000")
    line = one_line_error(
        capsys, "convert", "--from-hf", str(hf_dir), "--layout", str(layout_path), "--out", str(tmp_path / "y")
    )
    assert "embedding rows but the layout was built for 1000" in line


def test_overlapping_layout(capsys, tmp_path, toy_layout):
    data = toy_layout.to_dict()
    data["special_tokens"]["<|pad|>"] = data["modalities"]["image"]["start"]
    (tmp_path / "vocab_layout.json").write_text(json.dumps(data))
    assert "overlaps" in one_line_error(capsys, "vocab", "show", str(tmp_path / "vocab_layout.json"))


def test_malformed_yaml_key(capsys, tmp_path):
    (tmp_path / "model.yaml").write_text("hidden_size: 64\nnum_layers: 2\n")
    line = one_line_error(capsys, "bench", "model", "--config", str(tmp_path / "model.yaml"))
    assert "unknown key 'num_layers'" in line


def test_console_script_prints_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mmllm", "vocab", "show", str(tmp_path / "absent.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'absent.json'}: vocab layout not found"
