"""The toy world: mmllm's embedded, seeded, procedural dataset (docs/data_format.md).

This module holds the scene grammar shared by every toy task (shapes, colours, sizes and
positions on a 3x3 grid, and the captions that describe them) and the renderers that turn
scenes into media:

    render_image   a scene as a 64x64 RGB image, each shape centred in its grid cell
    speak          a sentence as toy speech: each word a motif of two tones, 16 kHz mono
    render_video   a `Motion` as 9 frames: one shape sliding one cell left/right/up/down, or still
    sample_reach   an image of 2-3 shapes and a 10-step (dx, dy) chunk reaching the named one
    toy_media      n deterministic training items of one modality (what tokenizers train on)

Every renderer is a pure function of its arguments, and every sampler draws from the
`random.Random` it is given, so the whole world is reproducible from one seed. Shapes are
drawn with hard edges on exact pixel centres, so `mmllm.data.oracles` can read them back
exactly by matching the same masks.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import numpy as np

from mmllm.errors import InputError

SHAPES = ("circle", "square", "triangle", "star")
COLORS = ("red", "green", "blue", "yellow", "purple", "white")
SIZES = ("small", "large")
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")

IMAGE_SIZE = 64  # the toy images' side; an 8x8 token grid at 8x downsampling
GRID = 3  # cells per side: a 3x3 grid of positions
RGB = {  # saturated, each with a 0 and a 255 channel (white aside), and far apart in hue, so a blurred
    # reconstruction, which dims a colour or washes it out but keeps its hue, reads as the same colour
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (180, 0, 255),
    "white": (255, 255, 255),
}
RADIUS = {"large": 9.0, "small": 5.0}  # px at 64x64: large fills most of a 21.3 px cell, small about half
STAR_POINTS = 5
STAR_INNER = 0.45  # inner radius of the star / outer: deep notches, so it differs from a circle even when small


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


def sample_scene(rng: random.Random, num_shapes: int, taken: set[tuple[int, int]] = frozenset()) -> tuple[Shape, ...]:
    """`num_shapes` shapes in distinct cells (none in `taken`), no two with the same colour and shape."""
    shapes: list[Shape] = []
    while len(shapes) < num_shapes:
        candidate = sample_shape(rng, set(taken) | {(s.row, s.col) for s in shapes})
        if all((s.shape, s.color) != (candidate.shape, candidate.color) for s in shapes):
            shapes.append(candidate)
    return tuple(shapes)


def canonical(scene: tuple[Shape, ...]) -> tuple[Shape, ...]:
    """The scene in reading order (row, then column): the order the image oracle reports."""
    return tuple(sorted(scene, key=lambda s: (s.row, s.col)))


def relation(a: Shape, b: Shape) -> str:
    """Where `a` is with respect to `b`: 'left of' / 'right of' when their columns differ, else 'above' / 'below'."""
    if a.col != b.col:
        return "left of" if a.col < b.col else "right of"
    return "above" if a.row < b.row else "below"


def caption(scene: tuple[Shape, ...]) -> str:
    """'a large red circle at the top left', or a left/right/above/below relation for two shapes."""
    if len(scene) == 1:
        s = scene[0]
        return f"a {s.size} {s.color} {s.shape} at the {s.position}"
    a, b = scene[0], scene[1]
    return f"the {a.color} {a.shape} is {relation(a, b)} the {b.color} {b.shape}"


def caption_corpus(n: int, seed: int) -> list[str]:
    """`n` captions of one- and two-shape scenes, deterministic in `seed`."""
    rng = random.Random(seed)
    return [caption(sample_scene(rng, rng.choice((1, 2)))) for _ in range(n)]


# ---------------------------------------------------------------- images


def cell_centre(row: float, col: float, size: int = IMAGE_SIZE) -> tuple[float, float]:
    """Pixel coordinates (x, y) of a grid cell's centre."""
    cell = size / GRID
    return (col + 0.5) * cell, (row + 0.5) * cell


def _polygon(shape: str) -> np.ndarray | None:
    """Vertices (k, 2) of a shape of unit radius centred at 0, y pointing down; None for the circle."""
    if shape == "square":
        half = 0.8  # the square's half side; 0.8 keeps its corners inside the cell like the circle
        return np.array([(-half, -half), (half, -half), (half, half), (-half, half)])
    if shape == "triangle":  # apex up, base below the centre, so its area sits low like a triangle's should
        return np.array([(0.0, -1.0), (1.0, 0.85), (-1.0, 0.85)])
    if shape == "star":
        angles = -math.pi / 2 + np.arange(2 * STAR_POINTS) * math.pi / STAR_POINTS
        radii = np.where(np.arange(2 * STAR_POINTS) % 2 == 0, 1.05, 1.05 * STAR_INNER)  # 1.05: similar ink to a circle
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    return None


