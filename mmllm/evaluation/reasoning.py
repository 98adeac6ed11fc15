"""The toy world's reasoning puzzles as eval tasks, and the reasoning modes that answer them.

    mmllm eval --model DIR --tasks toy-prosqa,toy-arith,toy-visual-count --latent coconut:steps=6

`toy-prosqa`, `toy-arith` and `toy-visual-count`: item i is puzzle i of the test split
(`toy_tasks.generate`), its prompt the question (images included), its reference the
chain-of-thought answer. A reply is right when the text after its last `answer:` equals the
puzzle's answer (`exact_match`: case, punctuation and spacing aside), however it reasoned before;
a reply without `answer:` is also "unreadable". Each sample also records `generated_tokens`, so
the table shows the mean per answer beside the accuracy.

The reasoning mode (`--latent MODE`, `ReasoningMode`) says how the model answers, one per method
of the latent-reasoning table; it must match how the model was trained (`mmllm latent-train`):

    cot              plain decoding: the steps, then "answer: X" (the default without --latent)
    no-cot           plain decoding too (alias nocot): a no-CoT model answers at once; the mode names the row
    pause:k=K        K pause tokens after the prompt, as the pause baseline trained (`prompt_suffix`)
    coconut:steps=N  N continuous thoughts, then the answer (`latent_generate`), through the latent head
                     attached to the model or saved in its checkpoint dir
    mirage:steps=N   N latent visual tokens, then the answer (`latent_generate`), through a mirage head
    assorted         plain decoding that may open a `latent_codes` span: Token Assorted's model writes
                     the codes of its leading trace chunks, then the rest of the trace as text
    colar:steps=N,c=K  N compressed latents at compression factor K (`colar_generate`), through a colar head

Generated tokens are counted as the papers count them: each reply token, each continuous thought
(Coconut counts a thought as a token), each latent code and each pause token (a position and a forward, as a
generated token). Everything a mode cannot do is refused before inference: a mode with a task
that is no puzzle, coconut on a model without a head or with more steps than the head's maximum,
pause on a layout without pause tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from mmllm.data import toy_tasks
from mmllm.errors import CheckpointError, InputError
from mmllm.evaluation.metrics import exact_match
from mmllm.evaluation.tasks import EvalItem, ReplyPart, Task, register_task, reply_text
from mmllm.evaluation.toy import CHANCE_POOL, ToyTask
from mmllm.generation import GenerationConfig, GenerationOutput, Generator
from mmllm.model.latent import (
    CODES_MODALITY,
    ColarHead,
    MirageHead,
    PuzzleFormat,
    attach_latent_head,
    build_head,
    colar_generate,
    find_latent_head,
    latent_generate,
    load_latent_head,
    prompt_suffix,
)

ANSWER = re.compile(r"answer:", re.IGNORECASE)
MODE_KNOBS = {"pause": "k", "coconut": "steps", "mirage": "steps"}  # the count each mode takes
HEAD_KINDS = {"colar": ColarHead, "mirage": MirageHead}  # modes that need a head of their own kind
ALIASES = {"nocot": "no-cot"}


class ReasoningTask(ToyTask):
    """A toy puzzle: the answer after `answer:` is scored, with the tokens spent reaching it."""

    reasoning = True
    max_new_tokens = 0  # each task's: its longest chain-of-thought reply, with room to spare

    def _item(self, example: toy_tasks.ToyExample, index: int, seed: int) -> EvalItem:
        return dataclasses.replace(super()._item(example, index, seed), max_new_tokens=self.max_new_tokens)

    def score(self, item: EvalItem, reply: list[ReplyPart]) -> dict[str, float]:
        answer = parse_answer(reply_text(reply))
        if answer is None:
            return {"accuracy": 0.0, "unreadable": 1.0}
        return {"accuracy": exact_match(answer, item.meta["answer"]), "unreadable": 0.0}

    def chance_reply(self, item: EvalItem, rng: random.Random) -> list[ReplyPart]:
        return [ReplyPart("text", text=f"answer: {majority_answer(self.name, item.meta['source']['seed'])}")]


def parse_answer(text: str) -> str | None:
    """The rest of the line after the reply's last `answer:`, or None when it has none."""
    found = list(ANSWER.finditer(text))
    if not found:
        return None
    rest = text[found[-1].end() :].strip()
    return rest.splitlines()[0] if rest else ""


@functools.cache
def majority_answer(task: str, seed: int) -> str:
    """The most common answer of CHANCE_POOL train puzzles of `task`: what a model that ignores the question says."""
    puzzles = (toy_tasks.generate(task, i, seed, split="train").record for i in range(CHANCE_POOL))
    answers = Counter(record["meta"]["answer"] for record in puzzles)
    return answers.most_common(1)[0][0]


# The longest chain-of-thought reply of 20,000 sampled puzzles is 526 bytes (ProsQA's "no" traces
# list all Tom is), 63 (arithmetic) and 107 (visual count); a tokenizer spends at most a token per
# byte (byte fallback), and each budget adds about a tenth.
class ProsQATask(ReasoningTask):
    name = "toy-prosqa"
    description = "ProsQA-style logic: is X a Y, through chained rules among distractors; exact match of the answer"
    max_new_tokens = 576


class ArithmeticTask(ReasoningTask):
    name = "toy-arith"
    description = "four dependent arithmetic steps; exact match of the answer"
    max_new_tokens = 72


class VisualCountTask(ReasoningTask):
    name = "toy-visual-count"
    description = "two images: which has more of a shape or colour (first, second, same); exact match"
    input_modalities = ("image",)
    max_new_tokens = 120


