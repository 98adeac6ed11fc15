"""Pack pretokenized documents into fixed `seq_len` rows for training.

A row holds several documents. Each token carries its document id, so attention stays inside
its document (the backbone's packed-row mask), and positions restart at every document.

Two kinds of document, two rules:

- A pretraining document (`splittable`) may continue in a later row, but only at a cut point
  outside every modality span: an image, clip or utterance is never split across rows. Each
  piece is a document of its own in its row, positions restarting.
- A conversation (SFT) is never split. One longer than `seq_len` is truncated at the last cut
  point that fits (counted), or skipped (counted), as `overflow` says.

Rows are filled from a buffer of `buffer_size` pending documents. The oldest opens the row
(documents keep their stream order, and none waits forever); then, best fit, the longest
document that fits the space left goes in, again and again. When none fits, a splittable
document is cut to fill the row; otherwise the row is closed and padded. On the toy world this wastes under 1%
of pretraining tokens and a few percent of SFT tokens (`PackingStats.fill`).

Documents are drawn from a mixture of sources with weights (`Mixture`), each source shuffled
anew every epoch. Generation tasks get classifier-free-guidance condition dropout: with
probability `condition_dropout`, a document's conditioning text (marked at pretokenization) is
replaced by one `<|null|>` token, so the model also learns the unconditional distribution
that guidance subtracts (LlamaGen, Emu3: 10%).

Nested dropout (FlexTok; MQT's sampled budgets) trains one model for every token budget of a 1D
prefix tokenizer such as image-titok: with `nested_dropout: {image: [4, 8, 16, 32]}`, each closed
span of that modality keeps its first b tokens, b drawn from the list per span, and its end token
follows at once (a ragged range allows any length). The end token of a shortened span is not a
target, so generation still learns to close an item only after all of its tokens.

Everything is deterministic given the seed, so a resumed run regenerates the same rows and
skips the ones it already trained on (`PackedRows.rows(start=...)`).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from mmllm.errors import ConfigError
from mmllm.model.loss import IGNORE_INDEX
from mmllm.vocab import VocabLayout

TEXT = 0  # `Document.modality` value of text and special tokens; modality k of the layout is k + 1


@dataclass
class Document:
    """One pretokenized sample: a document or a conversation."""

    input_ids: np.ndarray  # int64 (T,)
    loss_mask: np.ndarray  # bool (T,): True where the token is a training target
    modality: np.ndarray  # int8 (T,): TEXT, or 1 + the layout index of the span's modality (delimiters included)
    condition: np.ndarray  # bool (T,): conditioning text that CFG dropout may replace by <|null|>
    splittable: bool  # pretraining documents may continue in the next row; conversations may not
    source: int = 0
    loss_scale: float = 1.0  # multiplies its targets' loss weights (document loss averaging); pieces keep it

    def __len__(self) -> int:
        return len(self.input_ids)

    def slice(self, start: int, stop: int) -> Document:
        return Document(
            self.input_ids[start:stop],
            self.loss_mask[start:stop],
            self.modality[start:stop],
            self.condition[start:stop],
            self.splittable,
            self.source,
            self.loss_scale,
        )


@dataclass
class PackingConfig:
    seq_len: int = 1024
    overflow: Literal["truncate", "skip"] = "truncate"  # for a conversation longer than seq_len
    buffer_size: int = 256  # pending documents the best-fit search chooses from
    condition_dropout: float = 0.1  # CFG: probability of replacing a document's conditioning text
    modality_loss_weights: dict[str, float] = field(default_factory=dict)  # e.g. {"image": 0.5}; others 1
    # How a document's targets share the loss (see `document_loss_scale`): "token" weighs every
    # target alike; "square" (InternVL 2.5's square averaging) weighs each of a document's n
    # targets by sqrt(square_reference / n), so short answers are not drowned by long outputs.
    loss_averaging: Literal["token", "square"] = "token"
    square_reference: int = 64  # targets a document has when "square" leaves its weights at 1
    # {modality: token budgets}: each span keeps a prefix of a budget drawn per span (nested dropout)
    nested_dropout: dict[str, list[int]] = field(default_factory=dict)
    seed: int = 0

    def check(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"packing.seq_len must be at least 2, got {self.seq_len}")
        if self.overflow not in ("truncate", "skip"):
            raise ConfigError(f"packing.overflow must be 'truncate' or 'skip', got {self.overflow!r}")
        if self.loss_averaging not in ("token", "square"):
            raise ConfigError(f"packing.loss_averaging must be 'token' or 'square', got {self.loss_averaging!r}")
        if self.square_reference < 1:
            raise ConfigError(f"packing.square_reference must be at least 1, got {self.square_reference}")
        if self.buffer_size < 1:
            raise ConfigError(f"packing.buffer_size must be at least 1, got {self.buffer_size}")
        if not 0.0 <= self.condition_dropout <= 1.0:
            raise ConfigError(f"packing.condition_dropout must be in [0, 1], got {self.condition_dropout}")
        for name, budgets in self.nested_dropout.items():
            if not isinstance(budgets, list) or not budgets or any(not isinstance(b, int) or b < 1 for b in budgets):
                raise ConfigError(f"packing.nested_dropout.{name} must be a list of token budgets >= 1, got {budgets}")


@dataclass
class PackedRow:
    """One training row; every array has length seq_len."""

    input_ids: np.ndarray  # int64
    labels: np.ndarray  # int64: the token where it is a target, else IGNORE_INDEX (not yet shifted)
    position_ids: np.ndarray  # int64: restart at 0 for every document
    document_ids: np.ndarray  # int64: 0, 1, ... per document in the row; padding gets one id of its own
    loss_weights: np.ndarray  # float32: per-modality weight of each target token, 0 elsewhere
    modality: np.ndarray  # int8: TEXT or 1 + layout modality index, for per-modality loss reporting
    real_tokens: int  # tokens that are not padding


@dataclass
class PackingStats:
    rows: int = 0
    real_tokens: int = 0
    documents: int = 0
    split: int = 0  # pretraining documents continued in a later row
    truncated: int = 0  # documents cut short: a conversation to seq_len, or at a span longer than a row
    skipped: int = 0  # documents dropped: too long (overflow: skip), or no target left after truncation
    condition_dropped: int = 0
    spans_shortened: int = 0  # modality spans cut to a nested-dropout budget

    def fill(self, seq_len: int) -> float:
        """Fraction of row tokens that are real (not padding)."""
        return self.real_tokens / max(1, self.rows * seq_len)


class Mixture:
    """An endless stream of documents drawn from weighted sources, each reshuffled per epoch."""

    def __init__(self, sources: Sequence[Sequence[Document]], weights: Sequence[float], seed: int) -> None:
        if not sources or len(sources) != len(weights):
            raise ConfigError("a data mixture needs one weight per source and at least one source")
        if any(len(source) == 0 for source in sources):
            raise ConfigError("a data mixture source is empty")
        weights = np.asarray(weights, dtype=np.float64)
        if (weights < 0).any() or weights.sum() <= 0:
            raise ConfigError(f"mixture weights must be non-negative with a positive sum, got {weights.tolist()}")
        self.sources = sources
        self.probabilities = weights / weights.sum()
        self.seed = seed

    def __iter__(self) -> Iterator[Document]:
        rng = np.random.default_rng(self.seed)
        orders = [self._order(i, 0) for i in range(len(self.sources))]
        epochs = [0] * len(self.sources)
        cursors = [0] * len(self.sources)
        while True:
            i = int(rng.choice(len(self.sources), p=self.probabilities)) if len(self.sources) > 1 else 0
            if cursors[i] == len(orders[i]):
                epochs[i] += 1
                orders[i], cursors[i] = self._order(i, epochs[i]), 0
            document = self.sources[i][int(orders[i][cursors[i]])]
            cursors[i] += 1
            yield document

    def _order(self, source: int, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, source, epoch)).permutation(len(self.sources[source]))


def cut_points(document: Document, span_begins: np.ndarray, span_ends: np.ndarray) -> np.ndarray:
    """Sorted positions p (0 < p < len) where the document may be cut so that [p:] starts a new piece.

    A cut may not fall inside a modality span: after its begin delimiter and before its end delimiter.
    """
    ids = document.input_ids
    # Cutting before token p is safe when token p-1 is text or closes a span, or token p opens one.
    allowed = (document.modality[:-1] == TEXT) | np.isin(ids[:-1], span_ends) | np.isin(ids[1:], span_begins)
    return np.nonzero(allowed)[0] + 1


class Packer:
    """Turns a document stream into rows (see the module docstring)."""

    def __init__(self, config: PackingConfig, layout: VocabLayout) -> None:
        config.check()
        self.config = config
        self.pad_id = layout.pad_id
        self.null_id = layout.null_id
        self.span_delimiters = (
            np.array([layout.begin_id(name) for name in layout.modalities], dtype=np.int64),
            np.array([layout.end_id(name) for name in layout.modalities], dtype=np.int64),
        )
        names = list(layout.modalities)
        unknown = set(config.modality_loss_weights) - set(names) - {"text"}
        if unknown:
            raise ConfigError(f"modality_loss_weights: unknown modalities {sorted(unknown)} (known: text, {names})")
        self.weight_of_modality = np.array(
            [config.modality_loss_weights.get("text", 1.0)] + [config.modality_loss_weights.get(n, 1.0) for n in names],
            dtype=np.float32,
        )
        self.budgets = [self._budgets(layout, name, budgets) for name, budgets in config.nested_dropout.items()]
        self.stats = PackingStats()

    @staticmethod
    def _budgets(layout: VocabLayout, name: str, budgets: list[int]) -> tuple[int, int, int, np.ndarray]:
        """(begin id, end id, ids per token, budgets) of a nested-dropout modality, which must be ragged."""
        if name not in layout.modalities:
            raise ConfigError(f"packing.nested_dropout: unknown modality {name!r} (known: {list(layout.modalities)})")
        m = layout.modalities[name]
        if m.grid is not None or m.row_end:
            raise ConfigError(
                f"packing.nested_dropout: {name} has a fixed grid; budgets need a 1D prefix tokenizer (image-titok)"
            )
        if max(budgets) > m.max_frames:
            raise ConfigError(f"packing.nested_dropout: {name} budgets must be at most {m.max_frames}, got {budgets}")
        return layout.begin_id(name), layout.end_id(name), m.stream_levels, np.array(budgets, dtype=np.int64)

    def rows(self, documents: Iterator[Document]) -> Iterator[PackedRow]:
        cfg = self.config
        rng = np.random.default_rng((cfg.seed, 1))  # condition dropout draws, apart from the mixture's
        pending: list[tuple[int, int, Document]] = []  # (length, arrival, document) sorted by length
        arrival = 0
        exhausted = False
        while True:
            while not exhausted and len(pending) < cfg.buffer_size:
                document = next(documents, None)
                if document is None:
                    exhausted = True
                    break
                document = self._prepare(document, rng)
                if document is not None:
                    bisect.insort(pending, (len(document), arrival, document), key=lambda item: item[:2])
                    arrival += 1
            if not pending:
                return
            yield self._fill_row(pending)

    def _prepare(self, document: Document, rng: np.random.Generator) -> Document | None:
        """Nested dropout, condition dropout, then the overflow rule for a conversation longer than seq_len."""
        cfg = self.config
        self.stats.documents += 1
        for begin, end, ids_per_token, budgets in self.budgets:
            document, shortened = shorten_spans(document, begin, end, ids_per_token, budgets, rng)
            self.stats.spans_shortened += shortened
        if cfg.condition_dropout and document.condition.any() and rng.random() < cfg.condition_dropout:
            document = drop_condition(document, self.null_id)
            self.stats.condition_dropped += 1
        if len(document) <= cfg.seq_len:
            return self._scaled(document)
        bounds = np.concatenate(([0], cut_points(document, *self.span_delimiters), [len(document)]))
        if document.splittable:
            # Pieces end at cut points, so each stretch between two must fit a row: a span longer
            # than seq_len ends the document there.
            too_long = np.nonzero(np.diff(bounds) > cfg.seq_len)[0]
            end = len(document) if len(too_long) == 0 else int(bounds[too_long[0]])
        elif cfg.overflow == "truncate":
            end = int(bounds[bounds <= cfg.seq_len][-1])
        else:
            end = 0
        if end == 0 or not document.loss_mask[:end].any():  # nothing left to learn from
            self.stats.skipped += 1
            return None
        if end < len(document):
            self.stats.truncated += 1
        return self._scaled(document.slice(0, end))

    def _scaled(self, document: Document) -> Document:
        """The document with its loss scale set, before any split, so all its pieces share it."""
        cfg = self.config
        scale = document_loss_scale(int(document.loss_mask.sum()), cfg.loss_averaging, cfg.square_reference)
        return dataclasses.replace(document, loss_scale=scale)

    def _fill_row(self, pending: list[tuple[int, int, Document]]) -> PackedRow:
        seq_len = self.config.seq_len
        # The oldest pending document opens the row, so documents leave in stream order and
        # none waits forever; best fit then fills the space behind it.
        _, order, first = pending.pop(min(range(len(pending)), key=lambda i: pending[i][1]))
        if len(first) > seq_len:  # only splittable documents are longer than a row (see _prepare)
            first = self._cut(first, order, seq_len, pending)
        pieces = [first]
        space = seq_len - len(first)
        while pending and space > 0:
            # Best fit: the longest pending document that fits the space left.
            index = bisect.bisect_right(pending, space, key=lambda item: item[0]) - 1
            if index >= 0:
                _, _, document = pending.pop(index)
                pieces.append(document)
                space -= len(document)
                continue
            piece = self._split_one(pending, space)
            if piece is None:
                break
            pieces.append(piece)
            space -= len(piece)
        return self._assemble(pieces)

    def _split_one(self, pending: list[tuple[int, int, Document]], space: int) -> Document | None:
        """Cut the longest splittable pending document to fill `space`; the rest stays pending."""
        for index in range(len(pending) - 1, -1, -1):
            _, order, document = pending[index]
            if not document.splittable:
                continue
            cuts = cut_points(document, *self.span_delimiters)
            if len(cuts) == 0 or cuts[0] > space:
                continue
            pending.pop(index)
            return self._cut(document, order, space, pending)
        return None

    def _cut(self, document: Document, order: int, space: int, pending: list) -> Document:
        """The longest head of `document` that fits `space`; the rest goes back to `pending`."""
        cuts = cut_points(document, *self.span_delimiters)
        cut = int(cuts[cuts <= space][-1])
        rest = document.slice(cut, len(document))
        bisect.insort(pending, (len(rest), order, rest), key=lambda item: item[:2])
        self.stats.split += 1
        return document.slice(0, cut)

    def _assemble(self, pieces: list[Document]) -> PackedRow:
        seq_len = self.config.seq_len
        input_ids = np.full(seq_len, self.pad_id, dtype=np.int64)
        labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
        position_ids = np.arange(seq_len, dtype=np.int64)  # padding: counts on as a document of its own
        document_ids = np.full(seq_len, len(pieces), dtype=np.int64)  # padding: one document of its own
        modality = np.zeros(seq_len, dtype=np.int8)
        scale = np.ones(seq_len, dtype=np.float32)
        start = 0
        for number, piece in enumerate(pieces):
            stop = start + len(piece)
            input_ids[start:stop] = piece.input_ids
            labels[start:stop] = np.where(piece.loss_mask, piece.input_ids, IGNORE_INDEX)
            position_ids[start:stop] = np.arange(len(piece))
            document_ids[start:stop] = number
            modality[start:stop] = piece.modality
            scale[start:stop] = piece.loss_scale
            start = stop
        position_ids[start:] -= start
        weights = self.weight_of_modality[modality] * scale
        loss_weights = np.where(labels != IGNORE_INDEX, weights, 0.0).astype(np.float32)
        self.stats.rows += 1
        self.stats.real_tokens += start
        return PackedRow(input_ids, labels, position_ids, document_ids, loss_weights, modality, start)


def document_loss_scale(targets: int, averaging: str, reference: int) -> float:
    """The weight of each of a document's `targets` loss tokens under `averaging`.

    "token" gives 1: a document counts by its number of targets, so on the toy world a 3-token
    VQA answer weighs 1/125 of a 375-token interleaved document. "square" gives
    sqrt(reference / targets): the document's total weight grows as sqrt(targets) instead
    (InternVL 2.5), between per-token and per-document averaging.
    """
    if averaging == "token" or targets == 0:
        return 1.0
    return math.sqrt(reference / targets)


def shorten_spans(
    document: Document, begin_id: int, end_id: int, ids_per_token: int, budgets: np.ndarray, rng: np.random.Generator
) -> tuple[Document, int]:
    """Each span from `begin_id` to its `end_id` keeps its first b tokens (b drawn from `budgets` per
    span); a shortened span's end token is no target. Returns the document and the spans shortened."""
    ids = document.input_ids
    begins, ends = np.flatnonzero(ids == begin_id), np.flatnonzero(ids == end_id)
    keep = np.ones(len(ids), dtype=bool)
    loss_mask = document.loss_mask.copy()
    shortened = 0
    for begin in begins:
        end = int(ends[np.searchsorted(ends, begin)])  # pretokenized spans are always closed
        stop = begin + 1 + int(rng.choice(budgets)) * ids_per_token
        if stop < end:
            keep[stop:end] = False
            loss_mask[end] = False
            shortened += 1
    if not shortened:
        return document, 0
    return (
        Document(
            ids[keep],
            loss_mask[keep],
            document.modality[keep],
            document.condition[keep],
            document.splittable,
            document.source,
        ),
        shortened,
    )


def drop_condition(document: Document, null_id: int) -> Document:
    """The document with each run of conditioning tokens replaced by one <|null|> (no loss on it)."""
    keep = ~document.condition
    starts = document.condition & ~np.concatenate(([False], document.condition[:-1]))
    keep |= starts
    input_ids = np.where(starts, null_id, document.input_ids)[keep]
    return Document(
        input_ids,
        np.where(starts, False, document.loss_mask)[keep],
        np.where(starts, TEXT, document.modality)[keep].astype(np.int8),
        np.zeros(len(input_ids), dtype=bool),
        document.splittable,
        document.source,
    )
