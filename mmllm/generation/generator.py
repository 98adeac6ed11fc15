"""The generator: batched, KV-cached decoding of every modality, with guidance and streaming.

    generator = Generator(model)
    outputs = generator.generate(prompt_ids, GenerationConfig(max_new_tokens=128))

Prompts of different lengths are left-padded into one batch; the backbone skips padding in
rotary positions and attention, and the KV cache remembers which slots were padding. Each
step the modality state machine (`ModalityStates`) masks the logits, so a reply may move
from text into an image span and back; the span is exactly as long as the layout says. Rows
that finish leave the batch (their cache rows are dropped), so a batch of short and long
replies costs what its live rows cost.

Classifier-free guidance gives each row an unconditional twin (see guidance.py), batched into
the same forward by default. Streaming is a callback called with (row, id) for every new id.

`forced` ids are fed after a row's prompt one forward at a time, before its reply is sampled: the
steps of a latent span (`mmllm.model.latent.latent_generate`), whose slots each need the forward
before them. A row whose forced ids run out samples while others still feed theirs; forced ids are
not part of the reply and do not count towards `max_new_tokens`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mmllm.errors import ConfigError, InputError, LayoutError
from mmllm.generation.guidance import Guidance, guide
from mmllm.generation.modality_state import TEXT, ModalityStates
from mmllm.generation.sampling import BatchSampler, SamplingParams
from mmllm.vocab import END_OF_TURN

TokenCallback = Callable[[int, int], None]  # (row of the batch, new id)


@dataclass
class GenerationConfig:
    """What to generate and how. `sampling` maps "text" or a modality name to its settings;
    modalities not listed use `default` (greedy unless changed)."""

    max_new_tokens: int = 256
    default: SamplingParams = field(default_factory=SamplingParams)
    sampling: Mapping[str, SamplingParams] = field(default_factory=dict)
    guidance: Guidance = field(default_factory=Guidance)
    stop_ids: tuple[int, ...] | None = None  # None: end of turn and end of document
    stop_strings: tuple[str, ...] = ()  # text that ends a reply (checked on the reply's text)
    stop_after_span: bool = False  # end a reply when its first media span closes
    seed: int | None = 0  # None: a fresh random seed

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def params_for(self, modality: str) -> SamplingParams:
        return self.sampling.get(modality, self.default)


@dataclass
class GenerationOutput:
    ids: list[int]  # the new ids, stop id excluded
    finish_reason: str  # "stop" (a stop id or string), "span" (stop_after_span), or "length"
    prompt_tokens: int


@dataclass
class GenerationStats:
    """Timings of the last `generate` call (what `mmllm eval` reports as efficiency)."""

    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_tokens: int = 0  # ids produced by live rows, twins not counted
    forwards: int = 0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


class Generator:
    """Decodes any modality from a model that carries a vocab layout.

    `generatable` lists the modalities text may open a span of; by default those whose
    tokenizer can decode (an encode-only tokenizer's modality is never generated).
    """

    def __init__(self, model, generatable: Sequence[str] | None = None) -> None:
        if getattr(model, "layout", None) is None:
            raise LayoutError("generation needs a model with a vocab layout (vocab_layout.json)")
        self.model = model
        self.layout = model.layout
        if generatable is None:
            tokenizers = getattr(model, "modality_tokenizers", {})
            generatable = [n for n, tok in tokenizers.items() if tok.can_decode and n in self.layout.modalities]
        self.generatable = tuple(generatable)
        self.stats = GenerationStats()

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @torch.inference_mode()  # no autograd bookkeeping at all: ~10% off a small model's decode step
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        config: GenerationConfig | None = None,
        unconditional: Sequence[Sequence[int]] | None = None,
        on_token: TokenCallback | None = None,
        forced: Sequence[Sequence[int]] | None = None,
    ) -> list[GenerationOutput]:
        """Continue each prompt; `unconditional` holds the guidance twins' prompts (needed when
        `config.guidance` is active; see `guidance.unconditional_prompt`); `forced` the ids each row
        feeds before its reply (see the module docstring)."""
        from mmllm.model.latent.base import check_latent_prompts  # lazy: the latent package imports this module

        config = config or GenerationConfig()
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise InputError("every prompt needs at least one id (start with <|bos|>)")
        if forced is not None and len(forced) != len(prompts):
            raise InputError(f"forced ids: {len(forced)} rows for {len(prompts)} prompts")
        check_latent_prompts(self.model, prompts, forced or ())
        unknown = sorted(set(config.sampling) - {"text", *self.layout.modalities})
        if unknown:
            known = ", ".join(["text", *self.layout.modalities])
            raise ConfigError(f"sampling settings for {', '.join(unknown)}: the model's modalities are {known}")
        guided = config.guidance.active
        if guided and (unconditional is None or len(unconditional) != len(prompts)):
            raise ConfigError("guidance needs one unconditional prompt per prompt")
        run = _Run(self, config, prompts, unconditional if guided else None, on_token, forced)
        self.stats = run.stats
        return run.decode()


class _Run:
    """The state of one `generate` call."""

    def __init__(
        self, generator: Generator, config: GenerationConfig, prompts, unconditional, on_token, forced
    ) -> None:
        self.model = generator.model
        self.layout = generator.layout
        self.config = config
        self.on_token = on_token
        device = generator.device
        self.device = device
        self.batch = len(prompts)
        self.prompt_lengths = [len(p) for p in prompts]
        self.states = ModalityStates(self.layout, generator.generatable, device)
        self.states.start(prompts)
        self.sampler = BatchSampler([config.params_for(n) for n in self.states.names], device, config.seed)
        scales = [config.guidance.scales.get(n, 1.0) for n in self.states.names]
        self.scale = torch.tensor(scales, device=device)
        self.is_guided = torch.tensor([n in config.guidance.scales for n in self.states.names], device=device)
        self.guided = unconditional is not None
        self.sequential = self.guided and config.guidance.mode == "sequential"
        stop = config.stop_ids
        if stop is None:
            stop = (self.layout.token_id(END_OF_TURN), self.layout.token_id("<|eos|>"))
        self.stop_ids = torch.tensor(sorted(set(stop)), device=device)
        self.rows_list = list(range(self.batch))  # original index of each live row
        self.outputs: list[list[int]] = [[] for _ in prompts]
        self.reasons = ["length"] * self.batch
        self.seen = self._seen(prompts) if self.sampler.any_penalty else None
        self.stats = GenerationStats()
        self.forced = [list(f) for f in forced] if forced else [[] for _ in prompts]  # per live row, still to feed
        self.forced_now: list[bool] = [False] * self.batch  # the rows fed a forced id this step
        self.forced_steps = max(len(f) for f in self.forced)
        capacity = max(self.prompt_lengths) + self.forced_steps + config.max_new_tokens
        if self.guided:
            capacity = max(capacity, max(len(p) for p in unconditional) + self.forced_steps + config.max_new_tokens)
        if self.sequential:
            self.caches = [self.model.new_kv_cache(capacity), self.model.new_kv_cache(capacity)]
            self.prefill_inputs = [list(prompts), list(unconditional)]
        else:
            self.caches = [self.model.new_kv_cache(capacity)]
            self.prefill_inputs = [list(prompts) + list(unconditional or [])]

    def _seen(self, prompts) -> Tensor:
        seen = torch.zeros(len(prompts), self.layout.padded_size, dtype=torch.bool, device=self.device)
        for row, prompt in enumerate(prompts):
            seen[row, torch.tensor(prompt, device=self.device)] = True
        return seen

    def _forward(self, feed: list[Tensor], attention: list[Tensor | None] | None = None) -> Tensor:
        """Last-position logits of every row (twins after their rows), one forward per cache."""
        logits = []
        for i, (ids, cache) in enumerate(zip(feed, self.caches, strict=True)):
            mask = attention[i] if attention is not None else None
            out = self.model(ids, attention_mask=mask, kv_cache=cache, logits_to_keep=1)
            logits.append(out.logits[:, -1].float())
            self.stats.forwards += 1
        return torch.cat(logits) if len(logits) > 1 else logits[0]

    def decode(self) -> list[GenerationOutput]:
        start = time.perf_counter()
        padded = [_left_pad(rows, self.layout.pad_id, self.device) for rows in self.prefill_inputs]
        logits = self._forward([ids for ids, _ in padded], [mask for _, mask in padded])
        self.stats.prefill_seconds = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(self.forced_steps + self.config.max_new_tokens):
            tokens = self._next_tokens(logits)
            finished = self._record(tokens)
            if all(finished):  # every row stops by max_new_tokens at the latest
                break
            if any(finished):
                keep = torch.tensor([not done for done in finished], device=self.device)
                tokens = self._drop_rows(keep, tokens)
            feed = tokens[:, None]
            feeds = [feed, feed] if self.sequential else [torch.cat([feed, feed]) if self.guided else feed]
            logits = self._forward(feeds)
        self.stats.decode_seconds = time.perf_counter() - start
        return [
            GenerationOutput(ids, reason, n)
            for ids, reason, n in zip(self.outputs, self.reasons, self.prompt_lengths, strict=True)
        ]

    def _next_tokens(self, logits: Tensor) -> Tensor:
        live = len(self.rows_list)
        cond = logits[:live]
        if self.guided:
            modality = self.states.modality
            guided_rows = self.is_guided[modality]
            cond = guide(cond, logits[live:], self.scale[modality], guided_rows)
        cond = cond.masked_fill(~self.states.masks(), float("-inf"))
        tokens = self.sampler.sample(cond, self.states.modality, self.seen)
        self.forced_now = [bool(queue) for queue in self.forced]
        if any(self.forced_now):
            ids = [queue.pop(0) if queue else 0 for queue in self.forced]
            due = torch.tensor(self.forced_now, device=self.device)
            tokens = torch.where(due, torch.tensor(ids, device=self.device), tokens)
        if self.seen is not None:
            self.seen[torch.arange(live, device=self.device), tokens] = True
        return tokens

    def _record(self, tokens: Tensor) -> list[bool]:
        """Append each live row's id, advance the state machine, and say which rows are done."""
        was_text = self.states.modality == TEXT
        closed = self.states.advance(tokens)
        stopped = was_text & torch.isin(tokens, self.stop_ids)
        finished = stopped | closed if self.config.stop_after_span else stopped
        token_list, stop_list, done_list = torch.stack([tokens, stopped.long(), finished.long()]).tolist()
        for i, (row, token) in enumerate(zip(self.rows_list, token_list, strict=True)):
            if self.forced_now[i]:  # fed, not generated: no reply id, no stop
                done_list[i] = 0
                continue
            if stop_list[i]:
                self.reasons[row] = "stop"
                continue
            self.outputs[row].append(token)
            self.stats.decode_tokens += 1
            if self.on_token is not None:
                self.on_token(row, token)
            if done_list[i]:
                self.reasons[row] = "span"
            elif self.config.stop_strings and self._hits_stop_string(row):
                self.reasons[row] = "stop"
                done_list[i] = 1
            elif len(self.outputs[row]) == self.config.max_new_tokens:  # reason stays "length"
                done_list[i] = 1
        return [bool(d) for d in done_list]

    def _hits_stop_string(self, row: int) -> bool:
        """Whether the row's reply text now ends with a stop string (only the tail is decoded)."""
        tokenizer = self.model.text_tokenizer
        longest = max(len(s) for s in self.config.stop_strings)
        tail = [t for t in self.outputs[row][-(longest + 8) :] if t < self.layout.text_size]  # ids >= 1 char each
        text = tokenizer.decode(tail) if tail else ""
        return any(text.endswith(s) or s in text[-(longest + 1) :] for s in self.config.stop_strings)

    def _drop_rows(self, keep: Tensor, tokens: Tensor) -> Tensor:
        """Remove finished rows from the batch, the caches and the state machine."""
        index = keep.nonzero().squeeze(1)
        live = len(self.rows_list)
        if self.sequential:
            for cache in self.caches:
                cache.select_rows(index)
        else:
            self.caches[0].select_rows(torch.cat([index, index + live]) if self.guided else index)
        kept = index.tolist()
        self.rows_list = [self.rows_list[i] for i in kept]
        self.forced = [self.forced[i] for i in kept]
        self.states.select(index)
        if self.seen is not None:
            self.seen = self.seen[index]
        return tokens[index]


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor | None]:
    """(B, L) ids left-padded with `pad_id`, and the attention mask (None when no row is padded)."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row) :] = torch.as_tensor(list(row), dtype=torch.long)
        mask[i, length - len(row) :] = 1
    if bool(mask.all()):
        return ids.to(device), None
    return ids.to(device), mask.to(device)
