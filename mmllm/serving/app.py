"""The OpenAI-compatible HTTP API: `create_app(model, ...)` returns the FastAPI app `mmllm serve` runs.

    POST /v1/chat/completions      text, image_url, input_audio (and our video_url, input_action)
                                   parts; replies in text or any modality the model generates;
                                   `stream: true` over server-sent events
    POST /v1/completions           plain continuation with `logprobs` and `echo` (lm-eval's
                                   loglikelihood requests: echo, max_tokens 0, logprobs N)
    POST /v1/images/generations    an image reply to the prompt, PNG
    POST /v1/audio/speech          the input spoken, WAV
    POST /v1/audio/transcriptions  multipart upload of an audio file -> its text
    GET  /v1/models, /v1/models/{id}, /health

The reply modality of a chat request is, in order: `mmllm.reply_modality`; the one non-text
entry of OpenAI's `modalities` (["text", "audio"] asks for audio; ["text"] forbids media
altogether); else the last user message's words (`mmllm.serving.intent`), or text only (as
`modalities: ["text"]`) when the server runs with `--text-replies`, as OpenAI does: eval
harnesses ask "Is this a picture of a dog?" and never set `modalities`. A media reply opens
with that modality's begin token and ends when its span closes. See schema.py for where media
come back in a reply.

Sampling: `temperature` (default 1, OpenAI's; 0 is greedy), `top_p`, `seed`, `stop` (strings,
cut from the reply as OpenAI does), `max_tokens` / `max_completion_tokens`. OpenAI's frequency
and presence penalties are not CTRL's repetition penalty, so non-zero values are refused;
`mmllm.repetition_penalty` and `mmllm.top_k` are ours. `/v1/completions` logprobs are the
model's raw next-token distribution over the whole vocabulary (what likelihood evals compare),
not the masked distribution sampling draws from. A string prompt there is the document prefix
`<|bos|> text` (its `<|bos|>` is echoed as the first token, with a null logprob); a token-id
prompt is used exactly as given.

Every error is OpenAI's JSON shape `{"error": {"message", "type", "param", "code"}}`: a 4xx
for anything about the request (bad JSON, values out of range or beyond the server's limits,
unknown model, unreadable media, refused URLs, a body over the size limit), a 429 when the
queue is full, and a 500 only for a bug.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from email import policy as email_policy
from email.parser import BytesParser
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from mmllm.chat_template import encode_text
from mmllm.data.media import DEFAULT_AUDIO_RATE, check_actions
from mmllm.errors import ConfigError, MediaError, MMLLMError
from mmllm.generation.generator import Generator
from mmllm.generation.guidance import Guidance
from mmllm.generation.prompts import OutputPart, Prompt
from mmllm.generation.sampling import SamplingParams
from mmllm.serving import media
from mmllm.serving.intent import reply_modality
from mmllm.serving.schema import (
    AudioOut,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ErrorDetail,
    ErrorResponse,
    ImageData,
    ImageGenerationRequest,
    ImageGenerationResponse,
    ImageOut,
    ImageURLOut,
    ImageURLPart,
    InputActionPart,
    InputAudioPart,
    MmllmOptions,
    ModelCard,
    ModelList,
    ReplyInfo,
    ServerLimits,
    SpeechRequest,
    TextPart,
    Transcription,
    Usage,
    VideoOut,
    VideoURLPart,
)
from mmllm.serving.worker import (
    BatchingWorker,
    ContextLengthError,
    DecodeSettings,
    GenerationJob,
    GenerationResult,
    QueueFull,
    ScoreJob,
    ScoreResult,
)

logger = logging.getLogger(__name__)

# How the audio and images endpoints ask the model, in the toy world's instruction wording.
SPEECH_PROMPT = "Say: {input}"
TRANSCRIBE_PROMPT = "Transcribe the speech."
FINISH_REASONS = {"stop": "stop", "span": "stop", "length": "length"}  # a closed media span is a natural stop
OFFSET_WINDOW = 4  # text ids decoded before a token to measure its text (spacing depends on the neighbour)


class APIError(Exception):
    """A refused request: its HTTP status and OpenAI's error fields."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str = ""
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")


def error_response(status: int, message: str, kind: str, param: str | None = None, code: str | None = None):
    body = ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


@dataclass
class ChatPlan:
    job: GenerationJob
    reply_modality: str
    stop: tuple[str, ...]


