"""The HTTP requests lmms-eval and VLMEvalKit send to an OpenAI-compatible server, replayed against
a real `mmllm serve` (a tiny random model on CPU) with a raw HTTP client.

Each test rebuilds, field for field, the body and headers one harness's code builds, and checks
the reply has what that harness reads. The shapes were read (not copied) from:

lmms-eval (EvolvingLMMs-Lab/lmms-eval), through the official `openai` client, so
`POST {OPENAI_API_BASE}/chat/completions` with `Authorization: Bearer {OPENAI_API_KEY}`:
  - lmms_eval/models/simple/openai_compatible.py @ 86490ff74d50750ae89cc891138e6e3aeecb611e and
    lmms_eval/models/simple/openai.py @ 5ab23acca107914cba35354718ecc54330ca7c3f: one user message,
    the task's text first, then every image (video frames too) as a `data:image/png;base64` URL;
    `max_tokens` = the task's max_new_tokens (1024 if unset, capped at 4096), `temperature` (0 if
    unset); reads `choices[0].message.content`; any exception is retried `max_retries` (5) times
    and the answer becomes "" (newer: "[LMMS_EVAL_REQUEST_FAILED ...]"). Its `gpt4v` model
    (lmms_eval/models/simple/gpt4v.py @ e7f11c555b17be1ff609f0deb2c22b59ff21fa9b) builds the same body.
  - lmms_eval/models/chat/openai_compatible.py @ c08eb2e799185328a4f84126ec19601bae04b435,
    lmms_eval/models/chat/openai.py @ a8778611fed7029d31760ad050853e51f99de720 and
    lmms_eval/protocol.py @ 038b4a7e760b9bf8de6c5bf39a2cc1b74134f2b5 (`ChatMessages.to_openai_messages`):
    the task's own messages, a system message's content being a list of text parts, images
    before the question; reads `usage.completion_tokens` as well. In the newest registry
    (lmms_eval/models/__init__.py) `openai_compatible` is an alias of `openai`, whose chat class
    is the one used.
  - lmms_eval/tasks/mme/mme.yaml (quoted in docs/task_guide.md): MME asks max_new_tokens 16,
    temperature 0.

VLMEvalKit (open-compass/VLMEvalKit), class GPT4V / OpenAIWrapper, through `requests.post` to
`api_base` exactly as given (the full .../v1/chat/completions URL), headers `Content-Type:
application/json` and `Authorization: Bearer {key}` (the key must start with "sk-"):
  - vlmeval/api/gpt.py @ 00006c5b9371be33d81e8685d3ed4e1a88e9e9dd (and the older
    @ db06c90754992d0523c04fb7ce5dd4701791f7ff, whose only differences are max_tokens 1024 and no
    reasoning-model branch): body `model`, `messages` (an optional system message with string
    content, then a user message whose content lists text parts and `image_url` parts with a
    `data:image/jpeg;base64` URL and `detail` "low" by default), `n`: 1, `temperature` (0),
    `max_tokens` (2048 by default); reads `choices[0]['message']['content'].strip()` when the
    status is 2xx, else retries.
  - vlmeval/api/base.py @ f60eb8835888a260aa285bdce376c41c2563276b: `working()` probes with a
    text-only "hello"; an empty answer counts as a failure and is retried.
  - vlmeval/dataset/image_base.py @ 895762d302b923d9d1f24ac16a7a2cbc461bb1cf: images, then the
    question; vlmeval/smp/vlm.py `encode_image_to_base64`: JPEG, images with an edge under 100 px
    scaled up to 100.

The server runs with `--text-replies`, as docs/harnesses.md says to run it for harnesses: a
benchmark question is never a request to draw or speak, whatever words it contains, and its
reply holds text only.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image

from mmllm.model.mmllm import MMLLM
from tests.test_server import (
    MODEL_NAME,
    model_dir,  # noqa: F401  (the checkpoint fixture, used by name)
    raw,
    scene_image,
    start_server,
    stop_server,
)

CHAT_PATH = "/v1/chat/completions"
MME_MAX_NEW_TOKENS = 16  # lmms-eval's tasks/mme/mme.yaml generation_kwargs
VLMEVAL_MAX_TOKENS = 64  # what docs/harnesses.md sets: GPT4V's default 2048 is the toy model's whole context
VLMEVAL_DEFAULT_MAX_TOKENS = 2048  # GPT4V's own default, beyond the tiny model's 1024-token context
LMMS_EVAL_DEFAULT_MODEL = "grok-2-latest"  # lmms-eval's model_version when --model_args does not set it
VLMEVAL_MIN_EDGE = 100  # VLMEvalKit's VLMEVAL_MIN_IMAGE_EDGE default: smaller images are scaled up to it
# Headers the official openai client (which lmms-eval uses) sends besides Content-Type.
OPENAI_CLIENT_HEADERS = {
    "Authorization": "Bearer unused",
    "Accept": "application/json",
    "User-Agent": f"OpenAI/Python {openai.__version__}",
    "X-Stainless-Lang": "python",
    "X-Stainless-Retry-Count": "0",
}
# Headers VLMEvalKit's OpenAIWrapper sets itself (requests adds its User-Agent and Accept: */*).
VLMEVAL_HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-unused"}
# A question whose words would ask the default server for media: "picture of" draws, "say" speaks.
KEYWORD_QUESTION = "Is this a picture of a red circle? Say yes or no."


@pytest.fixture(scope="module")
def harness_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811
    process, address = start_server(model_dir, tmp_path_factory.mktemp("logs") / "server.log", "--text-replies")
    yield address
    stop_server(process)


@pytest.fixture(scope="module")
def image_ids(model_dir: Path) -> int:  # noqa: F811
    """Ids one image takes in a prompt: its codes plus its span's begin and end tokens."""
    return MMLLM.from_pretrained(model_dir).layout.modality("image").max_length + 2


