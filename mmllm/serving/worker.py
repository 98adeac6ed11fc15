"""The batching worker: one background thread owns the model; requests wait in a queue.

Handlers never touch the model. They submit a job (generate a reply, or score ids) and await
its future. The worker takes the oldest waiting job and, when it may share a batch, every other
waiting job of the same kind with equal decode settings, up to `max_batch`, and runs them as
one `Generator` batch: prompts of different lengths are left-padded, rows that finish early
leave the batch, and each row's output is exactly what it would be alone (greedy decoding is
deterministic; the test suite compares 16 concurrent requests with sequential ones). Requests
with different `max_new_tokens` share a batch: it runs to the largest, and each row is cut to
its own limit afterwards (its stream never sees the ids past it).

A sampled request with a seed runs alone, so its seed alone decides its draws: a batch shares
one random stream. Sampled requests without a seed share batches.

Media are tokenized and detokenized here too (batched per modality), so the model and its
tokenizers are only ever used from this thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from mmllm.errors import InputError, MMLLMError
from mmllm.generation.generator import GenerationConfig, Generator
from mmllm.generation.guidance import Guidance
from mmllm.generation.prompts import EncodedPrompt, OutputPart, Prompt, decode_replies, encode_prompts
from mmllm.generation.sampling import SamplingParams

logger = logging.getLogger(__name__)

# Logits one scoring forward may hold (rows x positions x vocabulary floats): 2^28 floats is
# 1 GiB, so a batch of long prompts over a 150k vocabulary is split into several forwards.
SCORE_LOGIT_BUDGET = 2**28


class QueueFull(MMLLMError):
    """More requests are waiting than the server queues (answered with a 429)."""

    code = "queue_full"


class ContextLengthError(InputError):
    """A prompt plus its reply would not fit the model's context."""

    code = "context_length_exceeded"


