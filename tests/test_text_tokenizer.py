"""The SentencePiece-trained text tokenizer and its pairing with layouts."""

from __future__ import annotations

import pytest
import sentencepiece as spm

from mmllm.errors import LayoutError
from mmllm.text_tokenizer import check_text_tokenizer, fingerprint, load_text_tokenizer, train_text_tokenizer


def test_hf_tokenizer_encodes_like_sentencepiece(text_tokenizer, text_tokenizer_dir):
    processor = spm.SentencePieceProcessor(model_file=str(text_tokenizer_dir / "tokenizer.model"))
    for text in ["a large red circle at the top left", "the blue square is left of the red star", "Zebra! 42"]:
        assert text_tokenizer(text, add_special_tokens=False)["input_ids"] == processor.encode(text)
    assert len(text_tokenizer) == processor.get_piece_size()


def test_byte_fallback_round_trips_unseen_text(text_tokenizer):
    text = "ünïcödé ✓ and digits 0123"
    ids = text_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert text_tokenizer.unk_token_id not in ids
    assert text_tokenizer.decode(ids) == text


def test_fingerprint_tells_tokenizers_apart(text_tokenizer, caption_file, tmp_path, toy_layout):
    other = train_text_tokenizer([caption_file], tmp_path, vocab_size=len(text_tokenizer), model_type="unigram")
    assert fingerprint(other) != fingerprint(text_tokenizer)
    check_text_tokenizer(toy_layout, text_tokenizer, "here")
    with pytest.raises(LayoutError, match="differs from the one the vocab layout was built with|has .* tokens"):
        check_text_tokenizer(toy_layout, other, "here")


def test_missing_inputs_are_clear(tmp_path):
    with pytest.raises(LayoutError, match="text file not found"):
        train_text_tokenizer([tmp_path / "nope.txt"], tmp_path / "out")
    with pytest.raises(LayoutError, match="no tokenizer files"):
        load_text_tokenizer(tmp_path)
