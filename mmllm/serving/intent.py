"""Which modality a chat reply should be, read from the user's words when the client does not say.

The rules are keywords, matched case-insensitively as whole words (`draw` matches "Draw a
circle" but not "drawer"; `say` matches "Say: hello" but not "essay"):

    image   draw, paint, picture of, image of
    audio   say, speak, read aloud, pronounce
    video   animate, video of, clip of
    action  move to, reach, go to

The keyword that occurs first in the text wins, among the modalities in `available` (the ones
the model can generate); with no match the reply is "text". The toy world's instructions fit
them: "Draw a red circle.", "Say: ...", "Animate ...", "move to the blue square". They are a
heuristic: a client that knows what it wants sets OpenAI's `modalities` or our
`mmllm.reply_modality` field, and then these rules are not consulted; nor are they when the
server runs with `--text-replies` (for eval harnesses, whose questions say "picture of").
"""

from __future__ import annotations

import re
from collections.abc import Iterable

RULES: dict[str, tuple[str, ...]] = {
    "image": ("draw", "paint", "picture of", "image of"),
    "audio": ("say", "speak", "read aloud", "pronounce"),
    "video": ("animate", "video of", "clip of"),
    "action": ("move to", "reach", "go to"),
}

_PATTERNS = {
    modality: re.compile(r"\b(?:" + "|".join(k.replace(" ", r"\s+") for k in keywords) + r")\b", re.IGNORECASE)
    for modality, keywords in RULES.items()
}


def reply_modality(text: str, available: Iterable[str]) -> str:
    """The modality the reply to `text` should open with: the first keyword's modality among
    `available`, else "text"."""
    best, position = "text", len(text) + 1
    for modality in set(available) & set(_PATTERNS):
        match = _PATTERNS[modality].search(text)
        if match is not None and match.start() < position:
            best, position = modality, match.start()
    return best
