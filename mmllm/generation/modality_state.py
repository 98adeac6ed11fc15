"""The modality state machine: which ids each row of a batch may produce next.

A row is either in text or inside a span of one modality, at some step of it. In text the
allowed ids are `VocabLayout.allowed_ids("text", 0)` (text, the begin token of each modality
the model can generate, end of turn, end of document). After a begin token only that
modality's codes may follow, level by level as the layout streams them, exactly as many as
the grid holds (ragged modalities: up to their limit, then the end token may or must come);
the layout's own `allowed_ids(modality, step)` answers each step, so residual levels, delay
patterns and end-of-row ids are respected without code of their own here.

Every mask the batch can need is built once into one table on the model's device: row 0 is
text, then one row per step of each modality's span. A row's state is an index into that
table, so a decode step gathers (B, V) masks and advances every row with a few tensor ops and
no Python loop over rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from mmllm.errors import LayoutError
from mmllm.vocab import VocabLayout

TEXT = 0  # modality index of text; modality i >= 1 is the layout's (i - 1)-th modality


class ModalityStates:
    """Per-row (modality, step) of a generating batch, and the logit masks they imply.

    `generatable` names the modalities whose begin token text may produce (those with a
    tokenizer that decodes); spans of other modalities can still be continued when a prompt
    opens one, so a forced prefix of any modality works.
    """

    def __init__(self, layout: VocabLayout, generatable: Iterable[str], device: torch.device) -> None:
        self.layout = layout
        self.names = ["text", *layout.modalities]
        generatable = set(generatable)
        unknown = generatable - set(layout.modalities)
        if unknown:
            raise LayoutError(f"cannot generate {sorted(unknown)}: not in this layout ({', '.join(layout.modalities)})")
        vocab = layout.padded_size
        text_mask = torch.from_numpy(layout.allowed_mask("text", 0))
        for name in set(layout.modalities) - generatable:
            text_mask[layout.begin_id(name)] = False
        masks = [text_mask]
        self.base = [TEXT]  # first table row of each modality index
        self.span_steps = [1]  # steps of each modality's span, the end token's included
        for m in layout.modalities.values():
            self.base.append(len(masks))
            steps = m.max_length + 1  # every code slot, then the end token
            masks += [torch.from_numpy(layout.allowed_mask(m.name, step)) for step in range(steps)]
            self.span_steps.append(steps)
        self.table = torch.stack(masks).to(device)  # (rows, V) bool
        self.begin_of = torch.zeros(vocab, dtype=torch.long, device=device)  # id -> modality index, 0 if none
        self.end_id = torch.full((len(self.names),), -1, dtype=torch.long, device=device)
        for i, name in enumerate(layout.modalities, start=1):
            self.begin_of[layout.begin_id(name)] = i
            self.end_id[i] = layout.end_id(name)
        self.base_t = torch.tensor(self.base, device=device)
        self.modality = torch.zeros(0, dtype=torch.long, device=device)
        self.step = torch.zeros(0, dtype=torch.long, device=device)

    def start(self, prompts: Sequence[Sequence[int]]) -> None:
        """Set each row's state from its prompt: text, or inside a span the prompt leaves open."""
        states = [self._state_after(prompt) for prompt in prompts]
        device = self.table.device
        self.modality = torch.tensor([m for m, _ in states], dtype=torch.long, device=device)
        self.step = torch.tensor([s for _, s in states], dtype=torch.long, device=device)

    def _state_after(self, prompt: Sequence[int]) -> tuple[int, int]:
        begins = {self.layout.begin_id(name): i for i, name in enumerate(self.layout.modalities, start=1)}
        ends = {self.layout.end_id(name) for name in self.layout.modalities}
        for back, token in enumerate(reversed(prompt)):
            if token in ends:
                return TEXT, 0
            if token in begins:
                modality = begins[token]
                if back >= self.span_steps[modality]:
                    name = self.names[modality]
                    raise LayoutError(f"the prompt's open {name} span already has {back} ids, more than a span holds")
                return modality, back
        return TEXT, 0

    def masks(self) -> Tensor:
        """(B, V) bool: the ids each row may produce next."""
        return self.table[self.base_t[self.modality] + self.step]

    def advance(self, tokens: Tensor) -> Tensor:
        """Move every row past its new token; returns (B,) bool: the rows whose span just closed."""
        in_text = self.modality == TEXT
        closes = ~in_text & (tokens == self.end_id[self.modality])
        opened = torch.where(in_text, self.begin_of[tokens], torch.zeros_like(tokens))
        self.modality = torch.where(in_text, opened, torch.where(closes, torch.zeros_like(tokens), self.modality))
        self.step = torch.where(in_text | closes, torch.zeros_like(self.step), self.step + 1)
        return closes

    def select(self, rows: Tensor) -> None:
        """Keep only `rows` (when finished rows leave the batch)."""
        self.modality, self.step = self.modality[rows], self.step[rows]
