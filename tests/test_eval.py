"""`mmllm eval`, `mmllm generate` and `mmllm bench generate` on a random tiny model saved to disk."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from mmllm.cli import main
from mmllm.data.media import read_audio, read_image
from mmllm.errors import InputError
from mmllm.evaluation.runner import EvalSettings, check_tasks, checkpoint_hash, evaluate
from mmllm.evaluation.tasks import get_task
from mmllm.generation import GenerationConfig, Generator, Prompt, decode_replies, encode_prompts
from mmllm.model.mmllm import MMLLM

from .conftest import REPO


@pytest.fixture()
def model_dir(toy_model, tmp_path):
    path = tmp_path / "model"
    toy_model.save_pretrained(path)
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["--quiet", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_writes_results_with_references_provenance_and_media(capsys, model_dir, tmp_path):
    out = tmp_path / "eval" / "results.json"
    tasks = "toy-caption,toy-draw,toy-speak,toy-act,toy-text-ppl"
    code, stdout, err = run(
        capsys, "eval", "--model", str(model_dir), "--tasks", tasks, "--limit", "3", "--out", str(out),
        "--report", str(tmp_path / "eval" / "report.md"),
    )  # fmt: skip
    assert code == 0, err
    results = json.loads(out.read_text())
    assert list(results["tasks"]) == tasks.split(",")
    assert results["model"]["hash"] == checkpoint_hash(model_dir)
    assert results["versions"]["torch"] == torch.__version__ and results["seed"] == 0
    assert "--limit" in results["command"]
    assert results["efficiency"]["decode_tokens_per_s"] > 0 and results["efficiency"]["peak_memory_mb"] > 0
    for name, task in results["tasks"].items():
        assert task["metric"] == get_task(name).metric
        assert {"chance", "untrained"} <= set(task["references"]), name
        assert len(task["samples"]) == 3 and all("scores" in s and s["prompt"] for s in task["samples"])
    draw = results["tasks"]["toy-draw"]["samples"][0]
    assert read_image(out.parent / draw["media"][0]).shape == (64, 64, 3)  # the generated image, saved
    speech = results["tasks"]["toy-speak"]["samples"][0]
    assert read_audio(out.parent / speech["media"][0])[0].size > 0
    act = results["tasks"]["toy-act"]["samples"][0]
    assert len(json.loads((out.parent / act["media"][0]).read_text())) == 10  # a 10-step chunk
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| toy-draw | accuracy ↑ |" in report and "report_images.png" in report
    assert "[eval] toy-act: final_error" in stdout


def test_each_sample_is_the_model_reply_scored_by_its_task(toy_model, tmp_path):
    """Re-generate one item outside the runner: the stored output and score must be the same."""
    settings = EvalSettings(["toy-draw", "toy-caption"], limit=2, untrained=False, progress=False, media_per_task=0)
    results = evaluate(toy_model, settings, tmp_path / "results.json")
    for name in settings.tasks:
        task = get_task(name)
        item = task.items(2, 0)[1]
        (prompt,) = encode_prompts(toy_model, [Prompt(item.prompt, item.prompt_kind, item.reply_modality)])
        config = GenerationConfig(max_new_tokens=item.max_new_tokens, stop_after_span=True)
        (output,) = Generator(toy_model).generate([prompt.ids], config)
        (reply,) = decode_replies(toy_model, [prompt.reply(output.ids)])
        assert results["tasks"][name]["samples"][1]["scores"] == pytest.approx(task.score(item, reply))


def test_perplexity_is_the_exponentiated_mean_token_loss(toy_model, tmp_path):
    settings = EvalSettings(["toy-text-ppl"], limit=4, untrained=False, progress=False)
    results = evaluate(toy_model, settings, tmp_path / "results.json")
    from mmllm.chat_template import encode_document

    losses, count = 0.0, 0
    for item in get_task("toy-text-ppl").items(4, 0):
        ids = torch.tensor([encode_document(item.prompt, toy_model.layout, toy_model.text_tokenizer).input_ids])
        with torch.no_grad():
            loss = toy_model(ids, labels=ids).loss
        losses += float(loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    assert results["tasks"]["toy-text-ppl"]["metrics"]["perplexity"] == pytest.approx(math.exp(losses / count), 1e-4)


def test_refusals_come_before_inference(toy_model):
    with pytest.raises(InputError, match="unknown eval task 'toy-nope'"):
        check_tasks(toy_model, ["toy-caption", "toy-nope"], None)
    with pytest.raises(InputError, match="--limit must be >= 1, got 0"):
        check_tasks(toy_model, ["toy-caption"], 0)
    del toy_model.modality_tokenizers["audio"]
    with pytest.raises(InputError, match="toy-transcribe needs audio, but the model has no audio tokenizer"):
        check_tasks(toy_model, ["toy-caption", "toy-transcribe"], None)

    class EncodeOnly(type(toy_model.modality_tokenizers["image"])):
        can_decode = False

    toy_model.modality_tokenizers["image"].__class__ = EncodeOnly
    assert check_tasks(toy_model, ["toy-caption"], None)  # reading images still works
    with pytest.raises(InputError, match="toy-draw generates image, but .* is encode-only"):
        check_tasks(toy_model, ["toy-draw"], None)


def test_eval_cli_errors_are_one_line(capsys, model_dir, tmp_path):
    for argv, message in (
        (["--tasks", "toy-nope"], "unknown eval task 'toy-nope'"),
        (["--tasks", "toy-caption", "--limit", "0"], "--limit must be >= 1"),
        (["--tasks", "toy-caption", "--guidance", "image"], "expected MODALITY=SCALE"),
    ):
        code, _, err = run(capsys, "eval", "--model", str(model_dir), "--out", str(tmp_path / "r.json"), *argv)
        assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "r.json").exists()


def test_eval_script_lists_the_tasks():
    listing = subprocess.run(
        [sys.executable, str(REPO / "eval" / "run.py"), "--list"], capture_output=True, text=True, check=True
    ).stdout
    for name in ("toy-caption", "toy-vqa", "toy-draw", "toy-transcribe", "toy-speak", "toy-motion"):
        assert name in listing
    assert "toy-animate" in listing and "toy-act" in listing and "toy-interleaved" in listing


def test_generate_writes_text_and_media_files(capsys, model_dir, tmp_path):
    out = tmp_path / "drawn"
    code, stdout, err = run(
        capsys, "generate", "--model", str(model_dir), "--prompt", "Draw a red circle.", "--reply", "image",
        "--guidance", "image=3", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    listing = json.loads((out / "reply.json").read_text())
    assert listing["parts"][0] == {"type": "image", "file": "reply-0.png"}
    image = read_image(out / "reply-0.png")
    assert image.shape == (64, 64, 3)
    assert stdout.startswith("[image ...]")

    described = tmp_path / "described"
    code, _, err = run(
        capsys, "generate", "--model", str(model_dir), "--prompt", "Describe the image.", "--image",
        str(out / "reply-0.png"), "--sampling", "temperature=0.8,top_k=20", "--max-new-tokens", "12",
        "--out", str(described),
    )  # fmt: skip
    assert code == 0, err
    assert json.loads((described / "reply.json").read_text())["new_tokens"] <= 12
    assert (described / "reply.txt").is_file()

    code, _, err = run(capsys, "generate", "--model", str(model_dir), "--prompt", "x", "--reply", "smell", "--out", ".")
    assert code == 2 and "--reply smell" in err


def test_bench_generate_compares_with_transformers_and_sequential_guidance(model_dir):
    from mmllm.bench.generate import bench_generate, format_generate_bench

    result = bench_generate(model_dir, tokens=6, batches=[1, 2], repeats=1, threads=None)
    for batch in ("1", "2"):
        assert result["decode"][batch]["ratio"] > 0 and result["cfg"][batch]["ratio"] > 0
        assert np.isfinite(result["decode"][batch]["tokens_per_s"]["hf"]["median"])
    assert "CFG batched" in format_generate_bench(result)


def test_adapter_is_merged_into_the_evaluated_model(toy_model, model_dir, tmp_path):
    import peft

    wrapped = peft.get_peft_model(
        MMLLM.from_pretrained(model_dir), peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    wrapped.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = wrapped(ids).logits
    from mmllm.model.adapters import apply_adapter

    merged = apply_adapter(MMLLM.from_pretrained(model_dir), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, expected, atol=1e-5)
        assert not torch.allclose(toy_model(ids).logits, expected, atol=1e-3)  # the adapter changes something