def data_url(image: np.ndarray, fmt: str) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def lmms_eval_image(seed: int) -> dict:
    """An image part as lmms-eval's encode_image builds it: the PIL image saved as PNG, no `detail`."""
    return {"type": "image_url", "image_url": {"url": data_url(scene_image(seed), "PNG")}}


def vlmeval_image(seed: int) -> dict:
    """An image part as VLMEvalKit's prepare_itlist builds it: JPEG, scaled up to the minimum edge, `detail` low."""
    image = Image.fromarray(scene_image(seed)).resize((VLMEVAL_MIN_EDGE, VLMEVAL_MIN_EDGE))
    return {"type": "image_url", "image_url": {"url": data_url(np.asarray(image), "JPEG"), "detail": "low"}}


def vlmeval_body(messages: list[dict], max_tokens: int = VLMEVAL_MAX_TOKENS) -> dict:
    """GPT4V's payload: model, messages, n=1, temperature 0, max_tokens (its order, for the record)."""
    return {"model": MODEL_NAME, "messages": messages, "n": 1, "temperature": 0, "max_tokens": max_tokens}


def harness_reply(server: str, body: dict, headers: dict, min_prompt_tokens: int) -> str:
    """POST one chat request; check the fields both harnesses read and return the reply text."""
    status, reply = raw(server, "POST", CHAT_PATH, body, headers)
    assert status == 200, reply
    (choice,) = reply["choices"]
    assert set(choice["message"]) == {"role", "content", "mmllm"}  # text only: no images, audio, videos, actions
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["message"]["mmllm"]["reply_modality"] == "text"
    assert choice["finish_reason"] in ("stop", "length")
    usage = reply["usage"]
    assert 0 <= usage["completion_tokens"] <= body["max_tokens"]
    assert usage["prompt_tokens"] >= min_prompt_tokens  # every image was read into the prompt
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    return choice["message"]["content"]


@pytest.mark.parametrize("path", ["simple", "chat"])
def test_lmms_eval_openai_compatible_requests(harness_server, image_ids, path):
    """lmms-eval's `openai_compatible` model on an MME-style item with two images: its simple path
    (text, then the images) and its chat path (a list-content system message, images, question)."""
    if path == "simple":
        content = [{"type": "text", "text": KEYWORD_QUESTION}, lmms_eval_image(0), lmms_eval_image(1)]
        messages = [{"role": "user", "content": content}]
    else:
        system = {"role": "system", "content": [{"type": "text", "text": "Answer with one word."}]}
        content = [lmms_eval_image(0), lmms_eval_image(1), {"type": "text", "text": KEYWORD_QUESTION}]
        messages = [system, {"role": "user", "content": content}]
    body = {"messages": messages, "model": MODEL_NAME, "max_tokens": MME_MAX_NEW_TOKENS, "temperature": 0}
    harness_reply(harness_server, body, OPENAI_CLIENT_HEADERS, 2 * image_ids)


def test_vlmevalkit_gpt4v_requests(harness_server, image_ids):
    """VLMEvalKit's GPT4V: its "hello" probe, then a two-image item with a system prompt; the item
    sent again answers the same (temperature 0), so a retried item keeps its score."""
    hello = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    harness_reply(harness_server, vlmeval_body(hello), VLMEVAL_HEADERS, 1)
    content = [vlmeval_image(0), vlmeval_image(1), {"type": "text", "text": KEYWORD_QUESTION}]
    system = {"role": "system", "content": "You are a careful visual assistant."}
    item = vlmeval_body([system, {"role": "user", "content": content}])
    first = harness_reply(harness_server, item, VLMEVAL_HEADERS, 2 * image_ids)
    assert harness_reply(harness_server, item, VLMEVAL_HEADERS, 2 * image_ids) == first


def test_what_the_harnesses_get_when_a_request_cannot_be_served(harness_server):
    """The 4xx answers a harness logs before it retries: a remote image URL (never fetched), GPT4V's
    default max_tokens beyond the model's context, lmms-eval's default model name."""
    remote = [{"type": "image_url", "image_url": {"url": "https://example.com/a.jpg", "detail": "low"}}]
    status, error = raw(harness_server, "POST", CHAT_PATH, vlmeval_body([{"role": "user", "content": remote}]))
    assert status == 400 and error["error"]["code"] == "invalid_url"
    assert "does not fetch URLs" in error["error"]["message"] and "data: URI" in error["error"]["message"]

    hello = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    too_long = vlmeval_body(hello, VLMEVAL_DEFAULT_MAX_TOKENS)
    status, error = raw(harness_server, "POST", CHAT_PATH, too_long, VLMEVAL_HEADERS)
    assert status == 400 and error["error"]["code"] == "context_length_exceeded"

    default_model = {"messages": hello, "model": LMMS_EVAL_DEFAULT_MODEL, "max_tokens": 1024, "temperature": 0}
    status, error = raw(harness_server, "POST", CHAT_PATH, default_model, OPENAI_CLIENT_HEADERS)
    assert status == 404 and error["error"]["code"] == "model_not_found"
