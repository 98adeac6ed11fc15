"""The `mmllm` command (also `python -m mmllm`).

    mmllm vocab train-text   train a SentencePiece text tokenizer (saved as a HF tokenizer dir)
    mmllm vocab build        build vocab_layout.json from a text tokenizer and modality ranges
    mmllm vocab show         print a layout's ranges
    mmllm convert            import a HF Llama/Qwen2/Mistral/Qwen3 dir, or export to one
    mmllm toyworld           write the toy world: task JSONL plus media files
    mmllm tokenizer train    train or fit a modality tokenizer from a YAML config
    mmllm tokenizer evaluate score a tokenizer's round trip (quality, usage, oracle agreement)
    mmllm pretokenize        records -> Arrow shards of token ids (offline, sharded, resumable)
    mmllm pretrain           the DeepSpeed pretraining loop (also `deepspeed train/pretrain.py`)
    mmllm finetune           LoRA, full or QLoRA finetuning on the same loop (also `deepspeed train/finetune.py`)
    mmllm merge-lora         merge a LoRA adapter into a self-contained checkpoint
    mmllm latent-train       a reasoning method on the toy puzzles: Coconut's curriculum stage by stage, or a baseline
    mmllm bench model        our backbone against transformers' Llama, forward + backward
    mmllm bench train        our training loop against transformers' Trainer and a raw torch loop
    mmllm bench tokenizers   train, score and time the toy tokenizers
    mmllm bench generate     decode tokens/s against transformers' generate; batched vs sequential CFG
    mmllm bench learnability toy-task scores against minutes of CPU pretraining
    mmllm bench serve        requests/s of `mmllm serve`, concurrent vs one at a time
    mmllm bench reducers     visual-token reducers: prefill time, FLOPs, KV memory, accuracy vs none
    mmllm generate           a reply (text and media files) to one prompt
    mmllm chat               a multi-turn chat in the terminal, media in and out
    mmllm serve              an OpenAI-compatible HTTP API (chat, completions, images, speech, transcription)
    mmllm eval               score a model on registered tasks -> results.json
    mmllm demo               the end-to-end pipeline on the embedded toy world

Handlers parse arguments and call into the library. A user error (`MMLLMError`) prints one
`error: ...` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from mmllm.errors import MMLLMError

logger = logging.getLogger("mmllm")

DTYPES = ("float32", "bfloat16", "float16")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = ["mmllm", *(sys.argv[1:] if argv is None else argv)]  # recorded by eval for provenance
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        return args.handler(args) or 0
    except MMLLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmllm", description="Any-to-any multimodal LLMs: train, chat, serve, eval.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    vocab = commands.add_parser("vocab", help="text tokenizer and vocabulary layout")
    vocab_commands = vocab.add_subparsers(dest="vocab_command", required=True, metavar="SUBCOMMAND")
    train_text = vocab_commands.add_parser("train-text", help="train a SentencePiece text tokenizer")
    train_text.add_argument("--input", nargs="+", required=True, help="text files, one sentence per line")
    train_text.add_argument("--vocab-size", type=int, default=1000)
    train_text.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    train_text.add_argument("--no-byte-fallback", action="store_true", help="map unseen characters to <unk>")
    train_text.add_argument("--out", required=True, help="output tokenizer dir")
    train_text.set_defaults(handler=cmd_vocab_train_text)

    build = vocab_commands.add_parser("build", help="build vocab_layout.json")
    build.add_argument("--text-tokenizer", required=True, help="local HF tokenizer dir")
    build.add_argument(
        "--modality",
        action="append",
        default=[],
        metavar="NAME=N[:key=value...]",
        help="a modality range, e.g. image=1024 or audio=1024:levels=4:flattening=delay:grid=50; "
        "comma-separate several. Keys: grid (AxB), levels, flattening (frame_major, first_k, delay), "
        "first_k, max_frames. image/video/audio/action default to the toy world's structure.",
    )
    build.add_argument("--config", help="YAML with modalities and reserved-slot counts (configs/vocab/)")
    build.add_argument(
        "--base-rows",
        type=int,
        help="embedding rows of the pretrained model (default: vocab_size of a config.json beside the tokenizer)",
    )
    build.add_argument("--registers", type=int, help="register token slots (default 16)")
    build.add_argument("--pause", type=int, help="pause token slots (default 4)")
    build.add_argument("--spare", type=int, help="spare special slots (default 32)")
    build.add_argument(
        "--tokenizer",
        action="append",
        default=[],
        metavar="MODALITY=DIR",
        help="a trained modality tokenizer to put in the bundle (tokenizers/MODALITY/ beside the layout); "
        "checked against its range; repeatable",
    )
    build.add_argument(
        "--out", required=True, help="path of vocab_layout.json (the text tokenizer is copied beside it)"
    )
    build.set_defaults(handler=cmd_vocab_build)

    show = vocab_commands.add_parser("show", help="print a layout's ranges")
    show.add_argument("layout", help="vocab_layout.json or a dir holding it")
    show.set_defaults(handler=cmd_vocab_show)

    convert = commands.add_parser("convert", help="import from or export to Hugging Face format")
    direction = convert.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-hf", metavar="SRC", help="local HF Llama/Qwen2/Mistral/Qwen3 dir")
    direction.add_argument("--to-hf", metavar="SRC", help="native mmllm checkpoint dir")
    convert.add_argument("--out", required=True, help="output dir")
    convert.add_argument("--layout", help="with --from-hf: extend the vocabulary to this vocab_layout.json")
    convert.add_argument("--text-tokenizer", help="with --from-hf: tokenizer dir, if SRC has none")
    convert.add_argument("--dtype", choices=DTYPES, help="cast the weights (default: keep)")
    convert.set_defaults(handler=cmd_convert)

    toyworld = commands.add_parser("toyworld", help="write the toy world (task JSONL + media)")
    toyworld.add_argument("--out", required=True, help="output dir")
    toyworld.add_argument("--n", type=int, default=500, help="items per task")
    toyworld.add_argument("--seed", type=int, default=0)
    toyworld.add_argument("--tasks", help="comma-separated task ids (default: all)")
    toyworld.add_argument("--split", default="train", help="split name; each split draws from its own seed")
    toyworld.set_defaults(handler=cmd_toyworld)

    tokenizer = commands.add_parser("tokenizer", help="train and evaluate modality tokenizers")
    tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True, metavar="SUBCOMMAND")
    tok_train = tokenizer_commands.add_parser("train", help="train or fit a tokenizer from a config")
    tok_train.add_argument("--config", required=True, help="configs/tokenizer/*.yaml")
    tok_train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. out=runs/img")
    tok_train.set_defaults(handler=cmd_tokenizer_train)
    tok_eval = tokenizer_commands.add_parser("evaluate", help="score a tokenizer's round trip")
    tok_eval.add_argument("--tokenizer", required=True, help="a saved tokenizer dir")
    tok_eval.add_argument("--data", default="toyworld", help="'toyworld' (held-out items) or a folder of media")
    tok_eval.add_argument("--n", type=int, default=500, help="items to score")
    tok_eval.add_argument("--batch-size", type=int, default=32)
    tok_eval.add_argument("--out", help="also write the report as JSON")
    tok_eval.set_defaults(handler=cmd_tokenizer_evaluate)

    pretok = commands.add_parser("pretokenize", help="records -> Arrow shards of token ids")
    pretok.add_argument("--data", required=True, help="a JSONL file, dataset dir, parquet, tar shards, ...")
    pretok.add_argument("--format", help="the source's format (default: detected)")
    pretok.add_argument("--model-or-layout", required=True, help="a checkpoint or tokenizer bundle dir")
    pretok.add_argument("--out", required=True, help="shard dir")
    pretok.add_argument("--num-proc", type=int, default=1, help="worker processes")
    pretok.add_argument("--shard", help="i/N: this job's share (default: RANK/WORLD_SIZE, else 0/1)")
    pretok.add_argument("--chunk-size", type=int, default=256, help="records per written chunk")
    pretok.add_argument("--task", help="task name for records whose source has none")
    pretok.set_defaults(handler=cmd_pretokenize)

    pretrain = commands.add_parser("pretrain", help="pretrain with DeepSpeed (any number of ranks)")
    add_training_arguments(pretrain)
    pretrain.set_defaults(handler=cmd_pretrain)

    finetune = commands.add_parser("finetune", help="LoRA / full / QLoRA finetuning on the DeepSpeed loop")
    add_training_arguments(finetune, "configs/finetune/*.yaml")
    finetune.set_defaults(handler=cmd_finetune)

    merge = commands.add_parser("merge-lora", help="merge a LoRA adapter into a self-contained checkpoint")
    merge.add_argument("--model", required=True, help="the base checkpoint dir the adapter was trained on")
    merge.add_argument("--adapter", required=True, help="a peft LoRA adapter dir (OUT/adapter of a finetuning run)")
    merge.add_argument("--out", required=True, help="the merged, self-contained checkpoint dir")
    merge.set_defaults(handler=cmd_merge_lora)

    latent = commands.add_parser(
        "latent-train", help="train a reasoning method on the toy puzzles: Coconut's curriculum, or a baseline"
    )
    latent.add_argument(
        "--config", required=True, help="configs/finetune/toy_{coconut,colar,mirage,assorted,cot,nocot,pause}.yaml"
    )
    latent.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. run.finetune.base_model=DIR"
    )
    latent.set_defaults(handler=cmd_latent_train)

    bench = commands.add_parser("bench", help="benchmarks against named baselines")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    bench_model = bench_commands.add_parser("model", help="backbone vs transformers' Llama, forward+backward on CPU")
    bench_model.add_argument("--config", default="configs/model/toy.yaml", help="model config YAML")
    bench_model.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    bench_model.add_argument("--batch", type=int, default=8)
    bench_model.add_argument("--seq", type=int, default=512)
    bench_model.add_argument("--repeats", type=int, default=5, help="interleaved timed repeats per model")
    bench_model.add_argument("--warmup", type=int, default=1)
    bench_model.add_argument("--out", help="also write the result as JSON")
    bench_model.set_defaults(handler=cmd_bench_model)
    bench_train = bench_commands.add_parser(
        "train", help="useful tokens/s: our loop vs transformers' Trainer (padded, length-grouped) and a raw loop"
    )
    bench_train.add_argument("--model", help="model config YAML (default: configs/model/toy.yaml)")
    bench_train.add_argument(
        "--steps",
        type=int,
        default=200,
        help="timed optimizer steps per contender (default 200: from there HF groups lengths as in a long run)",
    )
    bench_train.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones (default 3)")
    bench_train.add_argument("--seq-len", type=int, help="packed row length (default: configs/pretrain/toy.yaml's)")
    bench_train.add_argument("--batch", type=int, help="packed rows per step (default: configs/pretrain/toy.yaml's)")
    bench_train.add_argument("--data", help="pretokenized shard dir (default: a toy world built in a temp dir)")
    bench_train.add_argument("--vocab", help="with --data: the tokenizer bundle the shards were written with")
    bench_train.add_argument("--threads", type=int, help="torch threads of every contender (default: the toy run's)")
    bench_train.add_argument("--toy-items", type=int, help="without --data: items per toy task (default 40)")
    bench_train.add_argument("--only", help="comma-separated contenders: mmllm,hf-padded,hf-grouped,raw")
    bench_train.add_argument(
        "--precision", default="fp32", help="every contender's: fp32 (default) or bf16-mixed (bf16 autocast)"
    )
    bench_train.add_argument("--out", help="also write the result as JSON")
    bench_train.set_defaults(handler=cmd_bench_train)
    bench_tok = bench_commands.add_parser("tokenizers", help="train, score and time the toy tokenizers on CPU")
    bench_tok.add_argument("--only", help="comma-separated: image,video,speech,image-1d,action-bins,...")
    bench_tok.add_argument(
        "--trained", help="reuse tokenizers saved by an earlier run (DIR/<name>) instead of training"
    )
    bench_tok.add_argument("--save", help="save the trained tokenizers under DIR/<name>")
    bench_tok.add_argument("--n", type=int, default=500, help="held-out items per tokenizer")
    bench_tok.add_argument("--repeats", type=int, default=5, help="interleaved timed repeats of encode/decode")
    bench_tok.add_argument("--out", help="also write the rows as JSON")
    bench_tok.set_defaults(handler=cmd_bench_tokenizers)

    bench_gen = bench_commands.add_parser(
        "generate", help="decode tokens/s vs transformers' generate (batch 1 and 8); batched vs sequential CFG"
    )
    bench_gen.add_argument("--model", required=True, help="checkpoint dir (e.g. demo_out/model)")
    bench_gen.add_argument("--tokens", type=int, default=128, help="new tokens per row (default 128)")
    bench_gen.add_argument("--batches", default="1,8", help="batch sizes (default 1,8)")
    bench_gen.add_argument("--repeats", type=int, default=5, help="interleaved timed repeats (default 5)")
    bench_gen.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    bench_gen.add_argument("--out", help="also write the result as JSON")
    bench_gen.set_defaults(handler=cmd_bench_generate)

    bench_learn = bench_commands.add_parser(
        "learnability", help="toy-task scores vs minutes of 2-rank CPU pretraining (the demo at full scale)"
    )
    bench_learn.add_argument("--out", required=True, help="work dir (world, tokenizers, shards, checkpoints, evals)")
    bench_learn.add_argument("--steps", type=int, default=400, help="pretraining steps (default 400)")
    bench_learn.add_argument("--save-every", type=int, default=100, help="steps between evaluated checkpoints")
    bench_learn.add_argument("--eval-items", type=int, default=100, help="held-out items per task per checkpoint")
    bench_learn.add_argument("--seed", type=int, default=0)
    bench_learn.add_argument("--fast", action="store_true", help="the demo's --fast data and model (a quick check)")
    bench_learn.set_defaults(handler=cmd_bench_learnability)

    bench_serve = bench_commands.add_parser(
        "serve", help="requests/s of `mmllm serve`: concurrent (batched) vs one at a time, same replies"
    )
    bench_serve.add_argument("--model", required=True, help="checkpoint dir (e.g. demo_out/model)")
    bench_serve.add_argument("--requests", type=int, default=16, help="requests per pass (default 16)")
    bench_serve.add_argument("--tokens", type=int, default=48, help="new tokens per request (default 48)")
    bench_serve.add_argument("--repeats", type=int, default=3, help="alternating timed repeats (default 3)")
    bench_serve.add_argument("--log", default="bench_serve.log", help="the server's log file")
    bench_serve.add_argument("--out", help="also write the result as JSON")
    bench_serve.set_defaults(handler=cmd_bench_serve)

    bench_red = bench_commands.add_parser(
        "reducers", help="visual-token reducers vs the unreduced model: wall-clock, ideal slice, accuracy"
    )
    bench_red.add_argument("--model", required=True, help="checkpoint dir (the README names the one trained for it)")
    bench_red.add_argument("--task", default="toy-vqa-multi", help="an eval task with image input")
    bench_red.add_argument("--methods", default="fastv,sparsevlm,pdrop,dart,tome,prellm", help="comma-separated")
    bench_red.add_argument("--ratios", default="0.5,0.75,0.89", help="fractions of image tokens removed")
    bench_red.add_argument("--layer", type=int, default=2, help="the layer a layer-wise method acts before")
    bench_red.add_argument("--items", type=int, default=500, help="held-out items scored for accuracy")
    bench_red.add_argument("--batch-size", type=int, default=8)
    bench_red.add_argument("--timing-batches", type=int, default=8, help="batches whose prefill is timed")
    bench_red.add_argument("--repeats", type=int, default=3, help="interleaved timed repeats per batch")
    bench_red.add_argument("--decode-steps", type=int, default=32, help="greedy decode steps timed per batch")
    bench_red.add_argument("--seed", type=int, default=0)
    bench_red.add_argument(
        "--method-model",
        action="append",
        default=[],
        metavar="METHOD=DIR",
        help="run a learned method on the checkpoint trained for it (e.g. registers=runs/reducers/registers/model)",
    )
    bench_red.add_argument("--out", help="write reducers.json, reducers.md and reducers.png to this dir")
    bench_red.set_defaults(handler=cmd_bench_reducers)

    generate = commands.add_parser("generate", help="reply to one prompt; writes text and media files")
    add_model_arguments(generate)
    generate.add_argument("--prompt", required=True, help="the user's text")
    for modality in ("image", "audio", "video", "action"):
        generate.add_argument(
            f"--{modality}", action="append", default=[], metavar="PATH", help=f"attach a {modality} file (repeatable)"
        )
    generate.add_argument(
        "--reply", default="text", help="open the reply with this modality: text (free), image, audio, video, action"
    )
    generate.add_argument("--max-new-tokens", type=int, default=512)
    generate.add_argument(
        "--sampling",
        action="append",
        default=[],
        metavar="[MODALITY:]KEY=V,...",
        help="e.g. temperature=0.7 (every modality) or image:temperature=1,top_k=100 (repeatable)",
    )
    generate.add_argument("--guidance", default="", metavar="MODALITY=SCALE,...", help="CFG scales, e.g. image=3")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--out", required=True, help="dir for reply.json, reply.txt and media files")
    generate.set_defaults(handler=cmd_generate)

    chat = commands.add_parser("chat", help="talk to a model in the terminal; media in and out")
    add_model_arguments(chat)
    chat.add_argument("--media-dir", default="chat_media", help="where generated media are saved")
    chat.add_argument("--max-new-tokens", type=int, default=512)
    chat.add_argument("--seed", type=int, default=0)
    chat.set_defaults(handler=cmd_chat)

    from mmllm.serving.command import add_serve_arguments

    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP API over one checkpoint, media in and out")
    add_serve_arguments(serve)
    serve.set_defaults(handler=cmd_serve)

    evaluate = commands.add_parser("eval", help="score a model on registered tasks -> results.json")
    add_model_arguments(evaluate, required=False)
    evaluate.add_argument("--tasks", help="comma-separated task names (see --list)")
    evaluate.add_argument("--list", action="store_true", help="list the registered tasks and exit")
    evaluate.add_argument("--out", default="results.json", help="results file; media are saved beside it")
    evaluate.add_argument("--limit", type=int, help="items per task (default: 500 toy items; a benchmark's every row)")
    evaluate.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="where a standard benchmark's files are, in its official layout, e.g. vqav2=/data/vqav2 (repeatable)",
    )
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--guidance", default="", metavar="MODALITY=SCALE,...", help="CFG scales, e.g. image=3")
    evaluate.add_argument(
        "--sampling",
        action="append",
        default=[],
        metavar="[MODALITY:]KEY=V,...",
        help="default greedy; e.g. image:temperature=1,top_k=10 samples drawn images (seeded; repeatable)",
    )
    evaluate.add_argument(
        "--latent",
        metavar="MODE",
        help="how the reasoning puzzles are answered: cot (default), no-cot, assorted, pause:k=K, coconut:steps=N, "
        "mirage:steps=N or colar:steps=N,c=K (the last three through the latent head of the model's dir)",
    )
    evaluate.add_argument(
        "--compare",
        nargs="+",
        metavar="RESULTS",
        help="print one table of several runs' results.json (one per reasoning method; also to --report) and exit",
    )
    evaluate.add_argument("--no-untrained", action="store_true", help="skip the untrained reference row")
    evaluate.add_argument("--report", help="also write a markdown report (table and image grid) here")
    evaluate.set_defaults(handler=cmd_eval)

    demo = commands.add_parser("demo", help="run the end-to-end pipeline on the toy world")
    demo.add_argument("--out", default="demo_out", help="output dir (report.md, model/)")
    size = demo.add_mutually_exclusive_group()
    size.add_argument("--fast", action="store_true", help="every stage shrunk to about 3 minutes; no quality floors")
    size.add_argument("--full", action="store_true", help="longer training and the ambitious quality floors")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=cmd_demo)
    return parser


def add_model_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--model", required=required, help="checkpoint dir (native or HF)")
    parser.add_argument("--adapter", help="a peft LoRA adapter dir, merged into the model")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu", help="torch device (default: cuda if any)")
    parser.add_argument("--dtype", choices=DTYPES, help="weights dtype (default: as stored)")
    parser.add_argument(
        "--device-map", help="'auto': place layers over the GPUs, CPU and disk with accelerate (large checkpoints)"
    )
    parser.add_argument("--max-memory", metavar="DEV=SIZE,...", help="with --device-map: e.g. 0=20GiB,cpu=60GiB")
    parser.add_argument("--offload-folder", help="with --device-map: where layers that fit nowhere are offloaded")
    parser.add_argument(
        "--reducer", metavar="NAME[:key=val,...]", help="a visual-token reducer, e.g. fastv:layer=2,ratio=0.5"
    )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def load_model(args: argparse.Namespace):
    """The --model checkpoint in eval mode, with --adapter merged, on --device in --dtype. A latent
    head saved beside the adapter or the weights (`latent_head.safetensors`) is attached too: it
    changes nothing until latent steps are fed (`mmllm eval --latent coconut:steps=N`)."""
    import torch

    from mmllm.model.adapters import apply_adapter
    from mmllm.model.latent import LATENT_HEAD_FILE, load_latent_head
    from mmllm.model.mmllm import MMLLM

    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.device_map:
        model = MMLLM.from_pretrained(
            args.model,
            dtype=dtype,
            device_map=args.device_map,
            max_memory=parse_max_memory(args.max_memory),
            offload_folder=args.offload_folder,
        )
    else:
        model = MMLLM.from_pretrained(args.model, dtype=dtype, device=args.device)
    if args.adapter:
        model = apply_adapter(model, args.adapter)
    if args.reducer:
        from mmllm.model.reducers import attach_reducer

        attach_reducer(model, args.reducer)
    head = next((d for d in (args.adapter, args.model) if d and (Path(d) / LATENT_HEAD_FILE).is_file()), None)
    if head is not None:
        load_latent_head(model, head)
    return model.eval()


def parse_max_memory(spec: str | None) -> dict[int | str, str] | None:
    """`0=20GiB,cpu=60GiB` -> {0: "20GiB", "cpu": "60GiB"} (accelerate's max_memory)."""
    if not spec:
        return None
    memory: dict[int | str, str] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        device, sep, size = item.partition("=")
        if not sep or not size:
            raise MMLLMError(f"--max-memory {item!r}: expected DEVICE=SIZE, e.g. 0=20GiB or cpu=60GiB")
        memory[int(device) if device.isdigit() else device] = size
    return memory


def parse_scales(spec: str) -> dict[str, float]:
    """`image=3,audio=2` -> {"image": 3.0, "audio": 2.0}."""
    scales = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError(item)
            scales[name] = float(value)
        except ValueError:
            raise MMLLMError(f"guidance {item!r}: expected MODALITY=SCALE, e.g. image=3") from None
    return scales


def parse_data(specs: list[str]) -> dict[str, Path]:
    """`["vqav2=/data/vqav2", ...]` -> {"vqav2": Path("/data/vqav2"), ...}."""
    data: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise MMLLMError(f"--data {spec!r}: expected NAME=PATH, e.g. vqav2=/data/vqav2")
        data[name.strip()] = Path(path.strip()).expanduser()
    return data


def cmd_generate(args: argparse.Namespace) -> None:
    from mmllm.generation.command import run_generate

    run_generate(load_model(args), args)


def cmd_finetune(args: argparse.Namespace) -> None:
    from mmllm.training.finetune import finetune, load_finetune_config

    run_training(args, load_finetune_config, finetune, "finetuned")


def cmd_merge_lora(args: argparse.Namespace) -> None:
    from mmllm.training.finetune import merge_lora

    out = merge_lora(args.model, args.adapter, args.out)
    print(f"merged {args.adapter} into {args.model} -> {out}")


def cmd_chat(args: argparse.Namespace) -> None:
    from mmllm.serving.chat import run_chat

    run_chat(load_model(args), args)


def cmd_serve(args: argparse.Namespace) -> None:
    from mmllm.serving.command import run_serve

    run_serve(args)


def cmd_latent_train(args: argparse.Namespace) -> None:
    from mmllm.model.latent.train import load_latent_train_config, train_latent
    from mmllm.training.loop import shutdown_distributed

    summary = train_latent(load_latent_train_config(args.config, args.overrides), progress=not args.quiet)
    shutdown_distributed()  # the in-process stages' group (ranks: 1)
    for stage in summary["stages"]:
        print(f"stage {stage['stage']} ({stage['format']}): loss {stage['first_loss']:.4f} -> {stage['last_loss']:.4f}")
    print(f"model -> {summary['model']}; evaluate it with --latent {summary['eval']}")


def cmd_eval(args: argparse.Namespace) -> None:
    from mmllm.evaluation.reasoning import parse_mode
    from mmllm.evaluation.report import reasoning_table, write_markdown
    from mmllm.evaluation.runner import EvalSettings, evaluate, resolve_tasks
    from mmllm.evaluation.tasks import list_tasks
    from mmllm.generation.command import sampling_settings

    if args.list:
        for task in list_tasks():
            reads = ",".join(task.input_modalities) or "text"
            writes = ",".join(task.output_modalities) or "text"
            print(f"{task.name:<18} {reads:>24} -> {writes:<24} {task.metric}: {task.description}")
        return
    if args.compare:
        table = reasoning_table([_read_results(path) for path in args.compare])
        print(table)
        if args.report:
            Path(args.report).write_text(table + "\n", encoding="utf-8")
        return
    if not args.model or not args.tasks:
        raise MMLLMError("eval needs --model and --tasks (or --list, or --compare)")
    default_sampling, sampling_by_modality = sampling_settings(args.sampling)
    settings = EvalSettings(
        tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
        limit=args.limit,
        seed=args.seed,
        batch_size=args.batch_size,
        guidance=parse_scales(args.guidance),
        sampling=default_sampling,
        sampling_by_modality=sampling_by_modality,
        untrained=not args.no_untrained,
        latent=parse_mode(args.latent) if args.latent else None,
        data=parse_data(args.data),
        command=args.command_line,
    )
    # Unknown tasks, a bad limit and missing or malformed benchmark files fail before the weights load.
    tasks = resolve_tasks(settings.tasks, settings.limit, settings.data)
    results = evaluate(load_model(args), settings, Path(args.out), model_path=args.model, tasks=tasks)
    if args.report:
        write_markdown(results, Path(args.out).parent, Path(args.report))
    print(f"results -> {args.out}")


def _read_results(path: str) -> dict:
    from mmllm.config import read_json_object

    return read_json_object(Path(path), MMLLMError, "eval results")


def cmd_bench_generate(args: argparse.Namespace) -> None:
    from mmllm.bench.generate import bench_generate, format_generate_bench

    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    result = bench_generate(Path(args.model), args.tokens, batches, args.repeats, args.threads)
    print(format_generate_bench(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def cmd_bench_learnability(args: argparse.Namespace) -> None:
    from mmllm.bench.learnability import bench_learnability, format_learnability

    result = bench_learnability(Path(args.out), args.steps, args.save_every, args.eval_items, args.seed, args.fast)
    print(format_learnability(result))


def cmd_bench_reducers(args: argparse.Namespace) -> None:
    from mmllm.bench.reducers import bench_reducers, format_reducer_bench
    from mmllm.plots import plot_reducers

    result = bench_reducers(
        Path(args.model),
        args.task,
        [m.strip() for m in args.methods.split(",") if m.strip()],
        [float(r) for r in args.ratios.split(",") if r.strip()],
        layer=args.layer,
        items=args.items,
        batch_size=args.batch_size,
        timing_batches=args.timing_batches,
        repeats=args.repeats,
        decode_steps=args.decode_steps,
        seed=args.seed,
        method_models=dict(_key_value(item, "--method-model") for item in args.method_model),
    )
    table = format_reducer_bench(result)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "reducers.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        (out / "reducers.md").write_text(table + "\n", encoding="utf-8")
        plot_reducers(result["rows"], out / "reducers.png", f"{result['task']}, {result['layers']}-layer model")


def _key_value(item: str, flag: str) -> tuple[str, Path]:
    name, sep, value = item.partition("=")
    if not sep or not name or not value:
        raise MMLLMError(f"{flag} takes METHOD=DIR, got {item!r}")
    return name, Path(value)


def cmd_bench_serve(args: argparse.Namespace) -> None:
    from mmllm.bench.serve import bench_serve, format_serve_bench

    result = bench_serve(Path(args.model), args.requests, args.tokens, args.repeats, Path(args.log))
    print(format_serve_bench(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def cmd_vocab_train_text(args: argparse.Namespace) -> None:
    from mmllm.text_tokenizer import train_text_tokenizer

    tokenizer = train_text_tokenizer(
        args.input, args.out, args.vocab_size, args.model_type, byte_fallback=not args.no_byte_fallback
    )
    print(f"text tokenizer: {len(tokenizer)} tokens -> {args.out}")


def cmd_vocab_build(args: argparse.Namespace) -> None:
    from mmllm.config import load_config
    from mmllm.model.mmllm import MODALITY_TOKENIZERS_DIR, TEXT_TOKENIZER_DIR
    from mmllm.text_tokenizer import fingerprint, load_text_tokenizer
    from mmllm.tokenizers import load_tokenizer
    from mmllm.vocab import VocabLayout, VocabSpec, parse_modality

    spec = load_config(VocabSpec, args.config) if args.config else VocabSpec()
    modalities = {m.name: m for m in spec.modality_ranges()}
    for item in args.modality:
        for part in filter(None, item.split(",")):
            parsed = parse_modality(part)
            modalities[parsed.name] = parsed
    if not modalities:
        raise MMLLMError("no modalities: give --modality NAME=N (repeatable) or --config")
    tokenizer = load_text_tokenizer(args.text_tokenizer)
    modality_tokenizers = {}
    for item in args.tokenizer:
        name, sep, directory = item.partition("=")
        if not sep or not name or not directory:
            raise MMLLMError(f"--tokenizer {item!r}: expected MODALITY=DIR")
        if name not in modalities:
            raise MMLLMError(f"--tokenizer {name}: the layout has no {name} range (it has {', '.join(modalities)})")
        if not Path(directory).is_dir():
            raise MMLLMError(f"--tokenizer {name}: {directory} is not a dir (give a saved tokenizer's dir)")
        modality_tokenizers[name] = load_tokenizer(directory)
    base_rows = args.base_rows if args.base_rows is not None else spec.base_rows
    if base_rows is None:
        base_rows = _embedding_rows(Path(args.text_tokenizer))
        if base_rows is not None and base_rows > len(tokenizer):
            logger.info(
                "base rows %d from %s/config.json (text ends at %d)", base_rows, args.text_tokenizer, len(tokenizer)
            )
    layout = VocabLayout.build(
        text_size=len(tokenizer),
        modalities=list(modalities.values()),
        base_rows=base_rows,
        num_registers=args.registers if args.registers is not None else spec.registers,
        num_pause=args.pause if args.pause is not None else spec.pause,
        num_spare=args.spare if args.spare is not None else spec.spare,
        text_tokenizer_fingerprint=fingerprint(tokenizer),
    )
    for name, modality_tokenizer in modality_tokenizers.items():
        modality_tokenizer.check_fits(layout.modality(name), f"--tokenizer {name}")
    out = Path(args.out)
    if out.suffix != ".json":
        out = out / "vocab_layout.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    layout.save(out)
    tokenizer.save_pretrained(str(out.parent / TEXT_TOKENIZER_DIR))
    for name, modality_tokenizer in modality_tokenizers.items():
        modality_tokenizer.save_pretrained(out.parent / MODALITY_TOKENIZERS_DIR / name)
    print(layout.describe())
    print(f"-> {out}")


def _embedding_rows(model_dir: Path) -> int | None:
    """A HF model dir's embedding rows (its config's vocab_size), if the dir is one."""
    try:
        return int(json.loads((model_dir / "config.json").read_text(encoding="utf-8"))["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cmd_vocab_show(args: argparse.Namespace) -> None:
    from mmllm.vocab import VocabLayout

    print(VocabLayout.load(args.layout).describe())


def cmd_convert(args: argparse.Namespace) -> None:
    import torch

    from mmllm.model.mmllm import MMLLM
    from mmllm.text_tokenizer import load_text_tokenizer
    from mmllm.vocab import VocabLayout

    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.to_hf:
        if args.layout or args.text_tokenizer:
            raise MMLLMError("--layout and --text-tokenizer apply to --from-hf only")
        MMLLM.from_pretrained(args.to_hf, dtype=dtype).export_hf(args.out)
        print(f"HF checkpoint -> {args.out}")
        return
    tokenizer = load_text_tokenizer(args.text_tokenizer) if args.text_tokenizer else None
    layout = VocabLayout.load(args.layout) if args.layout else None
    if tokenizer is None and layout is not None:
        beside = Path(args.layout).parent if Path(args.layout).is_file() else Path(args.layout)
        if (beside / "text_tokenizer").is_dir():
            tokenizer = load_text_tokenizer(beside / "text_tokenizer")
    model = MMLLM.from_pretrained(args.from_hf, text_tokenizer=tokenizer, dtype=dtype)
    if layout is not None:
        model.extend_vocab(layout)
    model.save_pretrained(args.out)
    print(f"mmllm checkpoint ({model.config.vocab_size} rows) -> {args.out}")


def cmd_bench_model(args: argparse.Namespace) -> None:
    from mmllm.bench.model import bench_model, format_model_bench
    from mmllm.model.config import ModelConfig

    config = ModelConfig.from_yaml(args.config, args.set)
    result = bench_model(config, args.batch, args.seq, args.repeats, args.warmup)
    result["config"] = args.config
    print(format_model_bench(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def cmd_bench_train(args: argparse.Namespace) -> None:
    from mmllm.bench.train import bench_train, format_train_bench

    result = bench_train(
        args.model,
        steps=args.steps,
        warmup=args.warmup,
        seq_len=args.seq_len,
        batch=args.batch,
        data=args.data,
        vocab=args.vocab,
        only=args.only.split(",") if args.only else None,
        threads=args.threads,
        toy_items=args.toy_items,
        precision=args.precision,
        progress=not args.quiet,
    )
    print(format_train_bench(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def cmd_toyworld(args: argparse.Namespace) -> None:
    from mmllm.data.toy_tasks import write_toyworld

    tasks = args.tasks.split(",") if args.tasks else None
    summary = write_toyworld(Path(args.out), args.n, args.seed, tasks=tasks, split=args.split)
    media = ", ".join(f"{count} {kind}" for kind, count in summary["media"].items()) or "no media"
    print(f"toy world: {summary['records']} records ({media}) -> {summary['path']}")


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from mmllm.tokenizers.training import load_train_config, train_tokenizer

    config = load_train_config(args.config, args.overrides)
    if not config.out:
        raise MMLLMError(f"{args.config}: no 'out' dir; add out=DIR")
    result = train_tokenizer(config)
    print(
        f"{config.tokenizer}: {result.steps} steps on {result.items} items in {result.seconds:.0f} s"
        + (f" ({len(result.skipped)} files skipped, see skipped.txt)" if result.skipped else "")
        + f" -> {config.out}"
    )


def cmd_tokenizer_evaluate(args: argparse.Namespace) -> None:
    from mmllm.tokenizers.base import load_tokenizer
    from mmllm.tokenizers.evaluation import evaluate_tokenizer, held_out_items
    from mmllm.tokenizers.training import DataConfig, load_items

    tokenizer = load_tokenizer(args.tokenizer)
    if args.data == "toyworld":
        items = held_out_items(tokenizer.modality, args.n)
    else:
        items, skipped = load_items(tokenizer, DataConfig(source=args.data, num_items=args.n))
        for line in skipped:
            logger.warning("skipped %s", line)
    report = evaluate_tokenizer(tokenizer, items, batch_size=args.batch_size)
    result = report.to_dict()
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def add_training_arguments(parser: argparse.ArgumentParser, configs: str = "configs/pretrain/*.yaml") -> None:
    parser.add_argument("--config", required=True, help=configs)
    parser.add_argument("--deepspeed", help="DeepSpeed JSON (default: ZeRO-0); its 'auto' fields come from the YAML")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out/")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. steps=100")


def cmd_pretokenize(args: argparse.Namespace) -> None:
    from mmllm.data.formats import read_records
    from mmllm.data.pretokenize import parse_shard, pretokenize

    # Bad samples are skipped and reported by the pretokenizer; the reader skips only malformed records.
    records = read_records(args.data, format=args.format, task=args.task, on_error="skip")
    report = pretokenize(
        records,
        None,  # readers hand over media as bytes, so no paths are resolved
        args.model_or_layout,
        args.out,
        shard=parse_shard(args.shard),
        num_proc=args.num_proc,
        chunk_size=args.chunk_size,
    )
    print(
        f"pretokenized {report.written} of {report.records} records ({report.tokens} tokens, "
        f"{report.skipped} skipped, {report.chunks_reused} chunks reused) in {report.seconds:.1f} s -> {args.out}"
    )
    for failure in report.failures[:5]:
        logger.warning("skipped %s: %s", failure["id"], failure["error"])


def cmd_pretrain(args: argparse.Namespace) -> None:
    from mmllm.training.config import load_pretrain_config
    from mmllm.training.loop import train

    run_training(args, load_pretrain_config, train, "pretrained")


def run_training(args: argparse.Namespace, load_config, run, done: str) -> None:
    """Load the YAML with its overrides, run it on this rank, and end the rank cleanly."""
    from mmllm.training.launch import end_rank
    from mmllm.training.loop import shutdown_distributed

    result = run(load_config(args.config, args.overrides), deepspeed_config=args.deepspeed, resume=args.resume)
    shutdown_distributed()
    if result.rank == 0:
        print(f"{done} {result.steps} steps, final loss {result.final_loss:.4f} -> {result.model_dir}")
    end_rank()


def cmd_bench_tokenizers(args: argparse.Namespace) -> None:
    from mmllm.bench.tokenizers import TARGETS, bench_tokenizers, format_tokenizer_bench

    names = args.only.split(",") if args.only else None
    unknown = [n for n in names or [] if n not in TARGETS]
    if unknown:
        raise MMLLMError(f"unknown tokenizer benchmark '{unknown[0]}' (choose from {', '.join(TARGETS)})")
    rows = bench_tokenizers(
        names,
        trained=Path(args.trained) if args.trained else None,
        out=Path(args.save) if args.save else None,
        n=args.n,
        repeats=args.repeats,
    )
    print(format_tokenizer_bench(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


def cmd_demo(args: argparse.Namespace) -> None:
    from mmllm.demo import FAST, FULL, STANDARD, run_demo

    scale = FAST if args.fast else FULL if args.full else STANDARD
    report = run_demo(Path(args.out), scale, seed=args.seed)
    print(f"report -> {report}")


if __name__ == "__main__":
    sys.exit(main())