class Service:
    """Turns API requests into worker jobs and results into API responses."""

    def __init__(
        self,
        model,
        worker: BatchingWorker,
        limits: ServerLimits,
        model_name: str,
        policy: media.MediaPolicy,
        text_replies: bool = False,
    ) -> None:
        self.model = model
        self.layout = model.layout
        self.tokenizer = model.text_tokenizer
        self.worker = worker
        self.limits = limits
        self.model_name = model_name
        self.policy = policy
        self.text_replies = text_replies  # True: a request that names no reply modality gets text only
        self.generatable = Generator(model).generatable
        self.created = int(time.time())
        self._token_strings: dict[int, str] = {}

    # ---------------------------------------------------------------- checks shared by endpoints

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(
                404,
                f"model {name!r} does not exist; this server serves {self.model_name!r}",
                "model",
                "model_not_found",
            )

    def _max_tokens(self, requested: int | None, reply: str, param: str) -> int:
        if requested is not None and requested > self.limits.max_tokens:
            raise _bad(
                f"{param} {requested} is more than this server's limit of {self.limits.max_tokens}",
                param,
                "max_tokens_exceeded",
            )
        need = None if reply == "text" else self.layout.modality(reply).max_length + 1  # codes, then the end token
        if need is not None and need > self.limits.max_tokens:
            raise _bad(
                f"a {reply} reply needs {need} tokens, more than this server's limit of {self.limits.max_tokens}",
                param,
                "max_tokens_exceeded",
            )
        if requested is None:
            return need or self.limits.default_max_tokens
        if need is not None and requested < need:
            raise _bad(f"{param} {requested} is too few for a {reply} reply, which takes {need} tokens", param)
        return requested

    def _stop(self, stop: str | list[str] | None) -> tuple[str, ...]:
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if len(stops) > self.limits.max_stop:
            raise _bad(f"at most {self.limits.max_stop} stop strings, got {len(stops)}", "stop")
        for s in stops:
            if not s or len(s) > self.limits.max_stop_chars:
                raise _bad(f"stop strings must have 1 to {self.limits.max_stop_chars} characters", "stop")
        return stops

    def _settings(
        self,
        temperature: float | None,
        top_p: float | None,
        seed: int | None,
        options: MmllmOptions,
        stop: tuple[str, ...],
        reply: str,
        generatable: tuple[str, ...] | None,
    ) -> DecodeSettings:
        temperature = 1.0 if temperature is None else temperature  # OpenAI's default
        greedy = temperature == 0.0  # then top-k, top-p and the seed change nothing: drop them, so batches form
        sampling = SamplingParams(
            temperature=temperature,
            top_k=0 if greedy else options.top_k,
            top_p=1.0 if greedy or top_p is None else top_p,
            repetition_penalty=options.repetition_penalty,
        )
        try:
            guidance = Guidance(dict(options.guidance))
        except ConfigError as err:
            raise _bad(str(err), "mmllm.guidance") from None
        return DecodeSettings(sampling, guidance, stop, reply != "text", 0 if greedy else seed, generatable)

    @staticmethod
    def _refuse_common(request: ChatCompletionRequest | CompletionRequest) -> None:
        if request.n is not None and request.n > 1:
            raise _bad("n > 1 is not supported: send one request per reply", "n")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(request, name):
                raise _bad(f"{name} is not supported; mmllm.repetition_penalty is CTRL's penalty", name)
        if request.logit_bias:
            raise _bad("logit_bias is not supported", "logit_bias")
        options = request.mmllm or MmllmOptions()
        for name in ("temperature", "top_p", "seed"):
            if getattr(options, name) is not None:
                raise _bad(f"use the request's own {name}, not mmllm.{name}", f"mmllm.{name}")

    # ---------------------------------------------------------------- chat

    def chat_plan(self, request: ChatCompletionRequest) -> ChatPlan:
        """Validate a chat request and build its job (decodes its media: run in a thread)."""
        self.check_model(request.model)
        self._refuse_common(request)
        if request.logprobs or request.top_logprobs:
            raise _bad("logprobs are not supported on chat completions; use /v1/completions", "logprobs")
        if request.tools or request.tool_choice not in (None, "none"):
            raise _bad("tools are not supported", "tools")
        if request.max_tokens and request.max_completion_tokens and request.max_tokens != request.max_completion_tokens:
            raise _bad("max_tokens and max_completion_tokens disagree; give one", "max_completion_tokens")
        options = request.mmllm or MmllmOptions()
        reply, generatable = self._chat_reply_modality(request, options)
        param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        requested = request.max_completion_tokens or request.max_tokens
        max_tokens = self._max_tokens(requested, reply, param)
        stop = self._stop(request.stop)
        settings = self._settings(request.temperature, request.top_p, request.seed, options, stop, reply, generatable)
        prompt = Prompt(self._chat_messages(request), reply_modality=reply)
        job = GenerationJob(settings, max_tokens, prompt=prompt, fit_context=requested is None and reply == "text")
        return ChatPlan(job, reply, stop)

    def _chat_reply_modality(
        self, request: ChatCompletionRequest, options: MmllmOptions
    ) -> tuple[str, tuple[str, ...] | None]:
        """(reply modality, the modalities the reply may open; None: all the model generates)."""
        allowed = None
        if request.modalities is not None:
            unknown = [m for m in request.modalities if m != "text" and m not in self.generatable]
            if unknown:
                can = ", ".join(["text", *self.generatable])
                raise _bad(
                    f"modalities: this model cannot generate {', '.join(unknown)} (it generates {can})", "modalities"
                )
            allowed = tuple(dict.fromkeys(m for m in request.modalities if m != "text"))
        if options.reply_modality is not None:
            reply = options.reply_modality
            if reply != "text" and reply not in self.generatable:
                can = ", ".join(["text", *self.generatable])
                raise _bad(f"this model cannot reply in {reply!r} (it generates {can})", "mmllm.reply_modality")
            if allowed is not None and reply != "text" and reply not in allowed:
                raise _bad(f"mmllm.reply_modality {reply!r} is not in modalities", "mmllm.reply_modality")
            return reply, allowed
        if allowed is not None:
            if len(allowed) > 1:
                raise _bad("modalities lists several media; choose the reply's with mmllm.reply_modality", "modalities")
            return (allowed[0] if allowed else "text"), allowed
        if self.text_replies:
            return "text", ()
        return reply_modality(_last_user_text(request), self.generatable), None

    def _chat_messages(self, request: ChatCompletionRequest) -> list[dict[str, Any]]:
        messages, media_parts = [], 0
        for i, message in enumerate(request.messages):
            role = "system" if message.role == "developer" else message.role
            if message.content is None or isinstance(message.content, str):
                messages.append({"role": role, "content": message.content or ""})
                continue
            content = []
            for j, part in enumerate(message.content):
                if isinstance(part, TextPart):
                    content.append({"type": "text", "text": part.text})
                    continue
                media_parts += 1
                if media_parts > self.limits.max_media_parts:
                    raise _bad(f"at most {self.limits.max_media_parts} media parts per request", "messages")
                content.append(self._media_part(part, f"messages[{i}].content[{j}]"))
            messages.append({"role": role, "content": content})
        return messages

    def _media_part(self, part, where: str) -> dict[str, Any]:
        modality = {ImageURLPart: "image", InputAudioPart: "audio", VideoURLPart: "video", InputActionPart: "action"}[
            type(part)
        ]
        tokenizer = self.model.modality_tokenizers.get(modality)
        if tokenizer is None:
            raise _bad(f"{where}: this model takes no {modality} input", where)
        rate = getattr(tokenizer, "sample_rate", DEFAULT_AUDIO_RATE)
        try:
            if isinstance(part, ImageURLPart):
                array = media.load_url(part.image_url.url, "image", self.policy, where, rate)
            elif isinstance(part, VideoURLPart):
                array = media.load_url(part.video_url.url, "video", self.policy, where, rate)
            elif isinstance(part, InputAudioPart):
                data = media.decode_base64(part.input_audio.data, where)
                array = media.decode_bytes("audio", data, part.input_audio.format, where, rate)
            else:
                array = check_actions(part.input_action.data, where)
        except MediaError as err:
            raise _bad(str(err), where, getattr(err, "code", "invalid_media")) from None
        return {"type": modality, "array": array}

    def chat_message(self, result: GenerationResult, plan: ChatPlan) -> ChatMessageOut:
        """The reply message: text in `content`, each medium encoded (PNG/WAV/GIF: run in a thread)."""
        content = ReplyText.content(self.layout, self.tokenizer, plan.stop, result.reply_ids)
        flags = [f"{p.kind}: {p.flag}" for p in result.parts if p.flag]
        decoded = [p for p in result.parts if p.kind != "text" and p.media is not None]
        images = [
            ImageOut(image_url=ImageURLOut(url=media.data_uri("image/png", media.png_bytes(p.media))))
            for p in decoded
            if p.kind == "image"
        ]
        videos = [
            VideoOut(video_url=ImageURLOut(url=media.data_uri("image/gif", media.gif_bytes(p.media))))
            for p in decoded
            if p.kind == "video"
        ]
        actions = [np.asarray(p.media, dtype=np.float64).tolist() for p in decoded if p.kind == "action"]
        waves = [p for p in decoded if p.kind == "audio"]
        flags += [
            f"{p.kind}: no reply field for this modality"
            for p in decoded
            if p.kind not in ("image", "video", "action", "audio")
        ]
        audio = None
        if waves:
            wave = np.concatenate([np.asarray(p.media, dtype=np.float32) for p in waves])
            data = media.b64(media.wav_bytes(wave, waves[0].sample_rate or DEFAULT_AUDIO_RATE))
            audio = AudioOut(id=f"audio_{uuid.uuid4().hex}", data=data, transcript=content, expires_at=int(time.time()))
        return ChatMessageOut(
            content=content,
            audio=audio,
            images=images or None,
            videos=videos or None,
            actions=actions or None,
            mmllm=ReplyInfo(reply_modality=plan.reply_modality, flags=flags),
        )

    def chat_response(self, result: GenerationResult, plan: ChatPlan) -> ChatCompletionResponse:
        return ChatCompletionResponse(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=self.model_name,
            choices=[
                ChatChoice(
                    index=0, message=self.chat_message(result, plan), finish_reason=FINISH_REASONS[result.finish_reason]
                )
            ],
            usage=_usage(len(result.prompt_ids), len(result.new_ids)),
        )

    async def chat_stream(self, plan: ChatPlan, include_usage: bool) -> StreamingResponse:
        """Start the job; once its first id (or its error) is in, answer with an SSE stream."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        done = object()
        plan.job.on_token = lambda token: loop.call_soon_threadsafe(events.put_nowait, token)
        future = self.worker.submit(plan.job)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(events.put_nowait, done))
        first = await events.get()
        if first is done:
            future.result()  # raises the job's error, answered as a plain JSON error
        return StreamingResponse(
            self._sse(plan, include_usage, events, first, done, future), media_type="text/event-stream"
        )

    async def _sse(self, plan: ChatPlan, include_usage: bool, events: asyncio.Queue, event, done, future):
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict[str, Any], finish_reason: str | None = None, usage: Usage | None = None) -> str:
            body: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model_name,
            }
            body["choices"] = (
                [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
            )
            if usage:
                body["usage"] = usage.model_dump()
            return f"data: {json.dumps(body)}\n\n"

        yield chunk({"role": "assistant", "content": ""})
        text = ReplyText(self.layout, self.tokenizer, plan.stop)
        while event is not done:
            piece = text.push(event)
            if piece:
                yield chunk({"content": piece})
            event = await events.get()
        try:
            result = future.result()
            message = await run_in_threadpool(self.chat_message, result, plan)
        except Exception as err:
            detail = error_fields(err)[1]
            yield f"data: {json.dumps({'error': detail.model_dump()})}\n\n"
            return
        rest = text.close()
        if rest:
            yield chunk({"content": rest})
        yield chunk(message.model_dump(exclude_none=True, include={"audio", "images", "videos", "actions", "mmllm"}))
        yield chunk({}, FINISH_REASONS[result.finish_reason])
        if include_usage:
            yield chunk({}, usage=_usage(len(result.prompt_ids), len(result.new_ids)))
        yield "data: [DONE]\n\n"

    # ---------------------------------------------------------------- completions

    async def completions(self, request: CompletionRequest) -> CompletionResponse:
        self.check_model(request.model)
        self._refuse_common(request)
        if request.stream:
            raise _bad("stream is supported on /v1/chat/completions only", "stream")
        if request.best_of is not None and request.best_of > 1:
            raise _bad("best_of > 1 is not supported", "best_of")
        if request.suffix:
            raise _bad("suffix (insertion) is not supported", "suffix")
        options = request.mmllm or MmllmOptions()
        if options.reply_modality not in (None, "text") or options.guidance:
            raise _bad("a completion is text: mmllm.reply_modality and mmllm.guidance do not apply", "mmllm")
        if request.logprobs is not None and request.logprobs > self.limits.max_logprobs:
            raise _bad(
                f"logprobs {request.logprobs} is more than this server's limit of {self.limits.max_logprobs}",
                "logprobs",
            )
        max_tokens = self._max_tokens(request.max_tokens, "text", "max_tokens")
        prompts = self._completion_prompts(request.prompt)
        stop = self._stop(request.stop)
        settings = self._settings(request.temperature, request.top_p, request.seed, options, stop, "text", ())
        if max_tokens:
            jobs = [GenerationJob(settings, max_tokens, ids=ids) for ids, _ in prompts]
            results: Sequence[GenerationResult | None] = await asyncio.gather(*(self.worker.run(j) for j in jobs))
        else:
            for ids, _ in prompts:
                if len(ids) > self.worker.context_length:
                    raise ContextLengthError(
                        f"the prompt ({len(ids)} tokens) is longer than the model's context "
                        f"of {self.worker.context_length} tokens"
                    )
            results = [None] * len(prompts)
        kept = [self._kept(result, stop) for result in results]
        scores: Sequence[ScoreResult | None] = [None] * len(prompts)

        async def score_one(ids: list[int], new_ids: list[int]) -> ScoreResult:
            if not (request.echo or new_ids):  # nothing of it is reported: no forward needed
                return ScoreResult([None] * len(ids), [None] * len(ids))
            return await self.worker.run(ScoreJob([*ids, *new_ids], request.logprobs))

        if request.logprobs is not None:
            pairs = zip(prompts, kept, strict=True)
            scores = await asyncio.gather(*(score_one(ids, new_ids) for (ids, _), (new_ids, _) in pairs))
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for index, ((ids, prompt_text), (new_ids, text), result, score) in enumerate(
            zip(prompts, kept, results, scores, strict=True)
        ):
            start = 0 if request.echo else len(ids)
            logprobs = None
            if score is not None:
                logprobs = await run_in_threadpool(self._logprobs, [*ids, *new_ids], score, start, request.echo)
            reason = FINISH_REASONS[result.finish_reason] if result is not None else "length"
            choices.append(
                CompletionChoice(
                    index=index,
                    text=(prompt_text if request.echo else "") + text,
                    finish_reason=reason,
                    logprobs=logprobs,
                )
            )
            prompt_tokens += len(ids)
            completion_tokens += len(new_ids)
        return CompletionResponse(
            id=f"cmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=self.model_name,
            choices=choices,
            usage=_usage(prompt_tokens, completion_tokens),
        )

    def _completion_prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[tuple[list[int], str]]:
        """(ids, echo text) of each prompt: a string becomes `<|bos|> text`; ids are used as given."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise _bad("prompt is empty", "prompt")
        if isinstance(prompt[0], int):
            prompt = [prompt]
        if len(prompt) > self.limits.max_prompts:
            raise _bad(f"at most {self.limits.max_prompts} prompts per request, got {len(prompt)}", "prompt")
        out = []
        for item in prompt:
            if isinstance(item, str):
                out.append(([self.layout.token_id("<|bos|>"), *encode_text(item, self.tokenizer)], item))
                continue
            if not item:
                raise _bad("a token prompt needs at least one id", "prompt")
            if min(item) < 0 or max(item) >= self.layout.padded_size:
                raise _bad(f"prompt ids must be in [0, {self.layout.padded_size})", "prompt")
            out.append((list(item), self._decode(item)))
        return out

    def _kept(self, result: GenerationResult | None, stop: tuple[str, ...]) -> tuple[list[int], str]:
        """A completion's new ids and text, cut before the first stop string (ids: those that spell the text)."""
        if result is None:
            return [], ""
        text = _text(result.parts)
        cut = trim_stop(text, stop)
        ids = result.new_ids
        if len(cut) < len(text):
            ids = next((ids[:k] for k in range(len(ids) + 1) if len(self._decode(ids[:k])) >= len(cut)), ids)
        return ids, cut

    def _logprobs(self, ids: list[int], score: ScoreResult, start: int, echo: bool) -> CompletionLogprobs:
        offsets = self._text_offsets(ids)
        base = 0 if echo else offsets[start] if start < len(ids) else 0
        return CompletionLogprobs(
            tokens=[self._token_string(t) for t in ids[start:]],
            token_logprobs=score.logprobs[start:],
            top_logprobs=[None if top is None else self._top_dict(top) for top in score.top[start:]],
            text_offset=[offset - base for offset in offsets[start:]],
        )

    def _top_dict(self, top: list[tuple[int, float]]) -> dict[str, float]:
        out: dict[str, float] = {}
        for token, value in top:  # best first: of ids that read the same, the likeliest stays
            out.setdefault(self._token_string(token), value)
        return out

    def _token_string(self, token: int) -> str:
        """What one id reads as alone: its text, or the layout's name for a special or media id."""
        if token not in self._token_strings:
            if token < self.layout.text_size:
                self._token_strings[token] = self.tokenizer.decode([token])
            else:
                self._token_strings[token] = self.layout.token_name(token) or f"<|id_{token}|>"
        return self._token_strings[token]

    def _text_offsets(self, ids: list[int]) -> list[int]:
        """Where each id's text starts in the decoded text (a non-text id takes no room)."""
        offsets, offset = [], 0
        for i, token in enumerate(ids):
            offsets.append(offset)
            if token < self.layout.text_size:
                window = [t for t in ids[max(0, i - OFFSET_WINDOW) : i] if t < self.layout.text_size]
                before, after = self._decode(window), self._decode([*window, token])
                offset += len(after) - len(before) if after.startswith(before) else len(self._token_string(token))
        return offsets

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([t for t in ids if t < self.layout.text_size]) if ids else ""

    # ---------------------------------------------------------------- images and audio

    def _media_job(self, text: str, reply: str, options: MmllmOptions) -> GenerationJob:
        """A reply of one medium to `text`, for the endpoints that have no sampling parameters of their own."""
        if reply not in self.generatable:
            raise _bad(
                f"this model cannot generate {reply} (it generates {', '.join(self.generatable) or 'text'})", "model"
            )
        if options.reply_modality not in (None, reply):
            raise _bad(f"this endpoint replies in {reply}", "mmllm.reply_modality")
        settings = self._settings(options.temperature, options.top_p, options.seed, options, (), reply, (reply,))
        prompt = Prompt([{"role": "user", "content": text}], reply_modality=reply)
        return GenerationJob(settings, self._max_tokens(None, reply, "max_tokens"), prompt=prompt)

    async def image(self, request: ImageGenerationRequest) -> ImageGenerationResponse:
        self.check_model(request.model)
        if request.n is not None and request.n > 1:
            raise _bad("n > 1 is not supported: send one request per image", "n")
        size = getattr(self.model.modality_tokenizers.get("image"), "image_size", None)
        if request.size not in (None, "auto") and request.size != f"{size}x{size}":
            raise _bad(f"size {request.size!r}: this model draws {size}x{size} images (or say 'auto')", "size")
        job = self._media_job(request.prompt, "image", request.mmllm or MmllmOptions())
        part = _first_medium(await self.worker.run(job), "image")
        png = await run_in_threadpool(media.png_bytes, part.media)
        if request.response_format == "url":
            return ImageGenerationResponse(
                created=int(time.time()), data=[ImageData(url=media.data_uri("image/png", png))]
            )
        return ImageGenerationResponse(created=int(time.time()), data=[ImageData(b64_json=media.b64(png))])

    async def speech(self, request: SpeechRequest) -> Response:
        self.check_model(request.model)
        if request.speed not in (None, 1.0):
            raise _bad("speed other than 1.0 is not supported", "speed")
        if request.instructions:
            raise _bad("instructions are not supported: the model has one voice and style", "instructions")
        job = self._media_job(SPEECH_PROMPT.format(input=request.input), "audio", request.mmllm or MmllmOptions())
        part = _first_medium(await self.worker.run(job), "audio")
        wav = await run_in_threadpool(media.wav_bytes, part.media, part.sample_rate or DEFAULT_AUDIO_RATE)
        return Response(content=wav, media_type="audio/wav")

    async def transcription(self, request: Request) -> Response:
        fields, files = _multipart(request.headers.get("content-type", ""), await request.body())
        unknown = set(fields) - {"model", "language", "prompt", "response_format", "temperature", "stream"}
        if unknown or set(files) - {"file"}:
            name = sorted(unknown | (set(files) - {"file"}))[0]
            raise _bad(f"{name}: unsupported parameter", name, "unsupported_parameter")
        if "file" not in files:
            raise _bad("file is required (multipart/form-data)", "file")
        if "model" not in fields:
            raise _bad("model is required", "model")
        self.check_model(fields["model"])
        if fields.get("prompt"):
            raise _bad("prompt is not supported", "prompt")
        if fields.get("stream", "false").lower() != "false":
            raise _bad("stream is not supported on transcriptions", "stream")
        response_format = fields.get("response_format", "json")
        if response_format not in ("json", "text"):
            raise _bad("response_format must be json or text", "response_format")
        temperature = _number(fields.get("temperature", "0"), "temperature", 0.0, 2.0)  # OpenAI's default here is 0
        filename, content_type, data = files["file"]
        fmt = _audio_format(filename, content_type)
        tokenizer = self.model.modality_tokenizers.get("audio")
        if tokenizer is None:
            raise _bad("this model takes no audio input", "file")
        try:
            wave = await run_in_threadpool(
                media.decode_bytes, "audio", data, fmt, "file", getattr(tokenizer, "sample_rate", DEFAULT_AUDIO_RATE)
            )
        except MediaError as err:
            raise _bad(str(err), "file", "invalid_media") from None
        settings = self._settings(temperature, None, None, MmllmOptions(), (), "text", ())
        content = [{"type": "audio", "array": wave}, {"type": "text", "text": TRANSCRIBE_PROMPT}]
        prompt = Prompt([{"role": "user", "content": content}])
        job = GenerationJob(settings, self.limits.default_max_tokens, prompt=prompt, fit_context=True)
        result = await self.worker.run(job)
        text = _text(result.parts)
        if response_format == "text":
            return PlainTextResponse(text)
        return JSONResponse(Transcription(text=text).model_dump())

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, created=self.created)])