@dataclass(frozen=True)
class DecodeSettings:
    """Everything about decoding that requests must share to share a batch."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    guidance: Guidance = field(default_factory=Guidance)
    stop_strings: tuple[str, ...] = ()
    stop_after_span: bool = False  # a media reply ends when its span closes
    seed: int | None = 0  # None: fresh randomness
    generatable: tuple[str, ...] | None = None  # modalities text may open; None: all the model decodes

    @property
    def batchable(self) -> bool:
        return self.sampling.greedy or self.seed is None


@dataclass
class GenerationJob:
    """One reply to generate: from a `Prompt` (media tokenized by the worker) or from ready ids."""

    settings: DecodeSettings
    max_new_tokens: int
    prompt: Prompt | None = None
    ids: list[int] | None = None  # used as given (a completion's token prompt)
    on_token: Callable[[int], None] | None = None  # streaming: each reply id, forced prefix first, from this thread
    fit_context: bool = False  # max_new_tokens is the server's default, not the client's: shrink it to fit


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    reply_ids: list[int]  # the forced prefix (a media reply's begin token) and the new ids
    new_ids: list[int]
    parts: list[OutputPart]
    finish_reason: str  # "stop", "span" (a media reply's span closed) or "length"


@dataclass
class ScoreJob:
    """Log-probabilities of `ids` under the model, position 1 on; `top` alternatives per position."""

    ids: list[int]
    top: int = 0


@dataclass
class ScoreResult:
    logprobs: list[float | None]  # None at position 0: nothing precedes it
    top: list[list[tuple[int, float]] | None]  # best (id, logprob) pairs, best first; None at position 0


Job = GenerationJob | ScoreJob


@dataclass
class WorkerStats:
    requests: int = 0  # jobs finished
    batches: int = 0  # model batches run
    largest_batch: int = 0


class BatchingWorker:
    """Runs generation and scoring jobs on `model` in one background thread, batching compatible ones."""

    def __init__(self, model, max_batch: int = 16, max_queue: int = 256) -> None:
        self.model = model.eval()
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.context_length = model.config.max_position_embeddings
        self.stats = WorkerStats()
        self._generators: dict[tuple[str, ...] | None, Generator] = {}
        self._waiting: deque[tuple[Job, Future]] = deque()
        self._condition = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="mmllm-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join()
        for _, future in self._waiting:
            future.cancel()
        self._waiting.clear()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def generator(self, generatable: tuple[str, ...] | None) -> Generator:
        if generatable not in self._generators:
            self._generators[generatable] = Generator(self.model, generatable)
        return self._generators[generatable]

    # ---------------------------------------------------------------- submitting

    def submit(self, job: Job) -> Future:
        """Queue `job`; its future resolves to a GenerationResult or ScoreResult (or the job's error)."""
        future: Future = Future()
        with self._condition:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting; try again later")
            self._waiting.append((job, future))
            self._condition.notify()
        return future

    async def run(self, job: Job):
        """Submit `job` and wait for its result without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(job))

    # ---------------------------------------------------------------- the thread

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            batch = [(job, future) for job, future in batch if future.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                if isinstance(batch[0][0], ScoreJob):
                    self._score(batch)
                else:
                    self._generate(batch)
            except Exception as err:  # the thread must outlive any one batch
                if not isinstance(err, MMLLMError):
                    logger.exception("batch of %d failed", len(batch))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(err)
            self.stats.requests += len(batch)
            self.stats.batches += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))

    def _take(self) -> list[tuple[Job, Future]] | None:
        """The oldest waiting job and the waiting jobs that may share its batch (None: stop)."""
        with self._condition:
            while not self._waiting and not self._stopping:
                self._condition.wait()
            if self._stopping:
                return None
            first = self._waiting.popleft()
            batch, others = [first], deque()
            while self._waiting and len(batch) < self.max_batch and _shares_batch(first[0]):
                item = self._waiting.popleft()
                (batch if _compatible(first[0], item[0]) else others).append(item)
            others.extend(self._waiting)
            self._waiting = others
            return batch

    # ---------------------------------------------------------------- generation

    def _generate(self, batch: list[tuple[GenerationJob, Future]]) -> None:
        encoded = self._encode(batch)
        batch = [(job, future) for job, future in batch if not future.done()]
        if not batch:
            return
        jobs = [job for job, _ in batch]
        prompts = [encoded[id(job)] for job in jobs]
        settings = jobs[0].settings
        config = GenerationConfig(
            max_new_tokens=max(job.max_new_tokens for job in jobs),
            default=settings.sampling,
            guidance=settings.guidance,
            stop_strings=settings.stop_strings,
            stop_after_span=settings.stop_after_span,
            seed=settings.seed,
        )
        unconditional = [p.unconditional(self.model.layout) for p in prompts] if settings.guidance.active else None
        on_token = None
        if any(job.on_token is not None for job in jobs):
            for job, prompt in zip(jobs, prompts, strict=True):
                for token in prompt.reply_prefix if job.on_token is not None else ():
                    job.on_token(token)
            on_token = _Dispatch(jobs)
        outputs = self.generator(settings.generatable).generate(
            [p.ids for p in prompts], config, unconditional, on_token
        )
        kept = [self._cut(job, output.ids, output.finish_reason) for job, output in zip(jobs, outputs, strict=True)]
        replies = [p.reply(ids) for p, (ids, _) in zip(prompts, kept, strict=True)]
        parts = decode_replies(self.model, replies)
        for (_, future), prompt, (ids, reason), reply, reply_parts in zip(
            batch, prompts, kept, replies, parts, strict=True
        ):
            future.set_result(GenerationResult(prompt.ids, reply, ids, reply_parts, reason))

    def _encode(self, batch: list[tuple[GenerationJob, Future]]) -> dict[int, EncodedPrompt]:
        """Each job's encoded prompt; a job whose prompt fails (bad media, too long) gets its error."""
        with_prompt = [(job, future) for job, future in batch if job.prompt is not None]
        encoded: dict[int, EncodedPrompt] = {}
        try:
            prompts = encode_prompts(self.model, [job.prompt for job, _ in with_prompt])
            for (job, _), prompt in zip(with_prompt, prompts, strict=True):
                encoded[id(job)] = prompt
        except MMLLMError:  # one bad prompt: encode them one by one, so only its request fails
            for job, future in with_prompt:
                try:
                    encoded[id(job)] = encode_prompts(self.model, [job.prompt])[0]
                except MMLLMError as err:
                    future.set_exception(err)
        for job, _ in batch:
            if job.ids is not None:
                encoded[id(job)] = EncodedPrompt(list(job.ids), [False] * len(job.ids), [])
        for job, future in batch:
            prompt = encoded.get(id(job))
            if prompt is None:
                continue
            room = self.context_length - len(prompt.ids)
            if job.fit_context and room >= 1:
                job.max_new_tokens = min(job.max_new_tokens, room)
            if len(prompt.ids) + job.max_new_tokens > self.context_length:
                future.set_exception(
                    ContextLengthError(
                        f"the prompt ({len(prompt.ids)} tokens) plus max_tokens ({job.max_new_tokens}) is more "
                        f"than the model's context of {self.context_length} tokens"
                    )
                )
        return encoded

    def _cut(self, job: GenerationJob, ids: list[int], reason: str) -> tuple[list[int], str]:
        """A row cut to its own `max_new_tokens`, with the finish reason a run of its own would give."""
        limit = job.max_new_tokens
        if len(ids) > limit:
            return ids[:limit], "length"
        if len(ids) == limit and reason == "stop" and not self._hits_stop(ids, job.settings.stop_strings):
            return ids, "length"  # its stop id came after its own last id: alone it would have hit the limit
        return ids, reason

    def _hits_stop(self, ids: list[int], stop_strings: tuple[str, ...]) -> bool:
        if not stop_strings:
            return False
        text = self.model.text_tokenizer.decode([t for t in ids if t < self.model.layout.text_size])
        return any(s in text for s in stop_strings)

    # ---------------------------------------------------------------- scoring

    @torch.inference_mode()
    def _score(self, batch: list[tuple[ScoreJob, Future]]) -> None:
        vocab = self.model.config.vocab_size
        device = self.model.lm_head.weight.device
        group: list[tuple[ScoreJob, Future]] = []
        for item in sorted(batch, key=lambda item: len(item[0].ids)):
            longest = max(len(item[0].ids), *(len(j.ids) for j, _ in group)) if group else len(item[0].ids)
            if group and (len(group) + 1) * longest * vocab > SCORE_LOGIT_BUDGET:
                self._score_group(group, device)
                group = []
            group.append(item)
        if group:
            self._score_group(group, device)

    def _score_group(self, group: list[tuple[ScoreJob, Future]], device: torch.device) -> None:
        """One forward over right-padded rows: causal attention keeps padding out of every real token's view."""
        length = max(len(job.ids) for job, _ in group)
        ids = torch.full((len(group), length), self.model.layout.pad_id, dtype=torch.long)
        for row, (job, _) in enumerate(group):
            ids[row, : len(job.ids)] = torch.tensor(job.ids)
        logits = self.model(ids.to(device)).logits
        if logits.shape[1] != length:
            raise InputError("scoring needs a logit for every position; a plug-in of this model drops tokens")
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        chosen = logprobs.gather(-1, ids[:, 1:, None].to(device)).squeeze(-1).cpu()
        top = max(job.top for job, _ in group)
        best = logprobs.topk(top, dim=-1) if top else None
        for row, (job, future) in enumerate(group):
            n = len(job.ids)
            values: list[float | None] = [None, *chosen[row, : n - 1].tolist()]
            alternatives: list[list[tuple[int, float]] | None] = [None]
            if best is not None and job.top:
                best_ids = best.indices[row, : n - 1, : job.top].tolist()
                best_values = best.values[row, : n - 1, : job.top].tolist()
                alternatives += [list(zip(i, v, strict=True)) for i, v in zip(best_ids, best_values, strict=True)]
            else:
                alternatives += [[] for _ in range(n - 1)]
            future.set_result(ScoreResult(values, alternatives))


class _Dispatch:
    """The generator's (row, id) callback, passing each row's ids to its job's stream up to its limit."""

    def __init__(self, jobs: list[GenerationJob]) -> None:
        self.jobs = jobs
        self.counts = [0] * len(jobs)

    def __call__(self, row: int, token: int) -> None:
        job = self.jobs[row]
        if job.on_token is not None and self.counts[row] < job.max_new_tokens:
            job.on_token(token)
        self.counts[row] += 1


def _shares_batch(job: Job) -> bool:
    return isinstance(job, ScoreJob) or job.settings.batchable


def _compatible(first: Job, other: Job) -> bool:
    if isinstance(first, ScoreJob) or isinstance(other, ScoreJob):
        return isinstance(first, ScoreJob) and isinstance(other, ScoreJob)
    return other.settings == first.settings


__all__ = [
    "BatchingWorker",
    "ContextLengthError",
    "DecodeSettings",
    "GenerationJob",
    "GenerationResult",
    "QueueFull",
    "ScoreJob",
    "ScoreResult",
]
