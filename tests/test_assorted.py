"""Token Assorted (issue 8, part 4): the chain-of-thought chunk VQ-VAE, its codes range in the
VocabLayout, and the `assorted` puzzle format's randomized mixing of codes and text."""

from __future__ import annotations

import pytest
import torch

from mmllm.data.toy_tasks import generate
from mmllm.errors import CheckpointError, ConfigError, LayoutError
from mmllm.model.latent import (
    CODES_MODALITY,
    CotVQVAE,
    CotVQVAEConfig,
    PuzzleFormat,
    check_codes_fit,
    codes_range,
    encode_puzzle,
    train_cot_vqvae,
)
from mmllm.model.latent.assorted import trace_ids
from mmllm.vocab import END_OF_TURN, VocabLayout, VocabSpec

CODEBOOK = 32
RECORDS = 40


def records(count: int = RECORDS) -> list[dict]:
    return [generate(task, i, seed=0).record for i in range(count // 2) for task in ("toy-prosqa", "toy-arith")]


@pytest.fixture(scope="module")
def trained(text_tokenizer_dir):
    from mmllm.text_tokenizer import load_text_tokenizer

    tokenizer = load_text_tokenizer(text_tokenizer_dir)
    config = CotVQVAEConfig(len(tokenizer), chunk_len=8, quantizer={"kind": "vq", "codebook_size": CODEBOOK})
    vqvae, history = train_cot_vqvae(records(), tokenizer, config, steps=300)
    return vqvae, history, tokenizer


def layout_with_codes(tokenizer, codebook_size: int = CODEBOOK, max_codes: int = 32) -> VocabLayout:
    return VocabLayout.build(len(tokenizer), [codes_range(codebook_size, max_codes)])


def test_reconstruction_loss_falls_by_half(trained):
    _, history, _ = trained
    first, last = sum(history[:10]) / 10, sum(history[-10:]) / 10
    assert last <= 0.5 * first, (first, last)


def test_encode_decode_shapes(trained):
    vqvae, _, tokenizer = trained
    trace = trace_ids(records(2)[0]["meta"], tokenizer)
    chunks = vqvae.chunk(trace)
    assert chunks.shape == (-(-len(trace) // 8), 8) and vqvae.unchunk(chunks) == trace
    codes = vqvae.encode(chunks)
    assert codes.shape == (len(chunks), 1) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < CODEBOOK
    assert vqvae.decode(codes).shape == chunks.shape


def test_save_load_round_trip(trained, tmp_path):
    vqvae, _, tokenizer = trained
    vqvae.save(tmp_path / "vqvae.safetensors")
    loaded = CotVQVAE.load(tmp_path / "vqvae.safetensors")
    assert loaded.config == vqvae.config
    chunks = vqvae.chunk(trace_ids(records(2)[1]["meta"], tokenizer))
    assert torch.equal(loaded.encode(chunks), vqvae.encode(chunks))
    assert torch.equal(loaded.decode(vqvae.encode(chunks)), vqvae.decode(vqvae.encode(chunks)))
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError):
        CotVQVAE.load(tmp_path / "junk.safetensors")


def test_assorted_format_mixes_codes_and_text(trained):
    vqvae, _, tokenizer = trained
    layout = layout_with_codes(tokenizer)
    codes_range_ = layout.modality(CODES_MODALITY)
    begin, end, eot = layout.begin_id(CODES_MODALITY), layout.end_id(CODES_MODALITY), layout.token_id(END_OF_TURN)
    fmt = PuzzleFormat("assorted", vqvae=vqvae, seed=3)
    chosen = []
    for record in records(20):
        encoded = encode_puzzle(record, fmt, layout, tokenizer)
        start = encoded.input_ids.index(layout.role_id("assistant")) + 1
        reply, mask = encoded.input_ids[start:], encoded.loss_mask[start:]
        assert all(mask) and reply[-1] == eot
        trace = trace_ids(record["meta"], tokenizer)
        m = reply.index(end) - 1 if reply[0] == begin else 0
        chosen.append(m)
        if m:
            codes = reply[1 : m + 1]
            assert all(codes_range_.start <= i < codes_range_.start + CODEBOOK for i in codes)
            expected = vqvae.encode(vqvae.chunk(trace)[:m]).reshape(-1) + codes_range_.start
            assert codes == expected.tolist()
            assert encoded.parts[start : start + m + 2] == [CODES_MODALITY] * (m + 2)
            span = layout.split(reply).segments[0]  # the layout reads the span back as codes
            assert span.name == CODES_MODALITY and span.codes.reshape(-1).tolist() == [
                i - codes_range_.start for i in codes
            ]
        text = reply[m + 2 if m else 0 : -1]
        assert all(i < layout.text_size for i in text)
        answer = tokenizer(f"answer: {record['meta']['answer']}", add_special_tokens=False)["input_ids"]
        assert text == trace[m * 8 :] + answer
        again = encode_puzzle(record, PuzzleFormat("assorted", vqvae=vqvae, seed=3), layout, tokenizer)
        assert again.input_ids == encoded.input_ids
    assert len(set(chosen)) > 2, chosen
    capped = [
        encode_puzzle(r, PuzzleFormat("assorted", vqvae=vqvae, max_chunks=0), layout, tokenizer) for r in records(4)
    ]
    assert all(begin not in e.input_ids for e in capped)


def test_codebook_that_does_not_fit_is_one_line(trained):
    vqvae, _, tokenizer = trained
    for layout, words in (
        (layout_with_codes(tokenizer, codebook_size=CODEBOOK // 2), "does not fit"),
        (VocabLayout.build(len(tokenizer), []), "has no 'latent_codes' range"),
        (layout_with_codes(tokenizer, max_codes=1), "do not fit"),
    ):
        with pytest.raises(LayoutError) as error:
            if "do not fit" in words:
                check_codes_fit(layout, vqvae, codes=2)
            else:
                encode_puzzle(records(2)[0], PuzzleFormat("assorted", vqvae=vqvae, seed=0), layout, tokenizer)
        assert words in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ConfigError):
        PuzzleFormat("assorted")
    spec = VocabSpec(modalities={CODES_MODALITY: {"codebook_size": CODEBOOK, "max_frames": 8}})  # as a vocab YAML
    fitting = VocabLayout.build(len(tokenizer), spec.modality_ranges())
    assert check_codes_fit(fitting, vqvae, codes=8).codebook_size == CODEBOOK