def shape_mask(shape: str, centre: tuple[float, float], radius: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean (size, size) mask of the pixels whose centres fall inside the shape."""
    if shape not in SHAPES:
        raise InputError(f"shape {shape!r}: not one of {', '.join(SHAPES)}")
    coords = (np.arange(size) + 0.5).astype(np.float64)
    x = (coords[None, :] - centre[0]) / radius
    y = (coords[:, None] - centre[1]) / radius
    vertices = _polygon(shape)
    if vertices is None:
        return x**2 + y**2 <= 1.0
    inside = np.zeros((size, size), dtype=bool)  # even-odd ray casting, vectorised over pixels
    for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, axis=0), strict=True):
        crosses = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_cross = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < x_cross)
    return inside


def draw(canvas: np.ndarray, shape: Shape, centre: tuple[float, float]) -> None:
    """Paint `shape` onto `canvas` (H, W, 3) in place, centred at pixel coordinates `centre`."""
    size = canvas.shape[0]
    mask = shape_mask(shape.shape, centre, RADIUS[shape.size] * size / IMAGE_SIZE, size)
    canvas[mask] = RGB[shape.color]


def render_image(scene: tuple[Shape, ...], size: int = IMAGE_SIZE) -> np.ndarray:
    """A scene as uint8 (size, size, 3): black background, each shape centred in its grid cell."""
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    for shape in scene:
        draw(canvas, shape, cell_centre(shape.row, shape.col, size))
    return canvas


# ---------------------------------------------------------------- toy speech

SPEECH_SAMPLE_RATE = 16000
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Every word a toy caption, question, answer or instruction uses. Append only: a word's position
# picks its tone pair, so reordering would change every recording.
SPEECH_VOCAB = (
    *("a", "the", "at", "is", "of", "are", "there", "to", "in", "and"),
    *SHAPES,
    *("circles", "squares", "triangles", "stars", "shape", "shapes"),
    *COLORS,
    *SIZES,
    *("top", "middle", "bottom", "left", "center", "right", "above", "below"),
    *("moving", "standing", "still", "up", "down", "move"),
    *("what", "where", "which", "how", "many", "color", "size", "side"),
    *("yes", "no"),
    *NUMBERS,
    *("more", "fewer", "same", "than", "first", "second", "image", "number", "does", "have", "it"),
)
TONE_FREQUENCIES = tuple(round(300 * (3500 / 300) ** (k / 11)) for k in range(12))  # 300..3500 Hz, x1.25 apart
TONE_PAIRS = tuple((a, b) for a in range(len(TONE_FREQUENCIES)) for b in range(len(TONE_FREQUENCIES)) if a != b)
WORD_TONES = {word: TONE_PAIRS[i] for i, word in enumerate(SPEECH_VOCAB)}
TONE_SECONDS = 0.08  # each of a word's two tones
GAP_SECONDS = 0.04  # silence between words
FADE_SECONDS = 0.005  # raised-cosine fade in and out of every tone, so no clicks spread the spectrum
AMPLITUDE = 0.5  # peak level: leaves headroom for a codec's overshoot
assert len(SPEECH_VOCAB) == len(set(SPEECH_VOCAB)) <= len(TONE_PAIRS)


def words(text: str) -> list[str]:
    """The lower-case words of `text`, punctuation dropped: what toy speech pronounces."""
    return re.findall(r"[a-z]+", text.lower())


def tone(frequency: float, sample_rate: int) -> np.ndarray:
    n = round(TONE_SECONDS * sample_rate)
    t = np.arange(n) / sample_rate
    wave = AMPLITUDE * np.sin(2 * np.pi * frequency * t)
    fade = round(FADE_SECONDS * sample_rate)
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(fade) / fade)
    wave[:fade] *= ramp
    wave[n - fade :] *= ramp[::-1]
    return wave


def speak(text: str, sample_rate: int = SPEECH_SAMPLE_RATE) -> np.ndarray:
    """Toy speech for `text`: float32 mono, each word two 80 ms tones, 40 ms of silence between words."""
    spoken = words(text)
    unknown = sorted({w for w in spoken if w not in WORD_TONES})
    if unknown:
        raise InputError(f"speak {text!r}: words outside the toy vocabulary: {', '.join(unknown)}")
    if not spoken:
        raise InputError(f"speak {text!r}: no words to say")
    gap = np.zeros(round(GAP_SECONDS * sample_rate))
    pieces: list[np.ndarray] = []
    for i, word in enumerate(spoken):
        if i:
            pieces.append(gap)
        pieces += [tone(TONE_FREQUENCIES[k], sample_rate) for k in WORD_TONES[word]]
    return np.concatenate(pieces).astype(np.float32)


# ---------------------------------------------------------------- video

DIRECTIONS = ("left", "right", "up", "down", "still")
STEP = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0), "still": (0, 0)}  # (rows, cols) per clip
NUM_FRAMES = 9  # 1 + 4k: a causal tokenizer with x4 temporal compression sees 3 latent frames


@dataclass(frozen=True)
class Motion:
    """`shape` starts in its grid cell and slides one cell in `direction` over the clip."""

    shape: Shape
    direction: str


def motion_caption(motion: Motion) -> str:
    """'a red circle moving left', or 'a red circle standing still'."""
    s = motion.shape
    verb = "standing still" if motion.direction == "still" else f"moving {motion.direction}"
    return f"a {s.color} {s.shape} {verb}"


def sample_motion(rng: random.Random) -> Motion:
    """A random shape and direction, started in a cell from which the move stays on the grid."""
    direction = rng.choice(DIRECTIONS)
    d_row, d_col = STEP[direction]
    cells = [(r, c) for r in range(GRID) for c in range(GRID) if 0 <= r + d_row < GRID and 0 <= c + d_col < GRID]
    row, col = rng.choice(cells)
    return Motion(Shape(rng.choice(SHAPES), rng.choice(COLORS), rng.choice(SIZES), row, col), direction)


def render_video(motion: Motion, num_frames: int = NUM_FRAMES, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 (num_frames, size, size, 3): the shape moving at constant speed from its cell to the next."""
    d_row, d_col = STEP[motion.direction]
    frames = np.zeros((num_frames, size, size, 3), dtype=np.uint8)
    for t in range(num_frames):
        progress = t / max(1, num_frames - 1)
        s = motion.shape
        draw(frames[t], s, cell_centre(s.row + d_row * progress, s.col + d_col * progress, size))
    return frames


# ---------------------------------------------------------------- actions

ACTION_STEPS = 10  # steps per chunk
MAX_STEP = 0.25  # image-coordinate length of a step of action 1.0 (the image spans [-1, 1]): action = delta / MAX_STEP
ACTION_NOISE = 0.02  # std of the zero-sum noise added to each normalised step: small next to the peak step (~0.5)


@dataclass(frozen=True)
class Reach:
    """A scene, the index of the shape to reach, and the (ACTION_STEPS, 2) normalised (dx, dy) chunk."""

    scene: tuple[Shape, ...]
    target: int
    actions: np.ndarray


def target_xy(shape: Shape) -> tuple[float, float]:
    """A shape's centre in image coordinates: x right, y down, both in [-1, 1]; (0, 0) is the image centre."""
    x, y = cell_centre(shape.row, shape.col, IMAGE_SIZE)
    return 2 * x / IMAGE_SIZE - 1, 2 * y / IMAGE_SIZE - 1


def instruction(shape: Shape) -> str:
    return f"move to the {shape.color} {shape.shape}"


def reach_actions(goal: tuple[float, float], noise: np.random.Generator | None = None) -> np.ndarray:
    """(ACTION_STEPS, 2) steps from (0, 0) to `goal` on a minimum-jerk profile, divided by MAX_STEP.

    Noise, when given, is zero-sum over the chunk, so the steps still end exactly on the goal.
    """
    tau = np.arange(ACTION_STEPS + 1) / ACTION_STEPS
    profile = 10 * tau**3 - 15 * tau**4 + 6 * tau**5  # minimum jerk: zero velocity and acceleration at both ends
    steps = np.diff(profile)[:, None] * np.asarray(goal)[None, :] / MAX_STEP
    if noise is not None:
        jitter = noise.normal(0.0, ACTION_NOISE, steps.shape)
        steps = steps + jitter - jitter.mean(axis=0)
    return np.clip(steps, -1.0, 1.0).astype(np.float32)


def sample_reach(rng: random.Random) -> Reach:
    """2-3 shapes off the centre cell (where the gripper starts), one named as the target."""
    scene = sample_scene(rng, rng.choice((2, 3)), taken={(1, 1)})
    target = rng.randrange(len(scene))
    noise = np.random.default_rng(rng.getrandbits(64))
    return Reach(scene, target, reach_actions(target_xy(scene[target]), noise))


# ---------------------------------------------------------------- training media


def toy_media(modality: str, n: int, seed: int) -> list[np.ndarray]:
    """`n` deterministic training items of one modality, in the ModalityTokenizer media conventions.

    image: 1-3 shape scenes; audio: toy speech of captions, motion captions and VQA questions at
    16 kHz; video: 9-frame motions; action: (10, 2) reaching chunks.
    """
    rng = random.Random(f"toy_media/{modality}/{seed}")  # str seeds hash with SHA-512: stable across runs
    if modality == "image":
        return [render_image(sample_scene(rng, rng.choice((1, 2, 3)))) for _ in range(n)]
    if modality == "audio":
        return [speak(sample_sentence(rng)) for _ in range(n)]
    if modality == "video":
        return [render_video(sample_motion(rng)) for _ in range(n)]
    if modality == "action":
        return [sample_reach(rng).actions for _ in range(n)]
    raise InputError(f"toy_media: unknown modality {modality!r} (image, audio, video, action)")


def sample_sentence(rng: random.Random) -> str:
    """A caption, a motion caption, or a VQA question: the sentences toy speech is trained on."""
    kind = rng.choice(("caption", "motion", "question"))
    if kind == "caption":
        return caption(sample_scene(rng, rng.choice((1, 2))))
    if kind == "motion":
        return motion_caption(sample_motion(rng))
    s = sample_shape(rng)
    return rng.choice(
        (
            f"what color is the {s.shape}",
            f"what shape is the {s.color} shape",
            f"where is the {s.color} {s.shape}",
            f"how many {s.shape}s are there",
            f"is the {s.color} {s.shape} left of the {rng.choice(COLORS)} {rng.choice(SHAPES)}",
        )
    )
