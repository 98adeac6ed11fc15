"""The text tokenizer: a local Hugging Face tokenizer dir, or one trained here with SentencePiece.

Whatever its origin, the text tokenizer is a `transformers` fast tokenizer loaded from a local
dir; `VocabLayout` records its size and fingerprint, so a checkpoint can tell when it is paired
with the wrong one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from mmllm.errors import LayoutError

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def has_tokenizer_files(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in TOKENIZER_FILES)


def load_text_tokenizer(path: str | Path):
    """Load a tokenizer from a local dir; never from the Hub."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not has_tokenizer_files(path):
        raise LayoutError(f"{path}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # transformers raises many types for unreadable tokenizer dirs
        raise LayoutError(f"{path}: cannot load the tokenizer ({type(err).__name__}: {err})") from None


def fingerprint(tokenizer) -> str:
    """A short hash of the tokenizer's token -> id table; equal tables give equal fingerprints."""
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256()
    for token, index in sorted(vocab.items(), key=lambda item: item[1]):
        digest.update(f"{index}\t{token}\n".encode())
    return digest.hexdigest()[:16]


def check_text_tokenizer(layout, tokenizer, where: str) -> None:
    """Refuse a text tokenizer that is not the one the layout was built with."""
    if len(tokenizer) != layout.text_size:
        raise LayoutError(
            f"{where}: the text tokenizer has {len(tokenizer)} tokens but the vocab layout's text ends at "
            f"{layout.text_size}"
        )
    expected = layout.text_tokenizer_fingerprint
    if expected and fingerprint(tokenizer) != expected:
        raise LayoutError(f"{where}: the text tokenizer differs from the one the vocab layout was built with")


def train_text_tokenizer(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    vocab_size: int = 1000,
    model_type: str = "bpe",
    byte_fallback: bool = True,
):
    """Train a SentencePiece model on text files and save it as a HF fast tokenizer in `out_dir`.

    Byte fallback (on by default) lets any text encode without unknown tokens, at the cost of
    256 byte ids. Ids 0/1/2 are <unk>/<s>/</s>, as in Llama; mmllm's own specials live in the
    layout, outside the text range.
    """
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    for path in inputs:
        if not Path(path).is_file():
            raise LayoutError(f"{path}: text file not found")
    if byte_fallback and vocab_size < 300:
        raise LayoutError(f"vocab_size {vocab_size} is too small for byte fallback (256 byte ids + pieces)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "spm")
        try:
            spm.SentencePieceTrainer.train(
                input=",".join(str(p) for p in inputs),
                model_prefix=prefix,
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=1.0,
                byte_fallback=byte_fallback,
                unk_id=0,
                bos_id=1,
                eos_id=2,
                pad_id=-1,
                hard_vocab_limit=False,  # small corpora may not support the full size
                num_threads=max(1, os.cpu_count() or 1),
                minloglevel=2,
            )
        except RuntimeError as err:
            raise LayoutError(f"SentencePiece training failed: {err}") from None
        tokenizer = LlamaTokenizer.from_pretrained(tmp, vocab_file=prefix + ".model", legacy=False)
        tokenizer.save_pretrained(str(out_dir))
        # The SentencePiece model itself, for tools that read it (HF repos ship both files).
        shutil.copyfile(prefix + ".model", out_dir / "tokenizer.model")
    logger.info("trained a %d-token %s tokenizer into %s", len(tokenizer), model_type, out_dir)
    return load_text_tokenizer(out_dir)
