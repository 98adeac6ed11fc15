"""VocabLayout: building, validation, code <-> id mapping, splitting, logit masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmllm.errors import LayoutError
from mmllm.vocab import PAD_MULTIPLE, ModalityRange, VocabLayout, parse_modality


def test_build_places_text_specials_then_modalities(toy_layout, text_tokenizer):
    layout = toy_layout
    assert layout.text_size == len(text_tokenizer)
    assert min(layout.special_tokens.values()) == layout.text_size
    starts = [m.start for m in layout.modalities.values()]
    assert starts[0] == max(layout.special_tokens.values()) + 1
    assert layout.padded_size % PAD_MULTIPLE == 0 and layout.padded_size >= layout.total_size
    for name in ("<|boi|>", "<|eoa|>", "<|bolt|>", "<|null|>", "<|pad|>", "<|register_15|>", "<|pause_0|>"):
        assert name in layout.special_tokens


def test_pretrained_padding_rows_stay_unused():
    """Qwen2: 151,665 tokens in 151,936 rows; modality ranges start after both."""
    layout = VocabLayout.build(151_665, [ModalityRange("image", 8192, grid=(32, 32))], base_rows=151_936)
    assert min(layout.special_tokens.values()) == 151_936
    assert layout.modalities["image"].start > 151_936
    allowed = layout.allowed_ids("text", 0)
    assert not ((allowed >= 151_665) & (allowed < 151_936)).any() and 151_664 in allowed
    with pytest.raises(LayoutError, match="not a valid id"):
        layout.split([151_700])


def test_save_load_round_trip(toy_layout, tmp_path):
    toy_layout.save(tmp_path / "vocab_layout.json")
    loaded = VocabLayout.load(tmp_path)
    assert loaded.to_dict() == toy_layout.to_dict()


def _move(spec, start):
    spec["end"] += start - spec["start"]
    spec["start"] = start


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: _move(d["modalities"]["audio"], d["modalities"]["image"]["start"] + 4), "overlaps"),
        (lambda d: d["special_tokens"].update({"<|user|>": d["special_tokens"]["<|bos|>"]}), "share an id"),
        (lambda d: d.update(padded_size=d["padded_size"] + 1), "multiple of 64"),
        (lambda d: d.update(padded_size=d["padded_size"] - 64), "outside"),
        (lambda d: d["modalities"]["image"].update(end=d["modalities"]["image"]["end"] + 1), "structure needs"),
        (lambda d: d["special_tokens"].pop("<|eoi|>"), "<|eoi|> is missing"),
        (lambda d: d["modalities"]["video"].update(flattening="zigzag"), "zigzag"),
        (lambda d: d.update(format="other"), "not a vocab layout"),
        (lambda d: d.pop("text_size"), "malformed"),
    ],
)
def test_invalid_layouts_are_refused_with_one_line(toy_layout, tmp_path, mutate, message):
    data = toy_layout.to_dict()
    mutate(data)
    path = tmp_path / "vocab_layout.json"
    path.write_text(json.dumps(data))
    with pytest.raises(LayoutError, match=message) as info:
        VocabLayout.load(path)
    assert "\n" not in str(info.value)


def test_corrupt_layout_file(tmp_path):
    path = tmp_path / "vocab_layout.json"
    path.write_text('{"format": "mmllm.vocab_layout", ')
    with pytest.raises(LayoutError, match="not valid JSON"):
        VocabLayout.load(path)


def test_delay_pattern_layout_and_empty_token(toy_layout):
    video = toy_layout.modalities["video"]  # 2 frames, 3 levels
    codes = np.array([[1, 2, 3], [4, 5, 6]])
    ids = toy_layout.codes_to_ids("video", codes).reshape(-1, 3) - video.start
    empty = video.empty_id - video.start
    expected = [[1, empty, empty], [4, 8 + 2, empty], [empty, 8 + 5, 16 + 3], [empty, empty, 16 + 6]]
    assert ids.tolist() == expected
    assert toy_layout.ids_to_codes("video", ids.reshape(-1) + video.start).codes.tolist() == codes.tolist()
    assert toy_layout.allowed_ids("video", 1).tolist() == [video.empty_id]
    assert toy_layout.allowed_ids("video", 12).tolist() == [toy_layout.end_id("video")]


def test_first_k_keeps_the_coarse_levels(toy_layout):
    codes = np.arange(12).reshape(3, 4) % 8
    ids = toy_layout.codes_to_ids("speech", codes)
    assert len(ids) == 6
    assert toy_layout.ids_to_codes("speech", ids).codes.tolist() == codes[:, :2].tolist()


@pytest.mark.parametrize(
    "modality, codes, message",
    [
        ("image", np.zeros((3, 3), int), r"shape \(3, 3\); expected \(frames, 1\) or \(2, 2, 1\)"),
        ("image", np.array([0, 1, 2, 32]), r"code 32 is outside \[0, 32\)"),
        ("image", np.zeros(4), "must be integers"),
        ("audio", np.zeros((7, 2), int), "7 frames; allowed 1..6"),
        ("audio", np.zeros((2, 3), int), r"shape \(2, 3\); expected \(frames, 2\)"),
        ("depth", np.zeros(4, int), "modality 'depth' is not in this layout"),
    ],
)
def test_wrong_codes_get_one_clear_line(toy_layout, modality, codes, message):
    with pytest.raises(LayoutError, match=message):
        toy_layout.codes_to_ids(modality, codes)


def test_ragged_batch_is_padded_with_lengths(toy_layout):
    items = [np.zeros((2, 2), int), np.ones((5, 2), int)]
    batch, lengths = toy_layout.codes_to_ids_batch("audio", items)
    assert lengths.tolist() == [4, 10] and batch.shape == (2, 10)
    assert (batch[0, 4:] == toy_layout.pad_id).all()


def test_strict_decode_names_the_bad_id_and_lenient_drops_and_counts(toy_layout):
    image = toy_layout.modalities["image"]
    good = toy_layout.codes_to_ids("image", np.arange(4)).tolist()
    bad = [*good[:2], 5, *good[2:]]  # a text id inside an image span
    with pytest.raises(LayoutError, match=r"id 5 at position 2 of a image span"):
        toy_layout.ids_to_codes("image", bad)
    lenient = toy_layout.ids_to_codes("image", bad, strict=False)
    assert lenient.codes.reshape(-1).tolist() == [0, 1, 2, 3] and lenient.dropped == 1
    audio = toy_layout.modalities["audio"]
    shuffled = [audio.start + 1, audio.start + 16 + 2, audio.start + 16 + 3, audio.start + 4]  # level 1 twice
    result = toy_layout.ids_to_codes("audio", shuffled, strict=False)
    assert result.codes.tolist() == [[1, 2]] and result.dropped == 2
    assert image.start not in toy_layout.allowed_ids("text", 0)


def test_split_text_specials_and_spans(toy_layout):
    bos, eot = toy_layout.token_id("<|bos|>"), toy_layout.token_id("<|end_of_turn|>")
    span = toy_layout.span_ids("audio", np.array([[1, 2], [3, 4]]))
    result = toy_layout.split([bos, 10, 11, *span, 12, eot])
    kinds = [(s.kind, s.name) for s in result.segments]
    assert kinds == [
        ("special", "<|bos|>"),
        ("text", ""),
        ("span", "audio"),
        ("text", ""),
        ("special", "<|end_of_turn|>"),
    ]
    assert result.segments[2].codes.tolist() == [[1, 2], [3, 4]]


def test_split_strict_and_lenient_on_bad_streams(toy_layout):
    span = toy_layout.span_ids("image", np.arange(4))
    with pytest.raises(LayoutError, match="not closed"):
        toy_layout.split(span[:-1])
    with pytest.raises(LayoutError, match="not a valid id"):
        toy_layout.split([1, toy_layout.padded_size + 5])
    with pytest.raises(LayoutError, match="image code outside a image span"):
        toy_layout.split([span[1]])
    result = toy_layout.split([1, toy_layout.padded_size + 5, *span[:-1]], strict=False)
    assert result.dropped == 1 and not result.segments[-1].complete


def test_text_mask_admits_text_and_span_starts_only(toy_layout):
    allowed = set(toy_layout.allowed_ids("text", 0).tolist())
    assert set(range(toy_layout.text_size)) <= allowed
    assert toy_layout.begin_id("image") in allowed and toy_layout.token_id("<|end_of_turn|>") in allowed
    assert toy_layout.end_id("image") not in allowed and toy_layout.pad_id not in allowed
    assert toy_layout.token_id("<|null|>") not in allowed


def test_ragged_span_may_end_only_on_frame_boundaries(toy_layout):
    end = toy_layout.end_id("audio")
    assert end not in toy_layout.allowed_ids("audio", 0)  # at least one frame
    assert end not in toy_layout.allowed_ids("audio", 1)  # mid-frame
    assert end in toy_layout.allowed_ids("audio", 2)
    assert toy_layout.allowed_ids("audio", 12).tolist() == [end]  # max_frames reached
    assert toy_layout.allowed_ids("audio", 13).size == 0


def test_token_names_are_unique(toy_layout):
    names = [toy_layout.token_name(i) for i in range(toy_layout.text_size, toy_layout.padded_size)]
    assert len(set(names)) == len(names)
    assert toy_layout.token_name(toy_layout.modalities["audio"].start + 16 + 3) == "<|audio_l1_03|>"


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("image=1024", dict(codebook_size=1024, grid=(8, 8))),
        ("audio=512:levels=4:flattening=delay:grid=50", dict(levels=4, flattening="delay", grid=(50,))),
        ("speech=64:levels=8:flattening=first_k:first_k=2:max_frames=100", dict(first_k=2, max_frames=100)),
    ],
)
def test_parse_modality(spec, expected):
    parsed = parse_modality(spec)
    for key, value in expected.items():
        assert getattr(parsed, key) == value


@pytest.mark.parametrize("spec", ["image", "image=big", "image=8:colour=red", "image=8:grid"])
def test_parse_modality_errors(spec):
    with pytest.raises(LayoutError, match="modality spec"):
        parse_modality(spec)


def test_ragged_delay_is_refused():
    with pytest.raises(LayoutError, match="delay pattern needs a fixed frame count"):
        VocabLayout.build(100, [ModalityRange("audio", 16, levels=2, flattening="delay", max_frames=10)])


# ---------------------------------------------------------------------- property tests

modality_strategy = st.builds(
    lambda name, size, levels, structure, k_seed: _modality(name, size, levels, structure, k_seed),
    name=st.sampled_from(["image", "audio", "video", "action", "depth"]),
    size=st.integers(1, 40),
    levels=st.integers(1, 4),
    structure=st.sampled_from(["grid", "ragged", "delay", "first_k"]),
    k_seed=st.integers(1, 4),
)


def _modality(name, size, levels, structure, k_seed):
    if structure == "grid":
        return ModalityRange(name, size, levels, grid=(2, 3))
    if structure == "ragged":
        return ModalityRange(name, size, levels, max_frames=5)
    if structure == "delay":
        return ModalityRange(name, size, levels, grid=(3,), flattening="delay")
    return ModalityRange(name, size, levels, flattening="first_k", first_k=min(k_seed, levels), max_frames=4)


layout_strategy = st.builds(
    lambda text, extra, modalities: VocabLayout.build(text, modalities, base_rows=text + extra),
    text=st.integers(1, 500),
    extra=st.integers(0, 70),
    modalities=st.lists(modality_strategy, min_size=1, max_size=4, unique_by=lambda m: m.name),
)


@settings(max_examples=60, deadline=None)
@given(layout=layout_strategy, data=st.data())
def test_random_layouts_round_trip_codes(layout, data):
    VocabLayout.from_dict(layout.to_dict())  # what is saved validates
    for m in layout.modalities.values():
        frames = m.frames or data.draw(st.integers(1, m.max_frames))
        codes = np.array(
            data.draw(
                st.lists(st.integers(0, m.codebook_size - 1), min_size=frames * m.levels, max_size=frames * m.levels)
            )
        ).reshape(frames, m.levels)
        ids = layout.codes_to_ids(m.name, codes)
        assert ((ids >= m.start) & (ids < m.end)).all()
        assert layout.ids_to_codes(m.name, ids).codes.tolist() == codes[:, : m.stream_levels].tolist()
        segments = layout.split(layout.span_ids(m.name, codes)).segments
        assert len(segments) == 1 and segments[0].codes.tolist() == codes[:, : m.stream_levels].tolist()


@settings(max_examples=60, deadline=None)
@given(layout=layout_strategy)
def test_masks_admit_exactly_the_valid_next_ids(layout):
    """At every step, the mask equals the set of ids that step takes over all possible codes,
    plus the end token exactly where an item may end."""
    for m in layout.modalities.values():
        lengths = [m.fixed_length] if m.fixed_length else [f * m.stream_levels for f in range(1, m.max_frames + 1)]
        longest = max(lengths)
        frames = longest // m.stream_levels if not m.fixed_length else m.frames
        reachable: list[set[int]] = [set() for _ in range(longest)]
        for value in range(m.codebook_size):
            ids = layout.codes_to_ids(m.name, np.full((frames, m.levels), value))
            for step, token in enumerate(ids):
                reachable[step].add(int(token))
        end = layout.end_id(m.name)
        for step in range(longest + 1):
            expected = set(reachable[step]) if step < longest else set()
            if step in lengths:
                expected.add(end)
            assert set(layout.allowed_ids(m.name, step).tolist()) == expected, (m, step)
        assert layout.allowed_ids(m.name, longest + 1).size == 0


def _variable_resolution_layout() -> VocabLayout:
    image = ModalityRange("image", codebook_size=16, levels=2, grid=(4, 6), row_end=True)
    return VocabLayout.build(text_size=100, modalities=[image])


def test_row_end_round_trips_any_shape_within_the_grid(tmp_path):
    layout = _variable_resolution_layout()
    m = layout.modality("image")
    assert m.size == 2 * 16 + 1 and m.max_length == 4 * (6 * 2 + 1)
    rng = np.random.default_rng(0)
    for rows, cols in [(1, 1), (3, 5), (4, 6), (2, 6)]:
        codes = rng.integers(0, 16, size=(rows, cols, 2))
        ids = layout.codes_to_ids("image", codes)
        assert len(ids) == rows * (cols * 2 + 1)
        assert (ids[cols * 2 :: cols * 2 + 1] == m.row_end_id).all()
        np.testing.assert_array_equal(layout.ids_to_codes("image", ids).codes, codes)
        (segment,) = layout.split(layout.span_ids("image", codes)).segments
        assert segment.complete and segment.codes.shape == (rows, cols, 2)
    layout.save(tmp_path / "layout.json")
    assert VocabLayout.load(tmp_path / "layout.json") == layout
    assert layout.token_name(m.row_end_id) == "<|image_end_of_row|>"


def test_row_end_refuses_ragged_rows_strictly_and_drops_them_leniently():
    layout = _variable_resolution_layout()
    eol = layout.modality("image").row_end_id
    row = layout.codes_to_ids("image", np.zeros((1, 3, 2), dtype=np.int64)).tolist()
    short = [*row[:2], eol]  # a row of one frame
    with pytest.raises(LayoutError, match="rows of different widths"):
        layout.ids_to_codes("image", row + short)
    with pytest.raises(LayoutError, match="end-of-row"):
        layout.ids_to_codes("image", row[:-1])
    with pytest.raises(LayoutError, match="within 4x6"):
        layout.codes_to_ids("image", np.zeros((5, 2, 2), dtype=np.int64))
    result = layout.ids_to_codes("image", row + short + row + row[:3], strict=False)
    assert result.codes.shape == (2, 3, 2) and result.dropped == 3 + 3


@pytest.mark.parametrize("row_width", [None, 2])
def test_row_end_masks_walk_to_a_valid_span(row_width):
    layout = _variable_resolution_layout()
    m = layout.modality("image")
    end = layout.end_id("image")
    rng = np.random.default_rng(1)
    ids: list[int] = []
    for step in range(m.max_length + 1):
        allowed = layout.allowed_ids("image", step, row_width=row_width)
        if end in allowed and len(ids) > 2 * (row_width or 6) * 2:  # stop after two rows
            break
        choices = allowed[allowed != end]
        ids.append(int(rng.choice(choices)))
    assert layout.ids_to_codes("image", ids).codes.shape == (2, row_width or 6, 2)
    assert end not in layout.allowed_ids("image", 0, row_width=row_width)
    with pytest.raises(LayoutError, match="row_width"):
        layout.allowed_ids("image", 0, row_width=7)


def test_row_end_needs_a_two_dimensional_grid():
    with pytest.raises(LayoutError, match="row_end"):
        VocabLayout.build(100, [ModalityRange("video", 16, grid=(2, 2, 2), row_end=True)])
    assert parse_modality("image=64:grid=16x16:row_end=1").row_end
