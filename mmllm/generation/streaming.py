"""Streaming a reply to a terminal as it is generated: text as it forms, media as markers.

`TextStream` is a `Generator` token callback for one row. Text ids are decoded together each
step and only the new characters are written, so pieces that are parts of one character (byte
fallback) or that change spacing when joined print correctly. A media span prints `[image ...`
when it opens and `]` when it closes.
"""

from __future__ import annotations

from typing import TextIO

from mmllm.vocab import VocabLayout


class TextStream:
    def __init__(self, layout: VocabLayout, text_tokenizer, out: TextIO, row: int = 0) -> None:
        self.layout, self.text_tokenizer, self.out, self.row = layout, text_tokenizer, out, row
        self.begins = {layout.begin_id(name): name for name in layout.modalities}
        self.ends = {layout.end_id(name) for name in layout.modalities}
        self.text_ids: list[int] = []
        self.printed = ""
        self.in_span = False

    def __call__(self, row: int, token: int) -> None:
        if row != self.row:
            return
        if self.in_span:
            if token in self.ends:
                self.in_span = False
                self._write("]")
            return
        if token in self.begins:
            self._flush_text()
            self.in_span = True
            self._write(f"[{self.begins[token]} ...")
        elif token < self.layout.text_size:
            self.text_ids.append(token)
            text = self.text_tokenizer.decode(self.text_ids)
            if not text.endswith("\ufffd") and text.startswith(self.printed):  # a whole character formed
                self._write(text[len(self.printed) :])
                self.printed = text

    def _flush_text(self) -> None:
        self.text_ids, self.printed = [], ""

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def close(self) -> None:
        self._write("\n")
