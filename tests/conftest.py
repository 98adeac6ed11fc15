"""Shared fixtures: a small trained text tokenizer, layouts built on it, tiny HF models.

Tests marked `gpu` need CUDA; on machines without it they are deselected (not skipped), and
`make test-gpu` runs them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    selected = [item for item in items if "gpu" not in item.keywords]
    deselected = [item for item in items if "gpu" in item.keywords]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected


@pytest.fixture(scope="session")
def caption_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mmllm.data.toyworld import caption_corpus

    path = tmp_path_factory.mktemp("corpus") / "captions.txt"
    path.write_text("\n".join(caption_corpus(2000, seed=0)) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def text_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, caption_file: Path) -> Path:
    from mmllm.text_tokenizer import train_text_tokenizer

    out = tmp_path_factory.mktemp("text_tokenizer")
    train_text_tokenizer([caption_file], out, vocab_size=320)
    return out


@pytest.fixture()
def text_tokenizer(text_tokenizer_dir: Path):
    from mmllm.text_tokenizer import load_text_tokenizer

    return load_text_tokenizer(text_tokenizer_dir)


@pytest.fixture()
def toy_layout(text_tokenizer):
    """Image grid, ragged two-level audio, delay-pattern video and first-k speech: every structure."""
    from mmllm.text_tokenizer import fingerprint
    from mmllm.vocab import ModalityRange, VocabLayout

    return VocabLayout.build(
        len(text_tokenizer),
        [
            ModalityRange("image", 32, grid=(2, 2)),
            ModalityRange("audio", 16, levels=2, max_frames=6),
            ModalityRange("video", 8, levels=3, grid=(2,), flattening="delay"),
            ModalityRange("speech", 8, levels=4, flattening="first_k", first_k=2, max_frames=5),
        ],
        text_tokenizer_fingerprint=fingerprint(text_tokenizer),
    )


@pytest.fixture()
def tiny_config():
    from mmllm.model.config import ModelConfig

    return ModelConfig.from_yaml(REPO / "configs" / "model" / "tiny.yaml", ["vocab_size=256"])


def save_tiny_hf(path: Path, family: str = "Llama", vocab_size: int = 128, tokenizer=None, **overrides) -> Path:
    """A tiny random HF `family` model saved at `path`, with the tokenizer's files when given."""
    import transformers

    config = getattr(transformers, f"{family}Config")(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **overrides,
    )
    torch.manual_seed(0)
    getattr(transformers, f"{family}ForCausalLM")(config).save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def random_toy_tokenizers() -> dict:
    """Random tiny modality tokenizers whose codes fit configs/vocab/toy.yaml's ranges."""
    from mmllm.tokenizers import load_tokenizer

    return {
        "image": load_tokenizer("image-conv", channels=[8], strides=[8]),
        "audio": load_tokenizer("audio-codec", channels=[8, 8, 16]),
        "video": load_tokenizer("video-causal3d", channels=[8, 8, 16], strides=[2, 2, 2]),
        "action": load_tokenizer("action-bins"),
    }


def toy_vocab_layout(text_tokenizer):
    """The layout of configs/vocab/toy.yaml on `text_tokenizer`."""
    from mmllm.config import load_config
    from mmllm.text_tokenizer import fingerprint
    from mmllm.vocab import VocabLayout, VocabSpec

    spec = load_config(VocabSpec, REPO / "configs" / "vocab" / "toy.yaml")
    return VocabLayout.build(
        len(text_tokenizer), spec.modality_ranges(), text_tokenizer_fingerprint=fingerprint(text_tokenizer)
    )


@pytest.fixture()
def toy_model(text_tokenizer):
    """A random tiny MMLLM on the toy layout with random tiny tokenizers. Its init std is large so
    greedy choices are decisive (no near-ties that float reordering could flip)."""
    from mmllm.model.config import ModelConfig
    from mmllm.model.mmllm import MMLLM

    torch.manual_seed(0)
    config = ModelConfig.from_yaml(REPO / "configs" / "model" / "tiny.yaml", ["initializer_range=0.3"])
    layout = toy_vocab_layout(text_tokenizer)
    return MMLLM.from_config(config, layout, text_tokenizer, random_toy_tokenizers()).eval()


def write_yaml(path: Path, config: dict, overrides: dict) -> Path:
    """`config` with dotted-key `overrides` (`optim.lr=...`) applied, written as YAML to `path`."""
    import yaml

    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def process_group():
    """The one-process group of every in-process training run of the session, ended with it:
    DeepSpeed keeps its own handle on the first group a process makes, so runs must share it."""
    from mmllm.training.loop import shutdown_distributed

    yield
    shutdown_distributed()


@pytest.fixture(scope="module")
def one_rank(process_group):
    """The environment of a one-rank run in this process, restored after the module."""
    from mmllm.training.launch import free_port

    environment = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    if not torch.cuda.is_available():
        environment["DS_ACCELERATOR"] = "cpu"  # what setup_distributed would set, restored here
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {**environment, "MASTER_PORT": str(free_port())}.items():
            patch.setenv(key, value)
        yield
    torch.set_num_threads(threads)  # a run sets its config's thread count
