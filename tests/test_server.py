"""The OpenAI-compatible server, as a real process (`serve/server.py`) spoken to with the official
`openai` client, and with raw HTTP where the client would refuse to send a bad request itself.

One server serves a tiny random toy model for the whole module; a second one, started only for
the local-media test, runs with `--allow-local-media`. Replies are compared with what the
library generates in this process from the same checkpoint, so every endpoint is shown to run
the model, not a stub.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
import pytest
import soundfile
import torch
from PIL import Image

from mmllm.data.toyworld import render_image, sample_scene, speak
from mmllm.errors import InputError, MediaError
from mmllm.generation import GenerationConfig, Generator, Prompt, decode_replies, encode_prompts
from mmllm.model.mmllm import MMLLM
from mmllm.serving.app import ReplyText, error_fields
from mmllm.serving.intent import reply_modality
from mmllm.serving.worker import BatchingWorker, QueueFull, ScoreJob
from mmllm.training.launch import free_port
from tests.conftest import REPO, random_toy_tokenizers, toy_vocab_layout

MODEL_NAME = "toy"
STARTUP_SECONDS = 60  # importing torch and FastAPI and loading the model take ~5 s on a quiet machine


def start_server(model_dir: Path, log: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, str(REPO / "serve" / "server.py"), "--model", str(model_dir), "--port", str(port)]
    command += ["--device", "cpu", "--model-name", MODEL_NAME, *flags]
    # One intra-op thread unless told otherwise: a tiny model gains nothing from more, and on a small
    # shared machine they only compete with the test process.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with log.open("w") as out:  # the child keeps its own copy of the file
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text()}")
        try:
            if request("127.0.0.1", port, "GET", "/health")[0] == 200:
                return process, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    process.kill()
    pytest.fail(f"the server did not answer /health in {STARTUP_SECONDS} s:\n{log.read_text()}")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


def request(host: str, port: int, method: str, path: str, body=None, headers=None) -> tuple[int, dict | bytes]:
    """(status, parsed JSON or raw bytes) of one raw HTTP request."""
    connection = http.client.HTTPConnection(host, port, timeout=60)
    if isinstance(body, dict):
        body = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        if response.getheader("content-type", "").startswith("application/json"):
            return response.status, json.loads(data)
        return response.status, data
    finally:
        connection.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, text_tokenizer_dir: Path) -> Path:
    """The conftest toy model (random weights, toy layout and tokenizers), saved as a checkpoint."""
    from mmllm.model.config import ModelConfig
    from mmllm.text_tokenizer import load_text_tokenizer

    torch.manual_seed(0)
    tokenizer = load_text_tokenizer(text_tokenizer_dir)
    config = ModelConfig.from_yaml(REPO / "configs" / "model" / "tiny.yaml", ["initializer_range=0.3"])
    model = MMLLM.from_config(config, toy_vocab_layout(tokenizer), tokenizer, random_toy_tokenizers())
    path = tmp_path_factory.mktemp("served") / "model"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(model_dir: Path) -> MMLLM:
    return MMLLM.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    process, address = start_server(model_dir, tmp_path_factory.mktemp("logs") / "server.log")
    yield address
    stop_server(process)


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{server}/v1", api_key="none", max_retries=0)


def raw(server: str, method: str, path: str, body=None, headers=None) -> tuple[int, dict | bytes]:
    host, port = server.split(":")
    return request(host, int(port), method, path, body, headers)


def png_uri(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def wav_file(wave: np.ndarray, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, wave, rate, subtype="PCM_16", format="WAV")
    return buffer.getvalue()


def scene_image(seed: int = 0) -> np.ndarray:
    return render_image(sample_scene(random.Random(seed), 1))


def library_reply(model: MMLLM, prompt: Prompt, max_new_tokens: int, stop_after_span: bool = False):
    """What the library generates for `prompt`, greedily, in this process: (encoded, output, parts)."""
    (encoded,) = encode_prompts(model, [prompt])
    config = GenerationConfig(max_new_tokens=max_new_tokens, stop_after_span=stop_after_span)
    (output,) = Generator(model).generate([encoded.ids], config)
    (parts,) = decode_replies(model, [encoded.reply(output.ids)])
    return encoded, output, parts


def user(content) -> list[dict]:
    return [{"role": "user", "content": content}]


# ---------------------------------------------------------------- intent


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Draw a red circle.", "image"),
        ("Please paint me something", "image"),
        ("Give me a picture of a cat", "image"),
        ("Say: the blue square", "audio"),
        ("Read aloud this line", "audio"),
        ("Animate a circle moving left.", "video"),
        ("move to the green triangle", "action"),
        ("Describe the image.", "text"),
        ("Open the drawer", "text"),  # whole words only
        ("Write an essay", "text"),
        ("Say what a picture of a dog shows", "audio"),  # the first keyword wins
    ],
)
def test_reply_modality_keywords(text, expected):
    assert reply_modality(text, ["image", "audio", "video", "action"]) == expected


def test_reply_modality_only_offers_available_modalities():
    assert reply_modality("Say what a picture of a dog shows", ["image"]) == "image"
    assert reply_modality("Draw a circle", ["audio"]) == "text"


# ---------------------------------------------------------------- chat


def test_chat_text_reply_is_the_library_greedy_reply(client, model):
    reply = client.chat.completions.create(
        model=MODEL_NAME, messages=user("Describe the image."), temperature=0, max_tokens=12
    )
    encoded, output, _ = library_reply(model, Prompt(user("Describe the image.")), 12)
    message = reply.choices[0].message
    assert isinstance(message.content, str)
    assert message.content == ReplyText.content(model.layout, model.text_tokenizer, (), output.ids)
    assert reply.usage.prompt_tokens == len(encoded.ids)
    assert reply.usage.completion_tokens == len(output.ids)
    assert reply.choices[0].finish_reason == {"length": "length", "stop": "stop"}[output.finish_reason]
    assert message.mmllm["reply_modality"] == "text"


def test_chat_image_url_input(client, model):
    image = scene_image()
    content = [{"type": "image_url", "image_url": {"url": png_uri(image)}}, {"type": "text", "text": "Describe it."}]
    reply = client.chat.completions.create(model=MODEL_NAME, messages=user(content), temperature=0, max_tokens=8)
    local = [{"type": "image", "array": image}, {"type": "text", "text": "Describe it."}]
    encoded, output, _ = library_reply(model, Prompt(user(local)), 8)
    assert reply.usage.prompt_tokens == len(encoded.ids) > 64  # the image's 64 codes are in the prompt
    assert reply.choices[0].message.content == ReplyText.content(model.layout, model.text_tokenizer, (), output.ids)


def test_chat_input_audio(client, model):
    wave = speak("the red circle")[:16000]
    audio = {"data": base64.b64encode(wav_file(wave)).decode(), "format": "wav"}
    content = [{"type": "input_audio", "input_audio": audio}, {"type": "text", "text": "Transcribe the speech."}]
    reply = client.chat.completions.create(model=MODEL_NAME, messages=user(content), temperature=0, max_tokens=8)
    stored, _ = soundfile.read(io.BytesIO(wav_file(wave)), dtype="float32")  # what 16-bit PCM keeps of it
    local = [{"type": "audio", "array": stored}, {"type": "text", "text": "Transcribe the speech."}]
    encoded, output, _ = library_reply(model, Prompt(user(local)), 8)
    assert reply.usage.prompt_tokens == len(encoded.ids)
    assert reply.choices[0].message.content == ReplyText.content(model.layout, model.text_tokenizer, (), output.ids)


def test_draw_request_returns_a_png(client, model):
    reply = client.chat.completions.create(model=MODEL_NAME, messages=user("Draw a red circle."), temperature=0)
    message = reply.choices[0].message
    assert message.content == "" and reply.choices[0].finish_reason == "stop"
    assert message.mmllm == {"reply_modality": "image", "flags": []}
    (image,) = message.images
    assert image["type"] == "image_url"
    head, payload = image["image_url"]["url"].split(",", 1)
    assert head == "data:image/png;base64"
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(payload))).convert("RGB"))
    assert decoded.shape == (64, 64, 3)
    _, _, parts = library_reply(model, Prompt(user("Draw a red circle."), reply_modality="image"), 65, True)
    np.testing.assert_array_equal(decoded, parts[0].media)


def test_say_request_returns_a_wav(client):
    reply = client.chat.completions.create(model=MODEL_NAME, messages=user("Say: the blue square"), temperature=0)
    audio = reply.choices[0].message.audio
    assert audio.id.startswith("audio_") and isinstance(audio.transcript, str) and audio.expires_at > 0
    wave, rate = soundfile.read(io.BytesIO(base64.b64decode(audio.data)))
    assert rate == 16000 and 0 < len(wave) <= 2 * rate  # at most the toy codec's 2 s
    assert reply.choices[0].message.content == ""


def test_video_and_action_replies(client):
    video = client.chat.completions.create(model=MODEL_NAME, messages=user("Animate a red circle."), temperature=0)
    (clip,) = video.choices[0].message.videos
    head, payload = clip["video_url"]["url"].split(",", 1)
    assert head == "data:image/gif;base64"
    assert Image.open(io.BytesIO(base64.b64decode(payload))).n_frames == 9
    act = client.chat.completions.create(model=MODEL_NAME, messages=user("move to the red circle"), temperature=0)
    (actions,) = act.choices[0].message.actions
    assert np.asarray(actions).shape == (10, 2)


def test_modalities_field_asks_for_audio(client):
    reply = client.chat.completions.create(
        model=MODEL_NAME,
        messages=user("Describe a circle."),
        modalities=["text", "audio"],
        audio={"voice": "alloy", "format": "wav"},
        temperature=0,
    )
    assert reply.choices[0].message.audio is not None


def test_a_long_prompt_without_max_tokens_gets_the_room_left(client, model):
    text = "a red circle and a blue square " * 60
    prompt_tokens = len(encode_prompts(model, [Prompt(user(text))])[0].ids)
    assert 1024 - 256 < prompt_tokens < 1024  # the default 256 new tokens would not fit the context
    reply = client.chat.completions.create(model=MODEL_NAME, messages=user(text), temperature=0)
    assert reply.usage.total_tokens <= 1024
    for stream in (False, True):  # a stream's error comes before its first event: a plain 400
        with pytest.raises(openai.BadRequestError, match="context"):
            client.chat.completions.create(
                model=MODEL_NAME, messages=user(text), temperature=0, max_tokens=256, stream=stream
            )


def test_a_seeded_sampled_reply_is_reproducible_under_load(client):
    kwargs = {
        "model": MODEL_NAME,
        "messages": user("Tell me a story."),
        "temperature": 1.0,
        "seed": 7,
        "max_tokens": 16,
    }
    first = client.chat.completions.create(**kwargs).choices[0].message.content
    with ThreadPoolExecutor(4) as pool:
        again = list(pool.map(lambda _: client.chat.completions.create(**kwargs).choices[0].message.content, range(4)))
    assert again == [first] * 4


def test_mmllm_extension_chooses_the_reply_and_guidance(client):
    reply = client.chat.completions.create(
        model=MODEL_NAME,
        messages=user("A blue square."),
        temperature=0,
        extra_body={"mmllm": {"reply_modality": "image", "guidance": {"image": 3.0}}},
    )
    assert len(reply.choices[0].message.images) == 1


def test_stream_concatenates_to_the_whole_reply(client):
    kwargs = {"model": MODEL_NAME, "messages": user("Tell me about the shapes."), "temperature": 0, "max_tokens": 24}
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1  # it really streamed
    assert "".join(pieces) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_stream_of_an_image_reply_sends_the_image(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL_NAME, messages=user("Draw a blue square."), temperature=0, stream=True
        )
    )
    images = [c.choices[0].delta.images for c in chunks if c.choices and getattr(c.choices[0].delta, "images", None)]
    assert len(images) == 1 and images[0][0]["image_url"]["url"].startswith("data:image/png;base64,")


# ---------------------------------------------------------------- completions


def direct_logprobs(model: MMLLM, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)


def test_completion_echo_logprobs_score_the_prompt(client, model):
    """lm-eval's loglikelihood request: echo, max_tokens 0, logprobs N."""
    reply = client.completions.create(model=MODEL_NAME, prompt="a red circle", max_tokens=0, echo=True, logprobs=3)
    choice = reply.choices[0]
    ids = [model.layout.token_id("<|bos|>"), *model.text_tokenizer("a red circle", add_special_tokens=False).input_ids]
    assert choice.text == "a red circle"
    assert choice.logprobs.tokens[0] == "<|bos|>" and len(choice.logprobs.tokens) == len(ids)
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    expected = direct_logprobs(model, ids)
    np.testing.assert_allclose(choice.logprobs.token_logprobs[1:], expected.numpy(), atol=1e-4)
    assert all(len(top) == 3 for top in choice.logprobs.top_logprobs[1:])
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == 0


