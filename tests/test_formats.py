"""Readers of other dataset formats, each on a tiny fixture written by that format's own writer."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmllm.data import formats, media
from mmllm.data.formats import FORMATS, detect_format, read_records
from mmllm.data.interleaved import load_part, validate_record
from mmllm.errors import InputError, MediaError

RATE = 16000


@pytest.fixture()
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(3)]


@pytest.fixture()
def wave() -> np.ndarray:
    return (0.5 * np.sin(np.arange(RATE // 10) / 5)).astype(np.float32)  # 0.1 s


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def wav(tmp_path: Path, samples: np.ndarray) -> bytes:
    media.write_audio(tmp_path / "tmp.wav", samples, RATE)
    return (tmp_path / "tmp.wav").read_bytes()


def texts(message: dict) -> list[str]:
    return [part["text"] for part in message["content"] if part["type"] == "text"]


def kinds(message: dict) -> list[str]:
    return [part["type"] for part in message["content"]]


def assert_one_line(err: pytest.ExceptionInfo, start: str) -> None:
    assert str(err.value).startswith(start) and "\n" not in str(err.value), str(err.value)


# ---------------------------------------------------------------- detection and dispatch


def test_detect_format_by_extension_and_folder_contents(tmp_path):
    for name in ("a.jsonl", "a.json", "a.parquet", "a.tar"):
        (tmp_path / name).write_text("")
    (tmp_path / "robot" / "meta").mkdir(parents=True)
    (tmp_path / "robot" / "meta" / "info.json").write_text("{}")
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "state.json").write_text("{}")
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "metadata.jsonl").write_text("")
    (tmp_path / "pics" / "a.png").write_bytes(b"")
    (tmp_path / "sounds" / "train").mkdir(parents=True)
    (tmp_path / "sounds" / "train" / "metadata.csv").write_text("")
    (tmp_path / "sounds" / "train" / "a.wav").write_bytes(b"")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "s-000.tar").write_bytes(b"")
    expected = {
        "a.jsonl": "jsonl",
        "a.json": "llava",
        "a.parquet": "parquet",
        "a.tar": "webdataset",
        "robot": "lerobot",
        "saved": "hf",
        "pics": "imagefolder",
        "sounds": "audiofolder",
        "shards": "webdataset",
    }
    assert {name: detect_format(tmp_path / name) for name in expected} == expected
    assert detect_format(str(tmp_path / "*.tar")) == "webdataset"
    assert set(FORMATS) == set(expected.values())
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="cannot tell the data format") as err:
        detect_format(tmp_path / "notes.txt")
    assert_one_line(err, str(tmp_path / "notes.txt"))
    with pytest.raises(InputError, match="mixed formats"):
        detect_format([tmp_path / "a.json", tmp_path / "a.tar"])
    with pytest.raises(InputError, match="no such file"):
        detect_format(tmp_path / "missing.json")


def test_unknown_format_and_option_are_one_line_input_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text("")
    with pytest.raises(InputError, match=r"unknown data format 'csv' \(formats: jsonl, llava"):
        list(read_records(tmp_path / "a.jsonl", format="csv"))
    with pytest.raises(InputError, match="format 'jsonl' takes no option 'prompt'"):
        list(read_records(tmp_path / "a.jsonl", prompt="Describe."))


# ---------------------------------------------------------------- jsonl


def test_jsonl_records_come_with_their_files_in_memory(tmp_path, images):
    media.write_image(tmp_path / "media" / "a.png", images[0])
    record = {
        "id": "r1",
        "task": "demo",
        "messages": [
            {"role": "user", "content": [{"type": "image", "path": "media/a.png"}, {"type": "text", "text": "what?"}]},
            {"role": "assistant", "content": [{"type": "action", "values": [[0.5, -0.5]]}]},
        ],
    }
    (tmp_path / "data.jsonl").write_text(json.dumps(record) + "\n")
    [read] = read_records(tmp_path / "data.jsonl")
    image = read["messages"][0]["content"][0]
    assert (read["id"], read["task"], image["format"]) == ("r1", "demo", "png")
    assert np.array_equal(load_part(image), images[0])
    assert read["messages"][1] == record["messages"][1]
    assert next(read_records(tmp_path / "data.jsonl", task="mine"))["task"] == "mine"


# ---------------------------------------------------------------- LLaVA


@pytest.fixture()
def llava_json(tmp_path, images) -> Path:
    for name, image in zip(("a.png", "b.png", "c.png"), images, strict=True):
        media.write_image(tmp_path / "imgs" / "coco" / name, image)
    items = [  # the official schema (llava_v1_5_mix665k.json), with PNGs so the pixels compare exactly
        {
            "id": "000000033471",
            "image": "coco/a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
                {"from": "gpt", "value": "The bus in the image is white and red."},
                {"from": "human", "value": "What feature can be seen on the back of the bus?"},
                {"from": "gpt", "value": "The back of the bus features an advertisement."},
            ],
        },
        {"id": "oa_1", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {
            "id": 7,
            "image": "coco/b.png",
            "conversations": [{"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "Noise."}],
        },
        {
            "id": "pair",
            "image": ["coco/b.png", "coco/c.png"],
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Is <image> brighter than <image>?"},
                {"from": "gpt", "value": "No."},
            ],
        },
    ]
    path = tmp_path / "llava_mix.json"
    path.write_text(json.dumps(items, indent=1, ensure_ascii=False))
    return path


def test_llava_places_images_at_placeholders_or_first(llava_json, images, monkeypatch):
    monkeypatch.setattr(formats, "JSON_READ_CHARS", 7)  # items cross the parser's window many times
    records = list(read_records(llava_json, image_folder=llava_json.parent / "imgs"))
    assert [r["id"] for r in records] == [f"llava_mix-{i}" for i in range(4)]
    assert [r["meta"].get("source_id") for r in records] == ["000000033471", "oa_1", 7, "pair"]
    assert {r["task"] for r in records} == {"llava"}
    bus = records[0]["messages"]
    assert [m["role"] for m in bus] == ["user", "assistant", "user", "assistant"]
    assert kinds(bus[0]) == ["image", "text"] and texts(bus[0]) == ["What are the colors of the bus in the image?"]
    assert np.array_equal(load_part(bus[0]["content"][0]), images[0])
    assert records[1]["messages"][0]["content"] == [{"type": "text", "text": "Hi"}]
    described = records[2]["messages"][0]  # no <image>: the image opens the first human turn, as in LLaVA
    assert kinds(described) == ["image", "text"] and texts(described) == ["Describe it."]
    system, question, _ = records[3]["messages"]
    assert system["role"] == "system" and kinds(question) == ["text", "image", "text", "image", "text"]
    assert texts(question) == ["Is", "brighter than", "?"]
    pair = [load_part(part) for part in question["content"] if part["type"] == "image"]
    assert np.array_equal(pair[0], images[1]) and np.array_equal(pair[1], images[2])
    for record in records:
        validate_record(record, record["id"])


def test_llava_bad_items_are_named_and_can_be_skipped(llava_json, tmp_path):
    items = json.loads(llava_json.read_text())
    items[2]["image"] = "coco/missing.png"
    items[3]["conversations"][1]["value"] = "Is <image> bright?"  # two images, one placeholder
    llava_json.write_text(json.dumps(items))
    folder = llava_json.parent / "imgs"
    with pytest.raises(InputError, match=r"item 2: cannot read image file .*missing.png") as err:
        list(read_records(llava_json, image_folder=folder))
    assert_one_line(err, f"{llava_json}: item 2")
    assert [r["id"] for r in read_records(llava_json, image_folder=folder, on_error="skip")] == [
        "llava_mix-0",
        "llava_mix-1",
    ]
    seen: list[InputError] = []
    list(read_records(llava_json, image_folder=folder, on_error=seen.append))
    assert [str(e).split(":")[1] for e in seen] == [" item 2", " item 3"]
    assert "1 <image> placeholders for 2 images" in str(seen[1])
    llava_json.write_text(json.dumps(items)[:-30])  # cut off: not a record-level problem, the read stops
    with pytest.raises(InputError, match="item 3: not JSON"):
        list(read_records(llava_json, image_folder=folder, on_error="skip"))


# ---------------------------------------------------------------- Hugging Face datasets


def test_hf_save_to_disk_captions_become_documents_or_chats(tmp_path, images):
    from datasets import Dataset, DatasetDict

    captions = ["red noise", "green noise", "blue noise"]
    data = Dataset.from_dict({"image": [Image.fromarray(i) for i in images], "caption": captions})
    data.save_to_disk(tmp_path / "single")
    records = list(read_records(tmp_path / "single"))
    assert [r["id"] for r in records] == ["single-0", "single-1", "single-2"]
    assert [r["messages"][0]["role"] for r in records] == ["document"] * 3
    assert [texts(r["messages"][0]) for r in records] == [[c] for c in captions]
    for record, image in zip(records, images, strict=True):
        assert np.array_equal(load_part(record["messages"][0]["content"][0]), image)

    DatasetDict({"train": data, "test": data.select([2])}).save_to_disk(tmp_path / "splits")
    [chat] = read_records(tmp_path / "splits", split="test", prompt="Describe the image.", task="cap")
    assert chat["task"] == "cap" and [m["role"] for m in chat["messages"]] == ["user", "assistant"]
    assert kinds(chat["messages"][0]) == ["image", "text"] and texts(chat["messages"][1]) == ["blue noise"]
    with pytest.raises(InputError, match=r"no split 'dev' \(splits: train, test\)"):
        list(read_records(tmp_path / "splits", split="dev"))


def test_parquet_streams_audio_and_conversations(tmp_path, images, wave):
    from datasets import Audio, Dataset, List
    from datasets import Image as ImageFeature

    audio = {"bytes": wav(tmp_path, wave), "path": "clip.wav"}
    speech = Dataset.from_dict({"audio": [audio, audio], "text": ["one", "two"]}).cast_column("audio", Audio())
    speech.to_parquet(tmp_path / "speech.parquet")
    records = list(read_records(tmp_path / "speech.parquet"))
    assert [r["id"] for r in records] == ["speech-0", "speech-1"]
    part = records[1]["messages"][0]["content"][0]
    assert (part["type"], part["format"]) == ("audio", "wav")
    assert np.array_equal(load_part(part), media.read_audio(tmp_path / "tmp.wav")[0])
    assert texts(records[1]["messages"][0]) == ["two"]

    turns = [  # the chat layout of Hub datasets: {"type": "image"} marks where the row's next image goes
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Noise."}]},
    ]
    chats = Dataset.from_dict({"messages": [turns], "pictures": [[{"bytes": png(images[0]), "path": None}]]})
    chats = chats.cast_column("pictures", List(ImageFeature()))  # found by its feature type, not its name
    chats.to_parquet(tmp_path / "chats" / "train" / "00000.parquet")
    [chat] = read_records(tmp_path / "chats")
    assert chat["id"] == "train-00000-0" and kinds(chat["messages"][0]) == ["text", "image"]
    assert np.array_equal(load_part(chat["messages"][0]["content"][1]), images[0])
    assert chat["messages"][1]["content"] == [{"type": "text", "text": "Noise."}]


def test_plain_parquet_columns_are_found_by_name_and_bytes_by_signature(tmp_path, images):
    table = pa.table({"image": [png(images[0]), png(images[1])], "caption": ["a", "b"], "score": [1, 2]})
    pq.write_table(table, tmp_path / "plain.parquet", row_group_size=1)
    records = list(read_records(tmp_path / "plain.parquet"))
    assert [texts(r["messages"][0]) for r in records] == [["a"], ["b"]]
    assert np.array_equal(load_part(records[1]["messages"][0]["content"][0]), images[1])
    with pytest.raises(InputError, match=r"no column 'summary' \(columns: image, caption, score\)") as err:
        list(read_records(tmp_path / "plain.parquet", text_column="summary"))
    assert_one_line(err, str(tmp_path / "plain.parquet"))
    pq.write_table(pa.table({"image": [png(images[0])], "score": [1]}), tmp_path / "nocaption.parquet")
    with pytest.raises(InputError, match="no text column"):
        list(read_records(tmp_path / "nocaption.parquet"))


def test_imagefolder_with_metadata_jsonl(tmp_path, images):
    folder = tmp_path / "pets"
    for i, image in enumerate(images):
        media.write_image(folder / f"{i}.png", image)
    rows = [{"file_name": f"{i}.png", "caption": f"pet {i}"} for i in range(3)]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    records = list(read_records(folder, prompt="What is it?"))
    assert [r["task"] for r in records] == ["imagefolder"] * 3
    by_caption = {texts(r["messages"][1])[0]: r for r in records}
    for i, image in enumerate(images):
        user = by_caption[f"pet {i}"]["messages"][0]
        assert texts(user) == ["What is it?"] and np.array_equal(load_part(user["content"][0]), image)


def test_audiofolder_with_metadata_csv(tmp_path, wave):
    folder = tmp_path / "speech"
    media.write_audio(folder / "a.wav", wave, RATE)
    media.write_audio(folder / "b.flac", wave[::-1].copy(), RATE)
    (folder / "metadata.csv").write_text("file_name,transcription\na.wav,hello there\nb.flac,general kenobi\n")
    records = {texts(r["messages"][0])[0]: r for r in read_records(folder)}
    assert set(records) == {"hello there", "general kenobi"}
    flac = records["general kenobi"]["messages"][0]["content"][0]
    assert flac["format"] == "flac"
    assert np.array_equal(load_part(flac), media.read_audio(folder / "b.flac")[0])


# ---------------------------------------------------------------- WebDataset


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_webdataset_groups_members_by_key(tmp_path, images, wave):
    first = write_tar(
        tmp_path / "shard-000000.tar",
        [
            ("000000.png", png(images[0])),
            ("000000.txt", b"a noisy square\n"),
            ("sub/000001.wav", wav(tmp_path, wave)),
            ("sub/000001.json", json.dumps({"caption": "a tone", "speaker": 3}).encode()),
            ("000002.seg.png", png(images[2])),  # another member kind of the same sample, not an image part
            ("000002.jpg", png(images[1])),  # named .jpg, holding a PNG: decoded by content all the same
            ("000002.caption", "ünïcode".encode()),
        ],
    )
    write_tar(tmp_path / "shard-000001.tar", [("000000.png", png(images[1])), ("000000.txt", b"second shard")])
    records = list(read_records(str(tmp_path / "shard-*.tar")))
    assert [r["id"] for r in records] == [
        "shard-000000-000000",
        "shard-000000-sub/000001",
        "shard-000000-000002",
        "shard-000001-000000",
    ]
    assert [texts(r["messages"][0]) for r in records] == [["a noisy square"], ["a tone"], ["ünïcode"], ["second shard"]]
    assert [kinds(r["messages"][0]) for r in records] == [["image", "text"], ["audio", "text"]] + [
        ["image", "text"]
    ] * 2
    assert records[1]["meta"] == {"key": "sub/000001", "json": {"caption": "a tone", "speaker": 3}}
    assert np.array_equal(load_part(records[0]["messages"][0]["content"][0]), images[0])
    assert np.array_equal(load_part(records[2]["messages"][0]["content"][0]), images[1])
    assert records[2]["messages"][0]["content"][0]["name"] == f"{first}:000002.jpg"


def test_corrupt_media_bytes_raise_one_line_media_errors_naming_the_item(tmp_path, images):
    shard = write_tar(
        tmp_path / "bad.tar",
        [("000000.png", png(images[0])[:40]), ("000000.txt", b"cut"), ("000001.txt", b"no media")],
    )
    records = list(read_records(shard))
    with pytest.raises(MediaError, match="not a readable image") as err:
        load_part(records[0]["messages"][0]["content"][0])
    assert_one_line(err, f"{shard}:000000.png: ")
    assert records[1]["messages"][0]["content"] == [{"type": "text", "text": "no media"}]

    pq.write_table(pa.table({"image": [b"not an image at all"], "text": ["x"]}), tmp_path / "junk.parquet")
    with pytest.raises(MediaError, match="not in a format read here for image") as err:
        list(read_records(tmp_path / "junk.parquet"))
    assert_one_line(err, f"{tmp_path / 'junk.parquet'}:row 0, column 'image'")


def test_webdataset_sample_without_caption_is_a_bad_sample(tmp_path, images):
    shard = write_tar(tmp_path / "s.tar", [("a.png", png(images[0])), ("b.png", png(images[1])), ("b.txt", b"b")])
    with pytest.raises(InputError, match="no caption") as err:
        list(read_records(shard))
    assert_one_line(err, f"{shard}:a: ")
    assert [r["id"] for r in read_records(shard, on_error="skip")] == ["s-b"]


# ---------------------------------------------------------------- LeRobot


@pytest.fixture()
def lerobot(tmp_path) -> tuple[Path, dict]:
    """A LeRobot v2.1 layout: two episodes of 5 steps, 2-D actions, a 16x16 camera as MP4."""
    root = tmp_path / "koch_pick"
    rng = np.random.default_rng(1)
    info = {
        "codebase_version": "v2.1",
        "robot_type": "koch",
        "total_episodes": 2,
        "total_frames": 10,
        "total_tasks": 2,
        "chunks_size": 1000,
        "fps": 10,
        "splits": {"train": "0:2"},
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
        "features": {
            "observation.images.top": {"dtype": "video", "shape": [16, 16, 3], "names": ["height", "width", "channel"]},
            "observation.state": {"dtype": "float32", "shape": [2], "names": ["x", "y"]},
            "action": {"dtype": "float32", "shape": [2], "names": ["dx", "dy"]},
            "timestamp": {"dtype": "float32", "shape": [1], "names": None},
            "frame_index": {"dtype": "int64", "shape": [1], "names": None},
            "episode_index": {"dtype": "int64", "shape": [1], "names": None},
            "index": {"dtype": "int64", "shape": [1], "names": None},
            "task_index": {"dtype": "int64", "shape": [1], "names": None},
        },
    }
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=2))
    tasks = ["pick up the cube", "push the cube left"]
    (root / "meta" / "tasks.jsonl").write_text(
        "".join(json.dumps({"task_index": i, "task": t}) + "\n" for i, t in enumerate(tasks))
    )
    actions, videos = {}, {}
    for episode in range(2):
        actions[episode] = rng.normal(size=(5, 2)).astype(np.float32)
        table = pa.table(
            {
                "action": pa.array(list(actions[episode]), type=pa.list_(pa.float32(), 2)),
                "observation.state": pa.array(
                    list(rng.normal(size=(5, 2)).astype(np.float32)), type=pa.list_(pa.float32(), 2)
                ),
                "timestamp": pa.array(np.arange(5) / 10, type=pa.float32()),
                "frame_index": np.arange(5),
                "episode_index": np.full(5, episode),
                "index": np.arange(5) + 5 * episode,
                "task_index": np.full(5, episode),
            }
        )
        data = root / f"data/chunk-000/episode_{episode:06d}.parquet"
        data.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, data)
        video = root / f"videos/chunk-000/observation.images.top/episode_{episode:06d}.mp4"
        media.write_video(video, rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8))
        videos[episode] = media.read_video(video)
    return root, {"actions": actions, "videos": videos, "tasks": tasks}


def test_lerobot_gives_one_record_per_action_chunk(lerobot):
    root, truth = lerobot
    records = list(read_records(root, chunk_length=2))
    assert [r["id"] for r in records] == ["koch_pick-0-0", "koch_pick-0-2", "koch_pick-1-0", "koch_pick-1-2"]
    for record in records:
        episode, start = record["meta"]["episode_index"], record["meta"]["frame_index"]
        user, assistant = record["messages"]
        assert (user["role"], assistant["role"], record["task"]) == ("user", "assistant", "lerobot")
        assert texts(user) == [truth["tasks"][episode]]
        assert np.array_equal(load_part(user["content"][0]), truth["videos"][episode][start])
        assert np.array_equal(load_part(assistant["content"][0]), truth["actions"][episode][start : start + 2])
    overlapping = list(read_records(root, chunk_length=3, stride=1))
    assert [r["meta"]["frame_index"] for r in overlapping] == [0, 1, 2] * 2
    assert len(list(read_records(root))) == 0  # 5 steps hold no 10-step chunk


def test_lerobot_bad_inputs(lerobot):
    root, _ = lerobot
    with pytest.raises(
        InputError, match=r"no camera 'observation.images.wrist' \(video or image features: observation.images.top\)"
    ):
        list(read_records(root, camera="observation.images.wrist"))
    video = root / "videos/chunk-000/observation.images.top/episode_000001.mp4"
    video.write_bytes(video.read_bytes()[:200])
    with pytest.raises(MediaError) as err:
        list(read_records(root, chunk_length=2))
    assert_one_line(err, str(video))
    assert [r["id"] for r in read_records(root, chunk_length=2, on_error="skip")] == ["koch_pick-0-0", "koch_pick-0-2"]
    data = root / "data/chunk-000/episode_000000.parquet"
    pq.write_table(pq.read_table(data).drop_columns(["task_index"]), data)
    with pytest.raises(InputError, match="no column 'task_index'") as err:
        list(read_records(root, chunk_length=2))
    assert_one_line(err, str(data))


# ---------------------------------------------------------------- in-memory parts


def test_bytes_parts_are_validated_and_decoded_like_files(images):
    part = {"type": "image", "bytes": png(images[0]), "format": "png"}
    record = {"id": "m", "task": "t", "messages": [{"role": "user", "content": [part]}]}
    validate_record(record, "here")
    assert np.array_equal(load_part(part), images[0])
    with pytest.raises(InputError, match="needs a 'format' in png, jpg"):
        validate_record({**record, "messages": [{"role": "user", "content": [{**part, "format": "wav"}]}]}, "here")
    with pytest.raises(InputError, match="exactly one of"):
        validate_record({**record, "messages": [{"role": "user", "content": [{**part, "path": "a.png"}]}]}, "here")
    with pytest.raises(MediaError, match="^in-memory png image: not a readable image"):
        load_part({**part, "bytes": b"\x89PNG\r\n\x1a\n broken"})
    with pytest.raises(InputError, match="needs the folder its path is relative to"):
        load_part({"type": "image", "path": "a.png"})
