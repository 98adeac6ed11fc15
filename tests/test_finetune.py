"""Finetuning on the DeepSpeed loop (CPU): LoRA with trainable added rows, on 1 rank and on 2 ZeRO-3
ranks with tied embeddings; adapters that load with plain peft on our model and on its HF export;
merge-lora; resume; the full-finetune option; SFT labels; one-line errors. QLoRA needs CUDA."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmllm.data.interleaved import read_jsonl
from mmllm.data.pretokenize import pretokenize
from mmllm.errors import CheckpointError, ConfigError
from mmllm.model.config import ModelConfig
from mmllm.model.mmllm import MMLLM
from mmllm.model.weights import load_weights
from mmllm.training.launch import free_port

from .conftest import random_toy_tokenizers, toy_vocab_layout, write_yaml

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "ds_finetune_worker.py"
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
ZERO3 = str(REPO / "configs" / "deepspeed" / "zero3.json")
LOSS_TOLERANCE = 1e-5  # resume must reproduce the losses; float32 sums in another order differ by ~1e-7
LOGIT_TOLERANCE = 1e-5  # the bound for the same adapter on our model and on its HF export
VOCAB = ("model.embed_tokens.weight", "lm_head.weight")  # the matrices whose text rows must not move
RANK = 4  # LoRA rank of the test runs: small, but every adapter matrix is still a real low-rank pair
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # as the toy configs


# ---------------------------------------------------------------- data, base models, runs


def save_base(path: Path, text_tokenizer, tied: bool) -> Path:
    """A random tiny native checkpoint on the toy layout, with random tiny modality tokenizers."""
    torch.manual_seed(0)
    config = ModelConfig.from_yaml(
        REPO / "configs" / "model" / "tiny.yaml", [f"tie_word_embeddings={str(tied).lower()}"]
    )
    layout = toy_vocab_layout(text_tokenizer)
    MMLLM.from_config(config, layout, text_tokenizer, random_toy_tokenizers()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ft_data(tmp_path_factory, text_tokenizer_dir):
    """Two base checkpoints (untied, tied) and SFT shards of toy-world chat tasks."""
    from mmllm.data.toy_tasks import TASKS, write_toyworld
    from mmllm.text_tokenizer import load_text_tokenizer

    root = tmp_path_factory.mktemp("finetune")
    text_tokenizer = load_text_tokenizer(text_tokenizer_dir)
    save_base(root / "base", text_tokenizer, tied=False)
    save_base(root / "base_tied", text_tokenizer, tied=True)
    chats = [task for task in TASKS if task != "toy-interleaved"]  # that one is a document, not a conversation
    world = write_toyworld(root / "world", 3, seed=0, tasks=chats)  # 33 conversations, repeated as the runs need
    report = pretokenize(read_jsonl(world["path"]), Path(world["path"]).parent, root / "base", root / "shards")
    assert report.skipped == 0
    return root


def write_config(path: Path, data: Path, **overrides) -> Path:
    config = {
        "finetune": {
            "base_model": str(data / "base"),
            "method": "lora",
            "lora": {"r": RANK, "alpha": 2 * RANK, "dropout": 0.05, "target_modules": TARGETS},
        },
        "out": str(path.parent / "run"),
        "data": {"sources": [{"path": str(data / "shards")}], "packing": {"seq_len": 512}},  # a few chats a row
        # A high rate and no decay, so 4 steps of a random base visibly lower the loss.
        "optim": {"lr": 1e-2, "warmup_steps": 1, "weight_decay": 0.0},
        "steps": 4,
        "micro_batch_size": 4,
        "log_every": 100,
        "threads": 1,
    }
    return write_yaml(path, config, overrides)


def run(command: list[str], ranks: int) -> str:
    """`command` under the deepspeed launcher on `ranks` CPU ranks; returns its output."""
    launcher = [str(DEEPSPEED), "--num_gpus", str(ranks), "--master_port", str(free_port())]
    # PYTHONFAULTHANDLER: a rank that dies of a signal prints every thread's Python stack.
    environment = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    if not torch.cuda.is_available():
        environment.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")  # one thread per CPU rank
    process = subprocess.run(
        launcher + command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300
    )
    output = process.stdout.decode(errors="replace")
    assert process.returncode == 0, output[-3000:]
    return output


def launch(ranks: int, config: Path, ds_config: str | None, out: Path, *extra: str) -> dict:
    run([str(WORKER), str(config), ds_config or "-", str(out), *extra], ranks)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def lora_run(ft_data):
    """One rank, ZeRO-0, untied base; checkpoints at steps 2 and 4."""
    config = write_config(ft_data / "lora" / "c.yaml", ft_data, save_every=2)
    return config, launch(1, config, None, ft_data / "lora.json")


@pytest.fixture(scope="module")
def zero3_tied_run(ft_data):
    """Two ZeRO-3 ranks, tied base, the same global batch as `lora_run`."""
    overrides = {"finetune.base_model": str(ft_data / "base_tied"), "micro_batch_size": 2}
    config = write_config(ft_data / "zero3" / "c.yaml", ft_data, **overrides)
    return config, launch(2, config, ZERO3, ft_data / "zero3.json")


def digest(tensors) -> str:
    sha = hashlib.sha256()
    for tensor in tensors:
        sha.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
    return sha.hexdigest()


def added_mask(model_dir: Path) -> torch.Tensor:
    from mmllm.training.finetune import added_rows
    from mmllm.vocab import VocabLayout

    layout = VocabLayout.load(model_dir / "vocab_layout.json")
    mask = torch.zeros(layout.padded_size, dtype=torch.bool)
    mask[added_rows(layout)] = True
    return mask


def vocab_matrices(weights: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [weights.get(name, weights["model.embed_tokens.weight"]) for name in VOCAB]  # tied: one tensor


def probe_ids(model_dir: Path) -> torch.Tensor:
    """Text ids and added ids (specials, modality codes), so both kinds of rows are exercised."""
    from mmllm.vocab import VocabLayout

    layout = VocabLayout.load(model_dir / "vocab_layout.json")
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(0, layout.text_size, (2, 12), generator=generator)
    added = torch.randint(layout.base_rows, layout.total_size, (2, 12), generator=generator)
    return torch.cat([text, added], dim=1)


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model.eval()(input_ids=ids).logits


# ---------------------------------------------------------------- LoRA


def test_lora_keeps_text_rows_bit_identical_and_trains_added_rows(ft_data, lora_run, tmp_path):
    from mmllm.training.finetune import merge_lora

    config, result = lora_run
    run_dir = config.parent / "run"
    losses = result["losses"]
    assert losses["4"] < losses["1"]  # it learns
    base = load_weights(ft_data / "base")
    merged = load_weights(merge_lora(ft_data / "base", run_dir / "adapter", tmp_path / "merged"))
    added = added_mask(ft_data / "base")
    for before, after in zip(vocab_matrices(base), vocab_matrices(merged), strict=True):
        assert torch.equal(before[~added], after[~added])  # text rows (and unused padding) untouched
        assert not torch.equal(before[added], after[added])  # the added rows trained
    for name, tensor in base.items():
        if name not in VOCAB:  # the adapted projections moved, the norms did not
            assert torch.equal(tensor, merged[name]) is not any(f".{t}." in name for t in TARGETS), name
    # The engine computed with exactly the base's text rows, too.
    assert result["ranks"][0]["text_rows"] == digest(w[~added] for w in vocab_matrices(base))


def test_lora_checkpoints_hold_the_adapter_and_the_base_path(ft_data, lora_run):
    from safetensors import safe_open

    config, result = lora_run
    run_dir = config.parent / "run"
    assert Path(result["model_dir"]) == run_dir / "adapter" and not (run_dir / "model").exists()
    for adapter in (run_dir / "adapter", run_dir / "checkpoints" / "step-000002" / "adapter"):
        settings = json.loads((adapter / "adapter_config.json").read_text())
        assert settings["base_model_name_or_path"] == str((ft_data / "base").resolve())
        assert (adapter / "vocab_layout.json").is_file()
        with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
            keys = set(f.keys())
        assert {k for k in keys if "trainable_tokens_delta" in k} == {
            "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta",
            "base_model.model.lm_head.token_adapter.trainable_tokens_delta",
        }
        assert not any("base_layer" in k or k.endswith("embed_tokens.weight") for k in keys)  # no whole matrices
    assert not (run_dir / "checkpoints" / "step-000002" / "model").exists()


@pytest.mark.parametrize("tied,rows", [(False, "added"), (True, "added"), (False, "none")])
def test_trainable_parameter_count_is_what_the_config_implies(ft_data, tmp_path, tied, rows):
    from mmllm.training.finetune import finetune_hooks, load_finetune_config
    from mmllm.training.loop import initial_model

    base = ft_data / ("base_tied" if tied else "base")
    overrides = {"finetune.base_model": str(base), "finetune.lora.trainable_token_rows": rows}
    config = load_finetune_config(write_config(tmp_path / "c.yaml", ft_data, **overrides))
    model = initial_model(config, finetune_hooks(config.finetune))
    c = model.config
    q, kv, h, i = (
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
        c.hidden_size,
        c.intermediate_size,
    )
    per_layer = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h)  # in + out of the 7 projections
    expected = RANK * per_layer * c.num_hidden_layers
    if rows == "added":
        layout = model.layout
        expected += (layout.total_size - layout.base_rows) * h * (1 if tied else 2)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected
    assert not any(p.requires_grad for name, p in model.named_parameters() if "base_layer" in name)


def test_two_zero3_ranks_with_tied_embeddings_train_only_adapters_and_added_rows(ft_data, zero3_tied_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mmllm.training.finetune import load_adapter, merge_lora

    config, result = zero3_tied_run
    losses = result["losses"]
    assert len(losses) == 4 and losses["4"] < losses["1"]  # it learns
    first, second = result["ranks"]
    assert first == second  # both ranks hold the same parameters
    base_dir, adapter = ft_data / "base_tied", config.parent / "run" / "adapter"
    base = load_weights(base_dir)
    assert "lm_head.weight" not in base  # tied: one tensor
    added = added_mask(base_dir)
    assert first["text_rows"] == digest(w[~added] for w in vocab_matrices(base))  # bit-identical on every rank
    assert first["added_rows"] != digest(w[added] for w in vocab_matrices(base))
    merged = merge_lora(base_dir, adapter, tmp_path / "merged")
    weights = load_weights(merged)
    assert "lm_head.weight" not in weights  # still tied
    assert torch.equal(weights["model.embed_tokens.weight"][~added], base["model.embed_tokens.weight"][~added])
    # The head reads the trained rows too, here as in transformers' tied Llama with the same adapter.
    ids = probe_ids(base_dir)
    wrapped = logits(load_adapter(MMLLM.from_pretrained(base_dir), adapter), ids)
    MMLLM.from_pretrained(base_dir).export_hf(tmp_path / "hf")
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), str(adapter))
    torch.testing.assert_close(wrapped, logits(theirs, ids), atol=LOGIT_TOLERANCE, rtol=0)
    torch.testing.assert_close(wrapped, logits(MMLLM.from_pretrained(merged), ids), atol=LOGIT_TOLERANCE, rtol=0)


def test_adapter_loads_with_plain_peft_on_our_model_and_on_the_hf_export(ft_data, lora_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config, _ = lora_run
    adapter = config.parent / "run" / "adapter"
    base_dir = ft_data / "base"
    ids = probe_ids(base_dir)
    ours = PeftModel.from_pretrained(MMLLM.from_pretrained(base_dir), str(adapter))
    MMLLM.from_pretrained(base_dir).export_hf(tmp_path / "hf")
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), str(adapter))
    adapted = logits(ours, ids)
    torch.testing.assert_close(adapted, logits(theirs, ids), atol=LOGIT_TOLERANCE, rtol=0)
    assert not torch.allclose(adapted, logits(MMLLM.from_pretrained(base_dir), ids), atol=1e-3)  # it changed


def test_merge_lora_writes_a_self_contained_checkpoint_with_the_adapted_logits(ft_data, lora_run, tmp_path):
    from mmllm.cli import main
    from mmllm.training.finetune import load_adapter

    config, _ = lora_run
    adapter, base_dir, out = config.parent / "run" / "adapter", ft_data / "base", tmp_path / "merged"
    assert main(["merge-lora", "--model", str(base_dir), "--adapter", str(adapter), "--out", str(out)]) == 0
    for part in ("config.json", "model.safetensors", "vocab_layout.json", "text_tokenizer", "tokenizers"):
        assert (out / part).exists(), part
    merged = MMLLM.from_pretrained(out)
    assert sorted(merged.modality_tokenizers) == sorted(MMLLM.from_pretrained(base_dir).modality_tokenizers)
    ids = probe_ids(base_dir)
    wrapped = load_adapter(MMLLM.from_pretrained(base_dir), adapter)
    torch.testing.assert_close(logits(merged, ids), logits(wrapped, ids), atol=LOGIT_TOLERANCE, rtol=0)


def test_resume_continues_a_lora_run_exactly(ft_data, lora_run, tmp_path):
    config_path, straight = lora_run
    config = write_config(tmp_path / "c.yaml", ft_data)
    checkpoints = tmp_path / "run" / "checkpoints"
    shutil.copytree(config_path.parent / "run" / "checkpoints" / "step-000002", checkpoints / "step-000002")
    (checkpoints / "latest").write_text("step-000002\n")
    resumed = launch(1, config, None, tmp_path / "r.json", "--resume")
    assert sorted(resumed["losses"], key=int) == ["3", "4"]
    diffs = [abs(resumed["losses"][s] - straight["losses"][s]) for s in resumed["losses"]]
    assert max(diffs) < LOSS_TOLERANCE, diffs
    assert resumed["ranks"] == straight["ranks"]  # the same weights at the end


# ---------------------------------------------------------------- full finetuning, data, errors


def test_full_finetune_through_the_script_saves_the_whole_model(ft_data, tmp_path):
    config = write_config(tmp_path / "c.yaml", ft_data, steps=2, **{"finetune.method": "full", "optim.lr": 1e-3})
    output = run([str(REPO / "train" / "finetune.py"), "--config", str(config)], 1)
    assert "finetuned 2 steps" in output
    model_dir = tmp_path / "run" / "model"
    assert not (tmp_path / "run" / "adapter").exists()
    weights, base = load_weights(model_dir), load_weights(ft_data / "base")
    assert set(weights) == set(base)
    assert all(not torch.equal(weights[name], base[name]) for name in base)  # all of it trains
    assert MMLLM.from_pretrained(model_dir).modality_tokenizers.keys() == {"image", "audio", "video", "action"}


def test_sft_rows_have_labels_on_assistant_turns_only(ft_data, tmp_path):
    from mmllm.training.finetune import load_finetune_config
    from mmllm.training.loop import RowStream
    from mmllm.vocab import END_OF_TURN

    config = load_finetune_config(write_config(tmp_path / "c.yaml", ft_data, **{"data.packing.condition_dropout": 0.0}))
    model = MMLLM.from_pretrained(config.finetune.base_model)
    layout = model.layout
    roles = {layout.role_id(role): role for role in ("system", "user", "assistant")}
    end_of_turn = layout.token_id(END_OF_TURN)
    for row in RowStream(config, model).take(4):
        expected, assistant, document = [], False, -1
        real = slice(0, row.real_tokens)
        for token, document_id in zip(row.input_ids[real].tolist(), row.document_ids[real].tolist(), strict=True):
            if document_id != document:  # a conversation starts: no turn is open
                assistant, document = False, document_id
            if token in roles:
                assistant = roles[token] == "assistant"
                expected.append(False)  # a role token is never a target
                continue
            expected.append(assistant)
            assistant = assistant and token != end_of_turn  # <|end_of_turn|> is the last target of a turn
        targets = (row.labels[: row.real_tokens] != -100).tolist()
        assert targets == expected and any(targets) and not all(targets)


def test_bad_inputs_give_one_line_errors(ft_data, lora_run, tmp_path):
    from mmllm.training.finetune import finetune_hooks, load_finetune_config, merge_lora
    from mmllm.training.loop import initial_model
    from mmllm.vocab import ModalityRange, VocabLayout

    def one_line(error_type, match, call, *args):
        with pytest.raises(error_type, match=match) as caught:
            call(*args)
        assert "\n" not in str(caught.value)

    config_path = write_config(tmp_path / "c.yaml", ft_data)
    nowhere = [f"finetune.base_model={tmp_path / 'nowhere'}"]
    one_line(ConfigError, "base_model .*nowhere: no such checkpoint dir", load_finetune_config, config_path, nowhere)
    typo = load_finetune_config(config_path, ["finetune.lora.target_modules=[q_proj, qproj]"])
    one_line(
        ConfigError, "'qproj' matches no Linear layer .*q_proj", initial_model, typo, finetune_hooks(typo.finetune)
    )
    head = load_finetune_config(config_path, ["finetune.lora.target_modules=[lm_head]"])
    one_line(ConfigError, "'lm_head' would change the text rows", initial_model, head, finetune_hooks(head.finetune))
    one_line(ConfigError, "`stages` need method full", load_finetune_config, config_path, ["stages=[{train: all}]"])
    if not torch.cuda.is_available():
        one_line(ConfigError, "qlora needs CUDA", load_finetune_config, config_path, ["finetune.method=qlora"])

    adapter = lora_run[0].parent / "run" / "adapter"
    one_line(CheckpointError, "checkpoint dir not found", merge_lora, tmp_path / "nowhere", adapter, tmp_path / "m")
    one_line(CheckpointError, "no adapter_config.json", merge_lora, ft_data / "base", tmp_path, tmp_path / "m")
    # An adapter of another base: other widths, or the same widths on another vocabulary layout.
    wide = tmp_path / "wide"
    torch.manual_seed(0)
    model_config = ModelConfig.from_yaml(REPO / "configs" / "model" / "tiny.yaml", ["hidden_size=32"])
    base = MMLLM.from_pretrained(ft_data / "base")
    MMLLM.from_config(model_config, base.layout, base.text_tokenizer).save_pretrained(wide)
    one_line(CheckpointError, "does not fit this base model .*size mismatch", merge_lora, wide, adapter, tmp_path / "m")
    relabelled = tmp_path / "relabelled"
    shutil.copytree(adapter, relabelled)
    VocabLayout.build(base.layout.text_size, [ModalityRange("image", 1800, grid=(2, 2))]).save(
        relabelled / "vocab_layout.json"
    )
    one_line(CheckpointError, "another vocab layout", merge_lora, ft_data / "base", relabelled, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    # The script on its own: one `error:` line and status 2, before any rank starts.
    script = [sys.executable, str(REPO / "train" / "finetune.py"), "--config", str(config_path), *nowhere]
    failed = subprocess.run(script, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2 and failed.stderr.strip().splitlines()[-1].startswith("error: finetune config: base")


def test_shipped_finetune_configs_parse(ft_data):
    from mmllm.config import load_config
    from mmllm.training.finetune import FinetuneRunConfig, load_finetune_config

    lora = load_config(FinetuneRunConfig, REPO / "configs" / "finetune" / "toy_lora.yaml")
    settings = lora.finetune.lora
    assert lora.finetune.method == "lora" and (settings.r, settings.alpha, settings.dropout) == (16, 32, 0.05)
    assert list(settings.target_modules) == TARGETS and settings.trainable_token_rows == "added"
    full = load_config(FinetuneRunConfig, REPO / "configs" / "finetune" / "toy_full.yaml")
    assert full.finetune.method == "full"
    # The placeholder paths are overridable, as the configs' headers say.
    local = [f"finetune.base_model={ft_data / 'base'}", f"data.sources=[{{path: {ft_data / 'shards'}}}]"]
    assert load_finetune_config(REPO / "configs" / "finetune" / "toy_lora.yaml", local).model == str(ft_data / "base")


@pytest.mark.gpu
def test_qlora_trains_a_lora_adapter_on_a_4bit_base(ft_data, tmp_path):
    pytest.importorskip("bitsandbytes")
    from safetensors import safe_open

    from mmllm.training.finetune import merge_lora

    config = write_config(tmp_path / "c.yaml", ft_data, **{"finetune.method": "qlora"})
    result = launch(1, config, None, tmp_path / "r.json")
    assert result["losses"]["4"] < result["losses"]["1"]
    with safe_open(tmp_path / "run" / "adapter" / "adapter_model.safetensors", "pt") as f:
        names = list(f.keys())
    assert any("lora_A" in name for name in names)
    merged = merge_lora(ft_data / "base", tmp_path / "run" / "adapter", tmp_path / "merged")
    assert MMLLM.from_pretrained(merged).layout is not None