def test_completion_token_prompts_are_scored_as_given(client, model):
    prompts = [[5, 60, 70, 80], [9, 100, 31, 32, 33, 34, 35, 250]]  # different lengths: one padded batch
    reply = client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=0, echo=True, logprobs=1)
    for choice, ids in zip(reply.choices, prompts, strict=True):
        assert choice.logprobs.token_logprobs[0] is None
        np.testing.assert_allclose(choice.logprobs.token_logprobs[1:], direct_logprobs(model, ids).numpy(), atol=1e-4)


def test_completion_generates_and_scores_its_tokens(client, model):
    reply = client.completions.create(
        model=MODEL_NAME, prompt=[[5, 60, 70]], max_tokens=5, temperature=0, echo=True, logprobs=0
    )
    choice = reply.choices[0]
    (output,) = Generator(model, ()).generate([[5, 60, 70]], GenerationConfig(max_new_tokens=5))
    ids = [5, 60, 70, *output.ids]
    assert len(choice.logprobs.tokens) == len(ids)
    np.testing.assert_allclose(choice.logprobs.token_logprobs[1:], direct_logprobs(model, ids).numpy(), atol=1e-4)
    decode = model.text_tokenizer.decode
    assert choice.text == decode([5, 60, 70]) + decode(output.ids)


