"""The README's commands and Python example, run as written on tiny inputs (litgpt style).

Each `mmllm ...` line of the README's bash blocks runs in one scratch dir, in order; the Python
block runs after them. `make` targets are left out (CI runs them). The inputs the README
assumes are created first: `captions.txt`, and `my-llm`, a tiny Qwen2 dir with more embedding
rows than tokenizer tokens, as a downloaded Qwen2 has, and `demo_out/model`, a random tiny
checkpoint with toy tokenizers in place of the demo's trained one. Long runs get short settings appended
(later flags and overrides win): `bench model` the tiny config, `tokenizer train` two steps on
a few items, `bench tokenizers` the instant action bins only, `eval` two items per task. Config paths are the repo's.
"""

from __future__ import annotations

import re
import shlex
import shutil

import pytest
import transformers

from mmllm.cli import main

from .conftest import REPO, save_tiny_hf

README = (REPO / "README.md").read_text(encoding="utf-8")
TINY_BENCH = ["--config", str(REPO / "configs/model/tiny.yaml"), "--batch", "2", "--seq", "16", "--repeats", "1"]
SHORT_RUNS = {
    ("bench", "model"): TINY_BENCH,
    ("tokenizer", "train"): ["train.steps=2", "train.batch_size=2", "data.num_items=4"],
    ("tokenizer", "evaluate"): ["--n", "4"],
    ("bench", "tokenizers"): ["--only", "action-bins", "--n", "8", "--repeats", "1"],
    ("eval", "--model"): ["--limit", "2", "--no-untrained"],
}


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def readme_commands() -> list[list[str]]:
    commands = []
    for block in blocks("bash"):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("mmllm "):
                commands.append(shlex.split(line)[1:])
    return commands


def test_readme_has_the_commands_it_documents():
    names = {" ".join(c[:2]) for c in readme_commands()}
    assert {"vocab train-text", "vocab build", "vocab show", "convert --from-hf", "convert --to-hf"} <= names
    assert "make test" in README and "make demo" in README


def test_readme_commands_and_example_run(tmp_path, monkeypatch, caption_file, text_tokenizer, toy_model):
    monkeypatch.chdir(tmp_path)
    shutil.copy(caption_file, tmp_path / "captions.txt")
    toy_model.save_pretrained(tmp_path / "demo_out" / "model")  # what `make demo` leaves, random and tiny
    rows = len(text_tokenizer) + 40  # more embedding rows than tokens, like Qwen2
    save_tiny_hf(tmp_path / "my-llm", "Qwen2", vocab_size=rows, tokenizer=text_tokenizer)

    for argv in readme_commands():
        argv = [str(REPO / a) if a.startswith("configs/") else a for a in argv]
        argv = [*argv, *SHORT_RUNS.get(tuple(argv[:2]), [])]
        assert main(["--quiet", *argv]) == 0, argv

    for example in blocks("python"):
        exec(compile(example, "README.md", "exec"), {})
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "my-llm-mm-hf")
    assert hf.config.vocab_size > rows


@pytest.mark.parametrize(
    "script",
    [
        "tokenizers/train_text.py",
        "tokenizers/train.py",
        "tokenizers/evaluate.py",
        "train/convert.py",
        "serve/export_hf.py",
        "eval/bench.py",
        "eval/run.py",
        "serve/chat.py",
        "serve/server.py",
        "train/finetune.py",
    ],
)
def test_entry_scripts_are_thin_and_run(script):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(REPO / script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage" in result.stdout.lower()
