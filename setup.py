"""Installs the `mmllm` library and its `mmllm` console script.

Dependency ranges are the ones tested on CPU (torch 2.13, transformers 5.23) and on the GPU
image (torch 2.11, transformers 5.17); widen a range only after running `make test` with it.
"""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="mmllm",
    version="0.1.0",
    description="Train, finetune, chat with, serve and evaluate any-to-any multimodal LLMs.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mmllm", "mmllm.*"]),
    install_requires=[
        # 2.11 is the oldest build seen working (the GPU image); `make` installs 2.13.0 first,
        # so this range installs nothing more on CPU machines.
        "torch>=2.11",
        "transformers>=5.17,<6",
        "deepspeed>=0.18,<0.20",
        "peft>=0.17,<0.22",
        "datasets>=4.0,<6",
        "accelerate>=1.10,<2",
        "safetensors>=0.6",
        # SentencePiece training, and protobuf to convert its model into a fast HF tokenizer.
        "sentencepiece>=0.2",
        "protobuf>=5",
        "numpy>=1.26",
        # Media I/O without torchvision/torchaudio (no CPU builds): PNG/GIF, WAV, resampling,
        # and MP4/WebM through PyAV's bundled FFmpeg.
        "pillow>=10",
        "soundfile>=0.12",
        "scipy>=1.11",
        "av>=12",
        "pyyaml>=6",
        "tqdm>=4.66",
        # Loss curves and image grids in the demo report (Agg backend: no display needed).
        "matplotlib>=3.8",
        # The OpenAI-compatible server (`mmllm serve`), and the official client the demo checks it with.
        "fastapi>=0.110",
        "uvicorn>=0.30",
        "openai>=1.40",
        # Word error rate of the LibriSpeech benchmark (`mmllm eval --tasks librispeech`).
        "jiwer>=4.0",
    ],
    extras_require={
        # pexpect: the chat CLI's tests type into a real pseudo-terminal. pycocoevalcap: the reference our
        # BLEU-4 and CIDEr are tested against (not a runtime dependency: it is a 100 MB install).
        "dev": ["pytest>=8", "hypothesis>=6.100", "ruff>=0.6", "pexpect>=4.9", "pycocoevalcap>=1.2"],
        # flash-attn builds only against CUDA; SDPA is the fallback everywhere else.
        "gpu": ["flash-attn>=2.6"],
    },
    entry_points={"console_scripts": ["mmllm=mmllm.cli:main"]},
)
