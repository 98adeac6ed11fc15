"""Packing: whole spans and conversations, document masks and positions, weights, mixture, CFG dropout."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mmllm.data.packing import TEXT, Document, Mixture, Packer, PackingConfig, cut_points, drop_condition
from mmllm.errors import ConfigError
from mmllm.model.loss import IGNORE_INDEX


def make_document(layout, parts, splittable, source=0, target=True, condition_text=False) -> Document:
    """A document from [("text", n) | ("image", None) ...]; media spans get the layout's real delimiters."""
    ids, modality, condition = [layout.token_id("<|bos|>")], [TEXT], [False]
    names = list(layout.modalities)
    for kind, n in parts:
        if kind == "text":
            ids += list(range(10, 10 + n))
            modality += [TEXT] * n
            condition += [condition_text] * n
        else:
            m = layout.modality(kind)
            span = [layout.begin_id(kind), *range(m.start, m.start + m.fixed_length), layout.end_id(kind)]
            ids += span
            modality += [names.index(kind) + 1] * len(span)
            condition += [False] * len(span)
    n = len(ids)
    return Document(
        np.array(ids, dtype=np.int64),
        np.array([False] + [target] * (n - 1)),
        np.array(modality, dtype=np.int8),
        np.array(condition),
        splittable,
        source,
    )


@pytest.fixture()
def image_layout(text_tokenizer):
    from mmllm.text_tokenizer import fingerprint
    from mmllm.vocab import ModalityRange, VocabLayout

    return VocabLayout.build(
        len(text_tokenizer),
        [ModalityRange("image", 32, grid=(4, 4)), ModalityRange("audio", 16, grid=(6,))],
        text_tokenizer_fingerprint=fingerprint(text_tokenizer),
    )


def spans_in(row_ids: np.ndarray, layout) -> list[tuple[int, int]]:
    """(begin index, end index) of every media span in a row; fails on an unclosed or unopened span."""
    begins = {layout.begin_id(m) for m in layout.modalities}
    ends = {layout.end_id(m) for m in layout.modalities}
    spans, open_at = [], None
    for i, token in enumerate(row_ids.tolist()):
        if token in begins:
            assert open_at is None, "span opened inside a span"
            open_at = i
        elif token in ends:
            assert open_at is not None, f"span end at {i} without its begin: a span was split"
            spans.append((open_at, i))
            open_at = None
    assert open_at is None, "span begun but not ended in this row: a span was split"
    return spans


def test_cut_points_never_fall_inside_a_span(image_layout):
    doc = make_document(image_layout, [("text", 3), ("image", None), ("image", None), ("text", 2)], True)
    begins = np.array([image_layout.begin_id(m) for m in ("image", "audio")])
    ends = np.array([image_layout.end_id(m) for m in ("image", "audio")])
    cuts = set(cut_points(doc, begins, ends).tolist())
    first_begin = 4  # bos + 3 text tokens
    span = 18  # boi + 16 codes + eoi
    assert first_begin in cuts and first_begin + span in cuts  # before each image
    assert first_begin + 2 * span in cuts  # after the second image
    assert not any(first_begin < c < first_begin + span for c in cuts)
    assert not any(first_begin + span < c < first_begin + 2 * span for c in cuts)


def test_pretraining_rows_keep_spans_whole_and_fill_rows(image_layout):
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(300):
        parts = [("text", int(rng.integers(1, 40)))]
        for _ in range(int(rng.integers(0, 4))):
            parts += [(str(rng.choice(["image", "audio"])), None), ("text", int(rng.integers(1, 30)))]
        docs.append(make_document(image_layout, parts, splittable=True))
    packer = Packer(PackingConfig(seq_len=128, condition_dropout=0.0), image_layout)
    rows = list(packer.rows(iter(docs)))
    for row in rows:
        assert len(row.input_ids) == 128
        spans_in(row.input_ids[: row.real_tokens], image_layout)
        # positions restart at 0 at every document boundary and count up inside it
        starts = np.r_[True, row.document_ids[1:] != row.document_ids[:-1]]
        assert (row.position_ids[starts] == 0).all()
        assert (row.position_ids[~starts] == row.position_ids[np.nonzero(~starts)[0] - 1] + 1).all()
    assert packer.stats.split > 0  # documents did continue across rows
    assert packer.stats.real_tokens == sum(len(d) for d in docs)  # nothing lost
    assert packer.stats.fill(128) >= 0.99


def test_conversations_are_never_split_and_best_fit_fills_rows(image_layout):
    rng = np.random.default_rng(1)
    docs = [
        make_document(image_layout, [("text", int(rng.integers(5, 60))), ("image", None)], splittable=False)
        for _ in range(400)
    ]
    packer = Packer(PackingConfig(seq_len=256, condition_dropout=0.0, buffer_size=64), image_layout)
    rows = list(packer.rows(iter(docs)))
    lengths = sorted(len(d) for d in docs)
    seen = []
    for row in rows:
        for doc_id in np.unique(row.document_ids[: row.real_tokens]):
            seen.append(int((row.document_ids[: row.real_tokens] == doc_id).sum()))
    assert sorted(seen) == lengths  # every conversation whole, exactly once
    assert packer.stats.split == 0
    assert packer.stats.fill(256) >= 0.95


