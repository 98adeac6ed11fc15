"""`mmllm chat` driven like a user (a real pseudo-terminal), from a pipe, and large-checkpoint loading."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pexpect
import pytest
import torch

from mmllm.data.media import read_audio, read_image, write_image
from mmllm.data.toyworld import render_image, sample_scene
from mmllm.errors import CheckpointError, ConfigError
from mmllm.model.config import ModelConfig
from mmllm.model.mmllm import MMLLM
from mmllm.serving.session import ChatSession

from .conftest import REPO, random_toy_tokenizers, toy_vocab_layout

CHAT = [sys.executable, str(REPO / "serve" / "chat.py")]
TIMEOUT = 60  # s for one reply: model load and a 193-id video span on a busy 2-core machine


@pytest.fixture()
def model_dir(toy_model, tmp_path):
    toy_model.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.fixture()
def picture(tmp_path):
    import random

    path = tmp_path / "scene.png"
    write_image(path, render_image(sample_scene(random.Random(3), 1)))
    return path


def test_chat_in_a_terminal_like_a_user(model_dir, picture, tmp_path):
    media = tmp_path / "media"
    argv = [*CHAT[1:], "--model", str(model_dir), "--media-dir", str(media), "--max-new-tokens", "16"]
    child = pexpect.spawn(CHAT[0], argv, encoding="utf-8", timeout=TIMEOUT, cwd=str(tmp_path))
    child.expect("/help for commands")
    child.expect_exact("you> ")
    child.sendline("/help")
    child.expect_exact("/reset  /save FILE  /help  /quit")
    child.expect_exact("you> ")
    child.sendline(f"/image {picture}")
    child.expect_exact("attached image")
    child.expect_exact("you> ")
    child.sendline("Describe the image.")
    child.expect_exact("assistant> ")
    child.expect_exact("you> ")
    child.sendline("Draw a large red circle at the top left.")
    child.expect(r"\[image saved to (\S+\.png)\]")
    drawn = child.match.group(1)
    child.expect_exact("you> ")
    child.sendline("Say: a red circle")
    child.expect(r"\[audio saved to (\S+\.wav)\]")
    spoken = child.match.group(1)
    child.expect_exact("you> ")
    child.sendline("/action [[0.1, 0.2], [0.1, 0.2]]")
    child.expect_exact("attached action")
    child.expect_exact("you> ")
    child.sendline("/set image.temperature=1.0")
    child.expect_exact("image.temperature = 1.0")
    child.expect_exact("you> ")
    child.sendline("/image /no/such/file.png")
    child.expect("error: .*file.png")  # a bad file is one error line; the chat goes on
    child.expect_exact("you> ")
    child.sendline("/save transcript.json")
    child.expect_exact("saved to transcript.json")
    child.expect_exact("you> ")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert read_image(drawn).shape == (64, 64, 3)
    assert read_audio(spoken)[0].size > 0
    transcript = json.loads((tmp_path / "transcript.json").read_text())["messages"]
    assert [m["role"] for m in transcript] == ["user", "assistant"] * 3
    assert transcript[0]["content"][0] == {"type": "image", "source": str(picture)}
    assert transcript[3]["content"][-1]["file"] == drawn


def test_chat_reads_piped_stdin_without_prompts(model_dir, picture, tmp_path):
    script = f"/image {picture}\nDescribe the image.\nDraw a blue star.\n/reset\n/save t.json\n"
    result = subprocess.run(
        [*CHAT, "--model", str(model_dir), "--media-dir", str(tmp_path / "m"), "--max-new-tokens", "8"],
        input=script, capture_output=True, text=True, cwd=tmp_path, timeout=TIMEOUT, check=True,
    )  # fmt: skip
    assert "you> " not in result.stdout and result.stdout.count("assistant> ") == 2
    assert "[image saved to" in result.stdout
    assert json.loads((tmp_path / "t.json").read_text()) == {"messages": []}  # /reset cleared it


def test_session_history_holds_generated_media_as_codes(toy_model, tmp_path):
    session = ChatSession(toy_model, tmp_path)
    reply = session.ask("Draw a red circle.")
    assert reply.modality == "image" and reply.finish_reason == "span"
    (image,) = [p for p in session.history[1]["content"] if p["type"] == "image"]
    assert image["codes"].shape == (64, 1)  # the next turn re-reads the drawn image
    follow = session.ask("Describe it.")
    assert follow.modality == "text"
    with pytest.raises(ConfigError, match="temperature must be >= 0"):
        session.set("temperature=-1")
    with pytest.raises(ConfigError, match="expected key=value"):
        session.set("temperature")


def _budget_leaving_layers_off_cpu(model: MMLLM) -> int:
    """A CPU budget under which accelerate keeps some decoder layers on the CPU and sends the
    rest to disk (it also reserves room for the largest layer, so the cut is found by trying)."""
    from accelerate import infer_auto_device_map, init_empty_weights

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    with init_empty_weights():  # what from_pretrained places: a model built with empty weights
        empty = MMLLM(model.config, model.layout)
    for fraction in (0.75, 0.85, 0.95):
        budget = int(fraction * weights)
        device_map = infer_auto_device_map(empty, max_memory={"cpu": budget}, no_split_module_classes=["DecoderLayer"])
        if set(device_map.values()) == {"cpu", "disk"}:
            return budget
    raise AssertionError("no budget splits the model between CPU and disk")


@pytest.mark.parametrize("tied", [False, True])
def test_device_map_with_disk_offload_gives_the_same_logits(text_tokenizer, tmp_path, tied):
    torch.manual_seed(0)
    overrides = [f"tie_word_embeddings={tied}", "num_hidden_layers=4"]
    config = ModelConfig.from_yaml(REPO / "configs" / "model" / "tiny.yaml", overrides)
    model = MMLLM.from_config(config, toy_vocab_layout(text_tokenizer), text_tokenizer, random_toy_tokenizers()).eval()
    model.save_pretrained(tmp_path / "model", max_shard_bytes=200_000)  # several shards, as a large model has
    ids = torch.randint(0, len(text_tokenizer), (2, 12))
    budget = {"cpu": _budget_leaving_layers_off_cpu(model)}
    with torch.no_grad():
        expected = model(ids).logits
        dispatched = MMLLM.from_pretrained(
            tmp_path / "model", device_map="auto", max_memory=budget, offload_folder=tmp_path / "offload"
        )
        assert "disk" in dispatched.hf_device_map.values() and "cpu" in dispatched.hf_device_map.values()
        assert torch.equal(dispatched(ids).logits, expected)
        cache = dispatched.new_kv_cache()
        steps = [dispatched(ids[:, :8], kv_cache=cache).logits, dispatched(ids[:, 8:], kv_cache=cache).logits]
        assert (torch.cat(steps, dim=1) - expected).abs().max() < 1e-5
    assert set(dispatched.modality_tokenizers) == {"image", "audio", "video", "action"}
    with pytest.raises(CheckpointError, match="leaves no module on a device"):
        MMLLM.from_pretrained(tmp_path / "model", device_map="auto", max_memory={"cpu": 1000}, offload_folder=tmp_path)
    with pytest.raises(CheckpointError, match="give an offload folder"):
        MMLLM.from_pretrained(tmp_path / "model", device_map="auto", max_memory=budget)
    assert np.isfinite(expected.numpy()).all()
