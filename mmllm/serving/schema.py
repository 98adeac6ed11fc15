"""Request and response bodies of the OpenAI-compatible API, and the server's limits.

Requests are validated strictly: an unknown parameter, or a known one with a value the server
cannot honour, is refused with a 400 rather than ignored, so a client never believes it got
what it did not. Parameters accepted and ignored, because they change nothing about the output,
are marked as such. Our own extensions travel in one `mmllm` object (`MmllmOptions`).

Chat replies put generated media beside `content` (which is always a string: the reply's text,
media left out):

    message.audio    OpenAI's shape {id, data: base64 WAV, transcript, expires_at}; several
                     audio spans in one reply are joined into one WAV
    message.images   [{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]
    message.videos   [{"type": "video_url", "video_url": {"url": "data:image/gif;base64,..."}}]
    message.actions  [[[dx, dy], ...], ...]: one (steps, dims) list of floats per action chunk
    message.mmllm    {"reply_modality": ..., "flags": [...]}: decode flags of malformed spans
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# ---------------------------------------------------------------- limits


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for. Requests beyond a limit are refused (4xx), never clamped."""

    # Most new tokens per request: bounds one request's decode time and KV cache; a video
    # span of the toy layout is 194 ids, a long text answer a few hundred.
    max_tokens: int = 2048
    # New tokens of a chat reply when the client does not say: GenerationConfig's default.
    default_max_tokens: int = 256
    # Request body size: a few images or seconds of WAV as base64; bounds memory per request.
    max_body_bytes: int = 16 * 1024 * 1024
    # Requests decoded as one batch: a step of a small model costs about the same for 1 or 16 rows.
    max_batch: int = 16
    # Requests waiting for the worker before new ones get a 429: 16 full batches.
    max_queue: int = 256
    # Prompts in one /v1/completions request (each is its own row): eval harnesses send 1-32.
    max_prompts: int = 64
    # Media parts in one chat request: each is tokenized before decoding starts.
    max_media_parts: int = 16
    # Stop strings per request (OpenAI's limit), and their length: the generator decodes the
    # reply's last (longest + 8) ids after every step to look for them.
    max_stop: int = 4
    max_stop_chars: int = 256
    # Alternatives per position in /v1/completions logprobs (OpenAI allows 5; lm-eval asks for 1-10).
    max_logprobs: int = 20


# ---------------------------------------------------------------- shared


class APIModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MmllmOptions(APIModel):
    """Our extensions, in a request's `mmllm` object."""

    reply_modality: str | None = None  # chat: "text" or a modality the model generates
    guidance: dict[str, float] = Field(default_factory=dict)  # CFG scale per modality, e.g. {"image": 3.0}
    repetition_penalty: float = Field(1.0, gt=0)  # CTRL's penalty; OpenAI's frequency/presence penalties are not it
    top_k: int = Field(0, ge=0)  # 0: no top-k cut
    # For /v1/images/generations and /v1/audio/speech, which have no sampling parameters of their own:
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None


Stop = str | list[str] | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ---------------------------------------------------------------- chat


class TextPart(APIModel):
    type: Literal["text"]
    text: str


class ImageURL(APIModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted, ignored: images are tokenized at one resolution


class ImageURLPart(APIModel):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(APIModel):
    data: str  # base64 of the file's bytes (no data: prefix), as OpenAI's clients send it
    format: Literal["wav", "mp3", "flac", "ogg"]


class InputAudioPart(APIModel):
    type: Literal["input_audio"]
    input_audio: InputAudio


class VideoURL(APIModel):
    url: str  # data:image/gif;base64,... or data:application/x-npy;base64,...


class VideoURLPart(APIModel):
    """Our extension (vLLM's part name): a video clip."""

    type: Literal["video_url"]
    video_url: VideoURL


class InputAction(APIModel):
    data: list[list[float]]  # (steps, dims)


class InputActionPart(APIModel):
    """Our extension: a chunk of robot actions."""

    type: Literal["input_action"]
    input_action: InputAction


ContentPart = Annotated[
    TextPart | ImageURLPart | InputAudioPart | VideoURLPart | InputActionPart, Field(discriminator="type")
]


class ChatMessage(APIModel):
    role: Literal["system", "developer", "user", "assistant"]  # developer is OpenAI's newer name for system
    content: str | list[ContentPart] | None = None
    name: str | None = None  # accepted, ignored: the chat template has no speaker names


class StreamOptions(APIModel):
    include_usage: bool = False


class AudioOptions(APIModel):
    voice: str | None = None  # accepted, ignored: the model has one voice
    format: Literal["wav"] = "wav"


class ResponseFormat(APIModel):
    type: Literal["text"]


class ChatCompletionRequest(APIModel):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)  # None: 1, OpenAI's default; 0 is greedy
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: int | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    modalities: list[str] | None = None
    audio: AudioOptions | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None  # accepted, ignored: only meaningful with tools
    user: str | None = None  # accepted, ignored
    store: Literal[False] | None = None  # nothing is stored
    metadata: dict[str, str] | None = None  # accepted, ignored
    mmllm: MmllmOptions | None = None


class ImageURLOut(BaseModel):
    url: str


class ImageOut(BaseModel):
    type: Literal["image_url"] = "image_url"
    image_url: ImageURLOut


class VideoOut(BaseModel):
    type: Literal["video_url"] = "video_url"
    video_url: ImageURLOut


class AudioOut(BaseModel):
    id: str
    data: str  # base64 WAV
    transcript: str  # the reply's text, when it has any besides the audio
    expires_at: int  # nothing is kept for later turns: the audio expires when it is sent


class ReplyInfo(BaseModel):
    reply_modality: str
    flags: list[str] = Field(default_factory=list)


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    audio: AudioOut | None = None
    images: list[ImageOut] | None = None
    videos: list[VideoOut] | None = None
    actions: list[list[list[float]]] | None = None
    mmllm: ReplyInfo | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: str
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


# ---------------------------------------------------------------- completions


class CompletionRequest(APIModel):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default; 0 with echo scores the prompt alone
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1)
    best_of: int | None = Field(None, ge=1)
    stream: bool = False
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    stop: Stop = None
    seed: int | None = None
    suffix: str | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted, ignored
    mmllm: MmllmOptions | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None for a prompt's first token: nothing precedes it
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


# ---------------------------------------------------------------- images and audio


class ImageGenerationRequest(APIModel):
    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int | None = Field(None, ge=1)
    size: str | None = None  # "auto" or the image tokenizer's own size, e.g. "64x64"
    response_format: Literal["b64_json", "url"] | None = None  # url: a data: URI
    output_format: Literal["png"] | None = None
    quality: Literal["auto", "standard"] | None = None
    user: str | None = None  # accepted, ignored
    mmllm: MmllmOptions | None = None


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImageGenerationResponse(BaseModel):
    created: int
    data: list[ImageData]


class SpeechRequest(APIModel):
    model: str
    input: str = Field(min_length=1, max_length=4096)  # OpenAI's limit
    voice: str | dict[str, Any]  # accepted, ignored: the model has one voice
    response_format: Literal["wav"] | None = None
    speed: float | None = Field(None, ge=0.25, le=4.0)  # only 1.0 is honoured
    instructions: str | None = None
    stream_format: Literal["audio"] | None = None
    mmllm: MmllmOptions | None = None


class Transcription(BaseModel):
    text: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mmllm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