class ReplyText:
    """A chat reply's `content`, built one id at a time, the same way for streamed and whole replies.

    Text runs are detokenized incrementally, as vLLM does: each id's text is the decoded window
    since the last emitted piece minus the window's earlier part, emitted once it does not end in
    a partial character. For well-formed text the pieces join to the plain decode; for ids that
    spell invalid UTF-8 (a random model's byte tokens) they still join to one fixed string, so a
    streamed reply always equals the whole one. Media spans are skipped. Content is cut at the
    first stop string, and text that could still become one is held back.
    """

    def __init__(self, layout, tokenizer, stop: tuple[str, ...]) -> None:
        self.layout, self.tokenizer, self.stop = layout, tokenizer, stop
        self.begins = {layout.begin_id(name) for name in layout.modalities}
        self.ends = {layout.end_id(name) for name in layout.modalities}
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # every emitted piece, joined: only ever appended to
        self.run: list[int] = []  # ids of the current text run
        self.prefix_offset = self.read_offset = 0  # the run's decode window, and what it has emitted
        self.in_span = False
        self.sent = ""

    @classmethod
    def content(cls, layout, tokenizer, stop: tuple[str, ...], ids: Sequence[int]) -> str:
        reply = cls(layout, tokenizer, stop)
        return "".join(reply.push(token) for token in ids) + reply.close()

    def push(self, token: int) -> str:
        """The content this id adds ("" while a character or a possible stop string is incomplete)."""
        if self.in_span:
            self.in_span = token not in self.ends
            return ""
        if token in self.begins:
            self._flush()
            self.in_span = True
            return ""
        if token >= self.layout.text_size:
            return ""
        self.run.append(token)
        self._advance(final=False)
        return self._visible(final=False)

    def close(self) -> str:
        """The rest of the content, once the reply is complete."""
        self._flush()
        return self._visible(final=True)

    def _advance(self, final: bool) -> None:
        before = self.tokenizer.decode(self.run[self.prefix_offset : self.read_offset])
        after = self.tokenizer.decode(self.run[self.prefix_offset :])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.run)

    def _flush(self) -> None:
        if self.read_offset < len(self.run):
            self._advance(final=True)
        self.run, self.prefix_offset, self.read_offset = [], 0, 0

    def _visible(self, final: bool) -> str:
        cut = trim_stop(self.text, self.stop)
        visible = cut if final or len(cut) < len(self.text) else self.text[: len(self.text) - self.hold]
        if len(visible) <= len(self.sent):
            return ""
        piece, self.sent = visible[len(self.sent) :], visible
        return piece