for _task in (ProsQATask(), ArithmeticTask(), VisualCountTask()):
    register_task(_task)


# ---------------------------------------------------------------- reasoning modes


@dataclass(frozen=True)
class ReasoningMode:
    kind: str = "cot"  # cot, no-cot, assorted, pause, coconut, mirage, colar
    count: int = 0  # pause: filler tokens; coconut, colar: latent steps
    compression: int = 0  # colar: the compression factor c

    @property
    def label(self) -> str:
        """The mode as `--latent` spells it: 'coconut:steps=6', 'colar:steps=3,c=2', 'pause:k=6', 'cot'."""
        if self.kind == "colar":
            return f"colar:steps={self.count},c={self.compression}"
        return f"{self.kind}:{MODE_KNOBS[self.kind]}={self.count}" if self.kind in MODE_KNOBS else self.kind


def parse_mode(spec: str) -> ReasoningMode:
    """`cot`, `no-cot` (`nocot`), `assorted`, `pause:k=K`, `coconut:steps=N`, `mirage:steps=N` or
    `colar:steps=N,c=K` -> ReasoningMode; one-line errors."""
    name, _, knob = spec.strip().partition(":")
    kind = ALIASES.get(name, name)
    usage = "cot, no-cot, assorted, pause:k=K, coconut:steps=N, mirage:steps=N or colar:steps=N,c=K"
    if kind == "colar":
        found = re.fullmatch(r"steps=(\d+),c=(\d+)", knob)
        if found is None or int(found[2]) < 1:
            raise InputError(f"--latent {spec!r}: expected colar:steps=N,c=K, counts with K >= 1")
        return ReasoningMode(kind, int(found[1]), int(found[2]))
    if kind not in ("cot", "no-cot", "assorted", *MODE_KNOBS):
        raise InputError(f"--latent {spec!r}: unknown reasoning mode (modes: {usage})")
    if kind not in MODE_KNOBS:
        if knob:
            raise InputError(f"--latent {spec!r}: {kind} takes no options")
        return ReasoningMode(kind)
    key, sep, value = knob.partition("=")
    if key != MODE_KNOBS[kind] or not sep or not value.isdigit():
        raise InputError(f"--latent {spec!r}: expected {kind}:{MODE_KNOBS[kind]}=N, a count")
    if kind == "pause" and int(value) < 1:
        raise InputError(f"--latent {spec!r}: pause needs k >= 1 pause tokens")
    return ReasoningMode(kind, int(value))


def check_mode(model, tasks: Sequence[Task], mode: ReasoningMode) -> None:
    """Refuse, in one line and before inference, what `mode` cannot run on `model` for `tasks`;
    coconut attaches the head saved in the model's checkpoint dir when none is attached."""
    others = [task.name for task in tasks if not task.reasoning]
    if others:
        puzzles = ", ".join(t.name for t in (ProsQATask, ArithmeticTask, VisualCountTask))
        raise InputError(f"--latent {mode.label}: {others[0]} is no reasoning task ({puzzles})")
    if mode.kind == "pause":
        prompt_suffix(PuzzleFormat("pause", pause=mode.count), model.layout)
    if mode.kind == "assorted" and CODES_MODALITY not in model.layout.modalities:
        raise InputError(f"--latent assorted: the model's vocab layout has no {CODES_MODALITY} range")
    if mode.kind in ("coconut", "mirage", "colar"):
        head = find_latent_head(model)
        if head is None:
            try:
                head = load_latent_head(model)
            except CheckpointError as err:
                raise CheckpointError(f"--latent {mode.label} needs the model's latent head: {err}") from None
        head.check_steps([mode.count])
        kind = HEAD_KINDS.get(mode.kind)
        if kind is not None and not isinstance(head, kind):
            raise InputError(f"--latent {mode.label} needs a {mode.kind} latent head, the model has a {head.name} head")
        if mode.kind == "colar":
            head.use(mode.compression)


def with_fresh_head(twin, model) -> None:
    """Give `twin` (the untrained reference model) an untrained head like `model`'s, if it has one."""
    head = find_latent_head(model)
    if head is not None and find_latent_head(twin) is None:
        attach_latent_head(twin, build_head(head.name, twin, **head.options()))


def mode_generator(model, mode: ReasoningMode | None) -> Generator:
    """The generator that answers in `mode`: assorted's may open a `latent_codes` span, which
    has no tokenizer to decode it and so is not generatable by default."""
    generator = Generator(model)
    if mode is not None and mode.kind == "assorted":
        generator = Generator(model, (*generator.generatable, CODES_MODALITY))
    return generator


def reason(
    model,
    generator: Generator,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    mode: ReasoningMode | None,
) -> tuple[list[GenerationOutput], list[int]]:
    """The replies to `prompts` in `mode` (None: plain decoding), and the tokens each answer cost."""
    if mode is not None and mode.kind in ("coconut", "mirage"):
        outputs = latent_generate(model, prompts, mode.count, config, generator)
        return list(outputs), [o.generated_tokens for o in outputs]
    if mode is not None and mode.kind == "colar":
        outputs = colar_generate(model, prompts, mode.count, mode.compression, config, generator)
        return list(outputs), [o.generated_tokens for o in outputs]
    if mode is not None and mode.kind == "assorted":  # the codes span is part of the reply, not its end
        config = dataclasses.replace(config, stop_after_span=False)
    fed = prompt_suffix(PuzzleFormat("pause", pause=mode.count), model.layout) if mode and mode.kind == "pause" else []
    outputs = generator.generate([[*p, *fed] for p in prompts], config)
    return outputs, [len(fed) + len(o.ids) for o in outputs]
