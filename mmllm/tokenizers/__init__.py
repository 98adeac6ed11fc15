"""Modality tokenizers: media <-> integer codes, behind one contract (see `base`)."""

from mmllm.tokenizers.base import (
    Decoded,
    EncodedBatch,
    ModalityTokenizer,
    available_tokenizers,
    load_tokenizer,
    register_tokenizer,
)

__all__ = [
    "Decoded",
    "EncodedBatch",
    "ModalityTokenizer",
    "available_tokenizers",
    "load_tokenizer",
    "register_tokenizer",
]