def trim_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first stop string (the stop string itself is not part of a reply)."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(cuts)] if cuts else text


def _text(parts: Sequence[OutputPart]) -> str:
    return "".join(p.text for p in parts if p.kind == "text")


def _usage(prompt: int, completion: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _last_user_text(request: ChatCompletionRequest) -> str:
    for message in reversed(request.messages):
        if message.role == "user":
            if isinstance(message.content, list):
                return " ".join(p.text for p in message.content if isinstance(p, TextPart))
            return message.content or ""
    return ""


def _first_medium(result: GenerationResult, modality: str) -> OutputPart:
    for part in result.parts:
        if part.kind == modality and part.media is not None:
            return part
    raise RuntimeError(f"the {modality} reply decoded to no {modality} ({[p.flag for p in result.parts]})")


def _number(value: str, name: str, low: float, high: float) -> float:
    try:
        number = float(value)
    except ValueError:
        raise _bad(f"{name} must be a number, got {value!r}", name) from None
    if not low <= number <= high:
        raise _bad(f"{name} must be in [{low}, {high}], got {number}", name)
    return number


def _audio_format(filename: str | None, content_type: str) -> str:
    suffix = filename.rsplit(".", 1)[-1].lower() if filename and "." in filename else ""
    if suffix in media.AUDIO_FORMATS:
        return suffix
    fmt = media.MEDIA_TYPES["audio"].get(content_type)
    if fmt is None:
        raise _bad(f"file: an audio file ({', '.join(media.AUDIO_FORMATS)}) is needed, got {filename!r}", "file")
    return fmt


def _multipart(content_type: str, body: bytes) -> tuple[dict[str, str], dict[str, tuple[str | None, str, bytes]]]:
    """Form fields and files of a multipart/form-data body (parsed with the standard library's email parser)."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise _bad("this endpoint takes multipart/form-data")
    header = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    message = BytesParser(policy=email_policy.HTTP).parsebytes(header + body)
    if not message.is_multipart():
        raise _bad("malformed multipart/form-data body")
    fields: dict[str, str] = {}
    files: dict[str, tuple[str | None, str, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            raise _bad("a form part has no name")
        data = part.get_payload(decode=True) or b""
        if part.get_filename() is not None:
            files[str(name)] = (part.get_filename(), part.get_content_type(), data)
        else:
            fields[str(name)] = data.decode("utf-8", errors="replace")
    return fields, files


# ---------------------------------------------------------------- errors


def error_fields(err: Exception) -> tuple[int, ErrorDetail]:
    """The HTTP status and OpenAI error fields an exception is answered with."""
    if isinstance(err, APIError):
        return err.status, ErrorDetail(message=err.message, type=err.kind, param=err.param, code=err.code)
    if isinstance(err, QueueFull):
        return 429, ErrorDetail(message=str(err), type="rate_limit_error", code=err.code)
    if isinstance(err, MMLLMError):
        return 400, ErrorDetail(message=str(err), type="invalid_request_error", code=getattr(err, "code", None))
    return 500, ErrorDetail(message=f"internal error ({type(err).__name__}): {err}", type="server_error")


def _validation_error(err: RequestValidationError) -> JSONResponse:
    errors = err.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc).lstrip(".") or None
    if first.get("type") == "json_invalid":
        message, param, code = (
            f"malformed JSON: {first.get('ctx', {}).get('error', first['msg'])}",
            None,
            "invalid_json",
        )
    elif first.get("type") == "extra_forbidden":
        message, code = f"{param}: unsupported parameter", "unsupported_parameter"
    else:
        message, code = f"{param or 'body'}: {first['msg']}", "invalid_value"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more)"
    return error_response(400, message, "invalid_request_error", param, code)


class BodyLimit:
    """ASGI middleware: a 413 for a body over `max_bytes`, by its Content-Length or, when streamed, as it arrives."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send) -> None:
        response = error_response(
            413,
            f"the request body is larger than this server's limit of {self.max_bytes} bytes",
            "invalid_request_error",
            None,
            "request_too_large",
        )
        await response(scope, receive, send)


# ---------------------------------------------------------------- the app


def create_app(
    model,
    limits: ServerLimits | None = None,
    model_name: str = "mmllm",
    allow_local_media: bool = False,
    text_replies: bool = False,
) -> FastAPI:
    """The API serving `model` (an MMLLM with a vocab layout) under the name `model_name`;
    `text_replies=True` replies in text only unless a request names its reply's modality."""
    if getattr(model, "layout", None) is None:
        raise ConfigError("serving needs a model with a vocab layout (vocab_layout.json)")
    limits = limits or ServerLimits()
    worker = BatchingWorker(model, limits.max_batch, limits.max_queue)
    policy = media.MediaPolicy(allow_local=allow_local_media, max_bytes=limits.max_body_bytes)
    service = Service(model, worker, limits, model_name, policy, text_replies)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="mmllm", description="OpenAI-compatible API of an any-to-any multimodal LLM", lifespan=lifespan)
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        return _validation_error(err)

    @app.exception_handler(HTTPException)
    async def on_http_error(_: Request, err: HTTPException) -> JSONResponse:
        return error_response(err.status_code, str(err.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def on_error(_: Request, err: Exception) -> JSONResponse:
        status, detail = error_fields(err)
        if status >= 500:
            logger.error("internal error", exc_info=err)
        return error_response(status, detail.message, detail.type, detail.param, detail.code)

    for error_type in (APIError, MMLLMError):  # answered before Starlette's last-resort handler sees them
        app.add_exception_handler(error_type, on_error)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: ChatCompletionRequest) -> Response | dict[str, Any]:
        plan = await run_in_threadpool(service.chat_plan, request)
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return await service.chat_stream(plan, include_usage)
        result = await worker.run(plan.job)
        response = await run_in_threadpool(service.chat_response, result, plan)
        return response.model_dump(exclude_none=True)

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest) -> dict[str, Any]:
        return (await service.completions(request)).model_dump(exclude_none=True)

    @app.post("/v1/images/generations")
    async def images(request: ImageGenerationRequest) -> dict[str, Any]:
        return (await service.image(request)).model_dump(exclude_none=True)

    @app.post("/v1/audio/speech", response_class=Response)
    async def speech(request: SpeechRequest) -> Response:
        return await service.speech(request)

    @app.post("/v1/audio/transcriptions", response_class=Response)
    async def transcriptions(request: Request) -> Response:
        return await service.transcription(request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return service.models().model_dump()

    @app.get("/v1/models/{name}")
    async def model_card(name: str) -> dict[str, Any]:
        service.check_model(name)
        return service.models().data[0].model_dump()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        stats = worker.stats
        return {
            "status": "ok",
            "model": model_name,
            "waiting": worker.waiting,
            "requests": stats.requests,
            "batches": stats.batches,
            "largest_batch": stats.largest_batch,
        }

    return app