def test_overlong_conversation_truncated_or_skipped_and_counted(image_layout):
    long = make_document(image_layout, [("text", 50), ("image", None), ("text", 50)], splittable=False)
    short = make_document(image_layout, [("text", 10)], splittable=False)
    truncating = Packer(PackingConfig(seq_len=64, condition_dropout=0.0), image_layout)
    rows = list(truncating.rows(iter([long, short])))
    assert truncating.stats.truncated == 1
    assert (rows[0].document_ids == 0).sum() == 51  # cut before the image span, which would not fit whole
    skipping = Packer(PackingConfig(seq_len=64, overflow="skip", condition_dropout=0.0), image_layout)
    rows = list(skipping.rows(iter([long, short])))
    assert skipping.stats.skipped == 1 and len(rows) == 1 and rows[0].real_tokens == len(short)


def test_labels_weights_and_document_ids(image_layout):
    doc = make_document(image_layout, [("text", 4), ("image", None)], splittable=False)
    doc.loss_mask[:3] = False
    packer = Packer(
        PackingConfig(seq_len=64, condition_dropout=0.0, modality_loss_weights={"image": 0.25}), image_layout
    )
    row = next(packer.rows(iter([doc, doc])))
    n = len(doc)
    assert (row.labels[:3] == IGNORE_INDEX).all() and (row.labels[3:n] == doc.input_ids[3:]).all()
    assert set(row.document_ids[:n]) == {0} and set(row.document_ids[n : 2 * n]) == {1}
    assert (row.document_ids[2 * n :] == 2).all() and (row.labels[2 * n :] == IGNORE_INDEX).all()
    image_targets = (row.modality[:n] == 1) & (row.labels[:n] != IGNORE_INDEX)
    assert np.allclose(row.loss_weights[:n][image_targets], 0.25)
    assert np.allclose(row.loss_weights[:n][~image_targets & (row.labels[:n] != IGNORE_INDEX)], 1.0)
    assert (row.loss_weights[row.labels == IGNORE_INDEX] == 0).all()
    with pytest.raises(ConfigError, match="unknown modalities"):
        Packer(PackingConfig(modality_loss_weights={"smell": 1.0}), image_layout)


def test_square_averaging_weighs_documents_by_their_whole_target_count(image_layout):
    short = make_document(image_layout, [("text", 4)], splittable=False)  # 4 targets
    long = make_document(image_layout, [("text", 15), ("image", None), ("text", 8)], splittable=True)
    long_targets = int(long.loss_mask.sum())  # 41: more than one row of 24 can hold, so it is split
    config = PackingConfig(seq_len=24, condition_dropout=0.0, loss_averaging="square", square_reference=16)
    rows = list(Packer(config, image_layout).rows(iter([long, short])))
    weights = np.concatenate([row.loss_weights[row.labels != IGNORE_INDEX] for row in rows])
    ids = np.concatenate([row.input_ids[row.labels != IGNORE_INDEX] for row in rows])
    assert len(rows) >= 3 and len(weights) == long_targets + 4
    from_short = np.isin(ids, short.input_ids[1:]) & (weights > 1)
    assert from_short.sum() == 4 and np.allclose(weights[from_short], 2.0)  # sqrt(16 / 4)
    assert np.allclose(weights[~from_short], np.sqrt(16 / long_targets))  # every piece of the split document
    token = Packer(PackingConfig(seq_len=24, condition_dropout=0.0), image_layout)
    assert all((row.loss_weights[row.labels != IGNORE_INDEX] == 1).all() for row in token.rows(iter([long, short])))
    with pytest.raises(ConfigError, match="loss_averaging"):
        Packer(PackingConfig(loss_averaging="sample"), image_layout)


def test_mixture_follows_weights_and_reshuffles_each_epoch(image_layout):
    a = [make_document(image_layout, [("text", 3)], True, source=0) for _ in range(10)]
    b = [make_document(image_layout, [("text", 3)], True, source=1) for _ in range(10)]
    draws = [d.source for d in itertools.islice(iter(Mixture([a, b], [3.0, 1.0], seed=0)), 4000)]
    assert abs(draws.count(0) / len(draws) - 0.75) < 0.03
    order = Mixture([list(range(5))], [1.0], seed=0)
    first, second = [list(itertools.islice(iter(order), 10))[i * 5 : i * 5 + 5] for i in range(2)]
    assert sorted(first) == sorted(second) == list(range(5))
    assert list(itertools.islice(iter(order), 10)) == list(itertools.islice(iter(order), 10))  # deterministic
    with pytest.raises(ConfigError):
        Mixture([a], [-1.0], seed=0)


def test_condition_dropout_replaces_the_prompt_by_one_null(image_layout):
    doc = make_document(image_layout, [("text", 6), ("image", None)], splittable=False, condition_text=True)
    dropped = drop_condition(doc, image_layout.null_id)
    assert len(dropped) == len(doc) - 5
    assert dropped.input_ids[1] == image_layout.null_id and not dropped.loss_mask[1]
    assert (dropped.input_ids[2:] == doc.input_ids[7:]).all()
    docs = [doc] * 2000
    packer = Packer(PackingConfig(seq_len=64, condition_dropout=0.1), image_layout)
    list(packer.rows(iter(docs)))
    assert abs(packer.stats.condition_dropped / 2000 - 0.1) < 0.02