# ---------------------------------------------------------------- images, audio, models


def test_images_generate(client):
    result = client.images.generate(model=MODEL_NAME, prompt="a red circle", size="64x64")
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.format == "PNG" and image.size == (64, 64)


def test_audio_speech_and_transcription(client, model):
    speech = client.audio.speech.create(model=MODEL_NAME, voice="alloy", input="the red circle", response_format="wav")
    wave, rate = soundfile.read(io.BytesIO(speech.content), dtype="float32")
    assert rate == 16000 and len(wave) > 0
    text = client.audio.transcriptions.create(model=MODEL_NAME, file=("speech.wav", speech.content, "audio/wav"))
    local = [{"type": "audio", "array": wave}, {"type": "text", "text": "Transcribe the speech."}]
    (encoded,) = encode_prompts(model, [Prompt(user(local))])
    (output,) = Generator(model, ()).generate([encoded.ids], GenerationConfig(max_new_tokens=256))
    (parts,) = decode_replies(model, [output.ids])
    assert text.text == "".join(p.text for p in parts)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    status, body = raw(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok"


# ---------------------------------------------------------------- refusals

TEXT = user("hello")
REFUSED_CHATS = {
    "unknown model": ({"model": "gpt-4o", "messages": TEXT}, 404, "model"),
    "max_tokens too high": ({"model": MODEL_NAME, "messages": TEXT, "max_tokens": 10**6}, 400, "max_tokens"),
    "max_completion_tokens too high": (
        {"model": MODEL_NAME, "messages": TEXT, "max_completion_tokens": 10**6},
        400,
        "max_completion_tokens",
    ),
    "too few tokens for an image": (
        {"model": MODEL_NAME, "messages": TEXT, "max_tokens": 5, "mmllm": {"reply_modality": "image"}},
        400,
        "max_tokens",
    ),
    "empty messages": ({"model": MODEL_NAME, "messages": []}, 400, "messages"),
    "unknown role": ({"model": MODEL_NAME, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
    "n > 1": ({"model": MODEL_NAME, "messages": TEXT, "n": 2}, 400, "n"),
    "penalty": ({"model": MODEL_NAME, "messages": TEXT, "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    "temperature out of range": ({"model": MODEL_NAME, "messages": TEXT, "temperature": 7}, 400, "temperature"),
    "unknown parameter": ({"model": MODEL_NAME, "messages": TEXT, "best_friend": 1}, 400, "best_friend"),
    "logprobs on chat": ({"model": MODEL_NAME, "messages": TEXT, "logprobs": True}, 400, "logprobs"),
    "unknown output modality": ({"model": MODEL_NAME, "messages": TEXT, "modalities": ["smell"]}, 400, "modalities"),
    "http image URL": (
        {"model": MODEL_NAME, "messages": user([{"type": "image_url", "image_url": {"url": "http://x.test/a.png"}}])},
        400,
        "messages[0].content[0]",
    ),
    "file URL": (
        {"model": MODEL_NAME, "messages": user([{"type": "image_url", "image_url": {"url": "file:///etc/hostname"}}])},
        400,
        "messages[0].content[0]",
    ),
    "bad base64 image": (
        {
            "model": MODEL_NAME,
            "messages": user([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not base64@@"}}]),
        },
        400,
        "messages[0].content[0]",
    ),
    "bad base64 audio": (
        {
            "model": MODEL_NAME,
            "messages": user([{"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}}]),
        },
        400,
        "messages[0].content[0]",
    ),
    "not an image": (
        {
            "model": MODEL_NAME,
            "messages": user([{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]),
        },
        400,
        "messages[0].content[0]",
    ),
}


def assert_error(status: int, body, expected_status: int, param: str | None = None) -> None:
    assert status == expected_status, body
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param


@pytest.mark.parametrize("case", list(REFUSED_CHATS))
def test_chat_refusals_are_4xx_json(server, case):
    body, status, param = REFUSED_CHATS[case]
    assert_error(*raw(server, "POST", "/v1/chat/completions", body), status, param)


def test_a_local_image_path_is_refused_without_the_flag(server, tmp_path):
    path = tmp_path / "scene.png"
    Image.fromarray(scene_image()).save(path)
    for url in (str(path), path.as_uri()):
        body = {"model": MODEL_NAME, "messages": user([{"type": "image_url", "image_url": {"url": url}}])}
        status, error = raw(server, "POST", "/v1/chat/completions", body)
        assert_error(status, error, 400)
        assert error["error"]["code"] == "invalid_url"


def test_malformed_json_and_wrong_routes(server):
    headers = {"Content-Type": "application/json"}
    assert_error(*raw(server, "POST", "/v1/chat/completions", b'{"model": "toy", "messages": [', headers), 400)
    assert_error(*raw(server, "POST", "/v1/nothing", {"model": MODEL_NAME}), 404)
    assert_error(*raw(server, "GET", "/v1/chat/completions"), 405)


def test_oversized_bodies_are_refused(server):
    big = json.dumps({"model": MODEL_NAME, "messages": user("x" * (17 * 1024 * 1024))}).encode()
    headers = {"Content-Type": "application/json"}
    assert_error(*raw(server, "POST", "/v1/chat/completions", big, headers), 413)  # by its Content-Length
    chunks = (big[i : i + 1024 * 1024] for i in range(0, len(big), 1024 * 1024))
    host, port = server.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("POST", "/v1/chat/completions", body=chunks, headers=headers, encode_chunked=True)
    response = connection.getresponse()  # no Content-Length: counted as it streams in
    assert_error(response.status, json.loads(response.read()), 413)
    connection.close()


def test_other_endpoint_refusals(server):
    cases = [
        ("/v1/completions", {"model": MODEL_NAME, "prompt": "a", "logprobs": 100}, "logprobs"),
        ("/v1/completions", {"model": MODEL_NAME, "prompt": "a", "stream": True}, "stream"),
        ("/v1/completions", {"model": MODEL_NAME, "prompt": "a", "max_tokens": 10**6}, "max_tokens"),
        ("/v1/completions", {"model": MODEL_NAME, "prompt": [[5] * 1100], "max_tokens": 1}, None),  # > context
        ("/v1/completions", {"model": MODEL_NAME, "prompt": [[10**6]]}, "prompt"),
        ("/v1/images/generations", {"model": MODEL_NAME, "prompt": "x", "n": 2}, "n"),
        ("/v1/images/generations", {"model": MODEL_NAME, "prompt": "x", "size": "1024x1024"}, "size"),
        ("/v1/audio/speech", {"model": MODEL_NAME, "input": "x", "voice": "alloy", "speed": 2.0}, "speed"),
        ("/v1/audio/speech", {"model": MODEL_NAME, "input": "x", "voice": "alloy", "response_format": "mp3"}, None),
    ]
    for path, body, param in cases:
        assert_error(*raw(server, "POST", path, body), 400, param)


def test_transcription_refuses_a_file_that_is_not_audio(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(model=MODEL_NAME, file=("notes.wav", b"not a wav file", "audio/wav"))
    assert caught.value.body["param"] == "file"


def test_the_client_sees_openai_errors(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_NAME, messages=TEXT, max_tokens=10**6)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=TEXT)


def test_local_media_flag_reads_files_but_never_urls(model_dir, tmp_path):
    process, address = start_server(model_dir, tmp_path / "server.log", "--allow-local-media")
    try:
        path = tmp_path / "scene.png"
        Image.fromarray(scene_image()).save(path)
        for url in (str(path), path.as_uri()):
            content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe it."}]
            status, body = raw(
                address, "POST", "/v1/chat/completions", {"model": MODEL_NAME, "messages": user(content)}
            )
            assert status == 200 and body["usage"]["prompt_tokens"] > 64
        remote = user([{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}])
        status, body = raw(address, "POST", "/v1/chat/completions", {"model": MODEL_NAME, "messages": remote})
        assert_error(status, body, 400)
    finally:
        stop_server(process)


# ---------------------------------------------------------------- the worker and error mapping


def test_worker_survives_a_failing_job_and_bounds_its_queue(model):
    worker = BatchingWorker(model, max_batch=4, max_queue=2)
    worker.start()
    try:
        with pytest.raises(InputError, match="outside the vocabulary"):
            worker.submit(ScoreJob([1, 10**6])).result(timeout=30)
        assert worker.submit(ScoreJob([1, 2, 3])).result(timeout=30).logprobs[0] is None
    finally:
        worker.stop()
    idle = BatchingWorker(model, max_queue=1)  # not started: jobs wait
    idle.submit(ScoreJob([1, 2]))
    with pytest.raises(QueueFull):
        idle.submit(ScoreJob([1, 2]))


def test_error_statuses():
    assert error_fields(QueueFull("busy"))[0] == 429
    assert error_fields(MediaError("bad file"))[0] == 400
    status, detail = error_fields(RuntimeError("a bug"))
    assert status == 500 and detail.type == "server_error"


# ---------------------------------------------------------------- concurrency


def test_concurrent_requests_equal_sequential_ones(client, server):
    """16 greedy requests at once give what they give one at a time, and were batched."""
    prompts = [f"Tell me about shape {i} and its {'colour' if i % 2 else 'size'}." for i in range(15)]
    prompts.append("Draw a green triangle.")  # a different decode setting (image, stop after span) in the mix
    budgets = [24 if i % 3 else 32 for i in range(15)] + [None]  # rows of one batch with their own max_tokens

    def ask(i: int):
        reply = client.chat.completions.create(
            model=MODEL_NAME, messages=user(prompts[i]), temperature=0, max_tokens=budgets[i]
        )
        choice = reply.choices[0]
        images = (choice.message.model_extra or {}).get("images")
        return choice.message.content, choice.finish_reason, images, reply.usage.completion_tokens

    start = time.perf_counter()
    sequential = [ask(i) for i in range(16)]
    sequential_seconds = time.perf_counter() - start
    before = raw(server, "GET", "/health")[1]
    start = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(ask, range(16)))
    concurrent_seconds = time.perf_counter() - start
    after = raw(server, "GET", "/health")[1]
    assert concurrent == sequential
    assert after["largest_batch"] > 1 and after["batches"] - before["batches"] < 16
    print(f"16 requests: sequential {sequential_seconds:.2f} s, concurrent {concurrent_seconds:.2f} s")


def test_bench_serve_times_batched_against_one_at_a_time(tmp_path, model_dir):
    from mmllm.bench.serve import bench_serve, format_serve_bench

    result = bench_serve(model_dir, requests=4, tokens=4, repeats=1, log=tmp_path / "serve.log")
    assert result["ratio"] > 0 and set(result["requests_per_s"]) == {"sequential", "concurrent"}
    assert "identical replies" in format_serve_bench(result)
