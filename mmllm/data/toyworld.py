"""The toy world: mmllm's embedded, seeded, procedural dataset (see docs/architecture.md).

This module holds the scene grammar shared by every toy task: shapes, colours, sizes and
positions on a 3x3 grid, and the captions that describe them. Media rendering and the oracles
that read media back build on these scenes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SHAPES = ("circle", "square", "triangle", "star")
COLORS = ("red", "green", "blue", "yellow", "purple", "white")
SIZES = ("small", "large")
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")


@dataclass(frozen=True)
class Shape:
    shape: str
    color: str
    size: str
    row: int  # 0..2, top to bottom
    col: int  # 0..2, left to right

    @property
    def position(self) -> str:
        """'top left', 'middle right', ...; the centre cell is just 'center'."""
        if (self.row, self.col) == (1, 1):
            return "center"
        return f"{ROWS[self.row]} {COLUMNS[self.col]}"


def sample_shape(rng: random.Random, taken: set[tuple[int, int]] = frozenset()) -> Shape:
    cells = [(r, c) for r in range(3) for c in range(3) if (r, c) not in taken]
    row, col = rng.choice(cells)
    return Shape(rng.choice(SHAPES), rng.choice(COLORS), rng.choice(SIZES), row, col)


def sample_scene(rng: random.Random, num_shapes: int) -> tuple[Shape, ...]:
    """`num_shapes` shapes in distinct cells, no two with the same colour and shape."""
    shapes: list[Shape] = []
    while len(shapes) < num_shapes:
        candidate = sample_shape(rng, {(s.row, s.col) for s in shapes})
        if all((s.shape, s.color) != (candidate.shape, candidate.color) for s in shapes):
            shapes.append(candidate)
    return tuple(shapes)


def caption(scene: tuple[Shape, ...]) -> str:
    """'a large red circle at the top left', or a left/right/above/below relation for two shapes."""
    if len(scene) == 1:
        s = scene[0]
        return f"a {s.size} {s.color} {s.shape} at the {s.position}"
    a, b = scene[0], scene[1]
    if a.col != b.col:
        relation = "left of" if a.col < b.col else "right of"
    else:
        relation = "above" if a.row < b.row else "below"
    return f"the {a.color} {a.shape} is {relation} the {b.color} {b.shape}"


def caption_corpus(n: int, seed: int) -> list[str]:
    """`n` captions of one- and two-shape scenes, deterministic in `seed`."""
    rng = random.Random(seed)
    return [caption(sample_scene(rng, rng.choice((1, 2)))) for _ in range(n)]
