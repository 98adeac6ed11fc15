"""Exact readers of toy-world media: the toy world's GenEval-style detectors.

Each oracle turns a medium back into the facts it was rendered from, or says it is unreadable
(None) rather than guess:

    read_image   64x64 image -> its shapes (shape, colour, size, cell), in reading order
    read_speech  toy speech  -> its words, from short-time spectral peaks
    read_video   9 frames    -> (shape, colour, direction)
    read_action  action chunk -> final gripper position; `reach_error` -> distance to a target

Images and video: a pixel is ink when its brightest channel reaches INK_LEVEL. Its colour is
white when it is nearly grey, else the palette entry nearest in hue (the pixel minus its
smallest channel, divided by its range), so a dimmed, blurred or washed-out reconstruction
keeps its colour. A shape is the template (shape, size) whose
mask best overlaps the ink (intersection over union); a reading needs a clear template match and
one dominant colour, which uniform noise never gives. Speech: loud runs separated by silence
are words; each half of a run is one tone, read as the strongest spectral peak and snapped to
the tone table; a tone pair that no word owns, an impure peak, or a run of the wrong length
makes the sentence unreadable.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from mmllm.data.toyworld import (
    COLORS,
    GRID,
    IMAGE_SIZE,
    MAX_STEP,
    RADIUS,
    RGB,
    SHAPES,
    SIZES,
    STEP,
    TONE_FREQUENCIES,
    WORD_TONES,
    Shape,
    cell_centre,
    shape_mask,
)
from mmllm.errors import MediaError

INK_LEVEL = 96  # brightest channel at which a pixel counts as drawn: well above black, below half of 255
HUE_TOLERANCE = 0.35  # max hue distance to a palette colour; the closest two (blue, purple) are 0.71 apart
WHITE_SATURATION = 0.35  # (max - min) / max below this is grey, i.e. white ink; every other colour has 1.0
MIN_INK = 12  # px: fewer drawn pixels in a cell is empty (the smallest shape, a small star, has ~36)
MIN_IOU = 0.65  # template overlap needed to name a shape: clean renders match at ~1.0, a blurred small star at ~0.7
WINDOW = 26  # px around a moving shape's centroid where templates are drawn: the largest shape spans 19
SUBPIXEL = 8  # moving-shape templates are drawn at centres snapped to 1/8 px
MIN_PURITY = 0.75  # fraction of a shape's ink that must share one colour; uniform noise gives ~0.2
PALETTE_HUE = np.array([RGB[c] for c in COLORS], dtype=np.float32) / 255  # every colour has a 0 and a 255 channel
PALETTE_HUE[COLORS.index("white")] = np.inf  # white has no hue: it is told by its low saturation

# ---------------------------------------------------------------- pixels and templates


def _as_frames(array: np.ndarray, ndim: int) -> np.ndarray | None:
    array = np.asarray(array)
    if array.ndim != ndim or array.shape[-1] != 3 or array.shape[-3:-1] != (IMAGE_SIZE, IMAGE_SIZE):
        return None
    if array.dtype != np.uint8:
        array = np.clip(np.nan_to_num(array.astype(np.float64)), 0, 255).round().astype(np.uint8)
    return array


def ink_and_colour(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boolean ink mask (..., H, W) and each ink pixel's palette index (-1 where no colour is near, or no ink).

    A pixel's grey part (its smallest channel) is removed before its hue is compared, so a colour
    washed towards grey or white at a blurred edge keeps its name; a nearly grey pixel is white.
    """
    ink = image.max(axis=-1) >= INK_LEVEL
    pixels = image[ink].astype(np.float32)
    high, low = pixels.max(axis=-1, keepdims=True), pixels.min(axis=-1, keepdims=True)
    hue = (pixels - low) / np.maximum(high - low, 1.0)
    distance = np.sqrt(((hue[:, None, :] - PALETTE_HUE[None]) ** 2).sum(axis=-1))
    nearest = np.where(distance.min(axis=-1) <= HUE_TOLERANCE, distance.argmin(axis=-1), -1)
    grey = ((high - low) / high)[:, 0] < WHITE_SATURATION
    colour = np.full(ink.shape, -1, dtype=np.int64)
    colour[ink] = np.where(grey, COLORS.index("white"), nearest)
    return ink, colour


def _dominant_colour(colour_of_ink: np.ndarray) -> str | None:
    counts = np.bincount(colour_of_ink[colour_of_ink >= 0], minlength=len(COLORS))
    best = int(counts.argmax())
    return COLORS[best] if counts[best] >= MIN_PURITY * colour_of_ink.size else None


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


@functools.cache
def _cell_templates(row: int, col: int) -> tuple[tuple[str, str, np.ndarray], ...]:
    centre = cell_centre(row, col)
    return tuple((s, z, shape_mask(s, centre, RADIUS[z])) for s in SHAPES for z in SIZES)


@functools.cache
def _centroid_offset(shape: str, size: str) -> tuple[float, float]:
    """Offset of a rendered shape's ink centroid from its drawing centre (the triangle's sits low)."""
    centre = (IMAGE_SIZE / 2, IMAGE_SIZE / 2)
    ys, xs = np.nonzero(shape_mask(shape, centre, RADIUS[size]))
    return float(xs.mean() + 0.5 - centre[0]), float(ys.mean() + 0.5 - centre[1])


def _snap(coordinate: float) -> float:
    return round(coordinate * SUBPIXEL) / SUBPIXEL


@functools.lru_cache(maxsize=4096)  # centres snapped to 1/SUBPIXEL px repeat, so templates are drawn once
def _window_template(shape: str, size: str, x: float, y: float) -> tuple[np.ndarray, int]:
    mask = shape_mask(shape, (x, y), RADIUS[size], WINDOW)
    return mask, int(np.count_nonzero(mask))


def _best_template(ink: np.ndarray, templates) -> tuple[str, str, float]:
    scored = [(s, z, _iou(ink, mask)) for s, z, mask in templates]
    return max(scored, key=lambda item: item[2])


# ---------------------------------------------------------------- images


def _cell_slices(index: int) -> slice:
    cell = IMAGE_SIZE / GRID
    return slice(round(index * cell), round((index + 1) * cell))


def read_image(image: np.ndarray) -> tuple[Shape, ...] | None:
    """The shapes of a 64x64 toy image in reading order, or None when any cell is unreadable."""
    frame = _as_frames(image, ndim=3)
    if frame is None:
        return None
    ink, colour = ink_and_colour(frame)
    shapes = []
    for row in range(GRID):
        for col in range(GRID):
            cell = np.zeros_like(ink)
            cell[_cell_slices(row), _cell_slices(col)] = True
            cell_ink = ink & cell
            if cell_ink.sum() < MIN_INK:
                continue
            shape, size, overlap = _best_template(cell_ink, _cell_templates(row, col))
            colour_name = _dominant_colour(colour[cell_ink])
            if overlap < MIN_IOU or colour_name is None:
                return None
            shapes.append(Shape(shape, colour_name, size, row, col))
    return tuple(shapes) if shapes else None


# ---------------------------------------------------------------- video


@dataclass(frozen=True)
class VideoReading:
    shape: str
    color: str
    direction: str


def _read_frame_shape(ink: np.ndarray) -> tuple[str, float, tuple[float, float]] | None:
    """(shape, overlap, ink centroid) of the single shape in one frame, templates aligned on the centroid.

    Templates are drawn in a WINDOW around the centroid only (ink outside it still counts in the union).
    """
    ys, xs = np.nonzero(ink)
    if len(xs) < MIN_INK:
        return None
    cx, cy = float(xs.mean() + 0.5), float(ys.mean() + 0.5)
    x0, y0 = round(cx) - WINDOW // 2, round(cy) - WINDOW // 2
    local = np.zeros((WINDOW, WINDOW), dtype=bool)
    inside = (xs >= x0) & (xs < x0 + WINDOW) & (ys >= y0) & (ys < y0 + WINDOW)
    local[ys[inside] - y0, xs[inside] - x0] = True
    best = ("", -1.0)
    for shape in SHAPES:
        for size in SIZES:
            ox, oy = _centroid_offset(shape, size)
            mask, area = _window_template(shape, size, _snap(cx - ox - x0), _snap(cy - oy - y0))
            common = np.count_nonzero(local & mask)
            best = max(best, (shape, common / (len(xs) + area - common)), key=lambda item: item[1])
    return best[0], best[1], (cx, cy)


def read_video(frames: np.ndarray) -> VideoReading | None:
    """(shape, colour, direction) of a toy clip (T, 64, 64, 3), or None when it is not one moving shape."""
    clip = _as_frames(frames, ndim=4)
    if clip is None or len(clip) < 2:
        return None
    ink, colour = ink_and_colour(clip)
    readings = []
    for frame_ink in ink:
        reading = _read_frame_shape(frame_ink)
        if reading is None or reading[1] < MIN_IOU:
            return None
        readings.append(reading)
    colour_name = _dominant_colour(colour[ink])
    names = [shape for shape, _, _ in readings]
    shape = max(SHAPES, key=names.count)
    if colour_name is None or names.count(shape) < MIN_PURITY * len(names):
        return None
    (x0, y0), (x1, y1) = readings[0][2], readings[-1][2]
    return VideoReading(shape, colour_name, _direction(x1 - x0, y1 - y0))


def _direction(dx: float, dy: float) -> str:
    """The DIRECTIONS entry of a displacement in px: still below half a cell, else the dominant axis."""
    half_cell = IMAGE_SIZE / GRID / 2
    if max(abs(dx), abs(dy)) < half_cell:
        return "still"
    step = (0, int(math.copysign(1, dx))) if abs(dx) >= abs(dy) else (int(math.copysign(1, dy)), 0)
    return next(name for name, move in STEP.items() if move == step)


# ---------------------------------------------------------------- speech

ENVELOPE_SECONDS = 0.01  # frame of the loudness envelope that finds words
LOUD_FRACTION = 0.15  # a frame is loud above this fraction of the loudest frame's RMS
MIN_LEVEL = 1e-3  # RMS below which nothing is loud (silence stays silence after normalising)
MAX_DIP_SECONDS = 0.02  # quieter stretches this short do not split a word (the fade between its two tones)
WORD_SECONDS = (0.11, 0.23)  # accepted length of a loud run: a word is 0.16 s; a codec smears its edges
TONE_TRIM = 0.15  # fraction of a run left out at each end and around the middle: fades and the tone switch
MIN_PEAK_SHARE = 0.5  # share of a tone's power near its peak: a pure tone has ~0.95, white noise ~0.05
PEAK_BAND = 0.06  # "near the peak": within 6%, about a quarter of the 25% tone spacing
SNAP_TOLERANCE = math.log(1.25) / 2.5  # max log distance to a table frequency: under half the spacing
FFT_SIZE = 8192  # zero-padded transform: 2 Hz bins at 16 kHz
WORD_OF_TONES = {tones: word for word, tones in WORD_TONES.items()}
LOG_TONES = np.log(np.array(TONE_FREQUENCIES, dtype=np.float64))


def _loud_runs(wave: np.ndarray, sample_rate: int) -> list[tuple[int, int]]:
    hop = max(1, round(ENVELOPE_SECONDS * sample_rate))
    frames = len(wave) // hop
    rms = np.sqrt((wave[: frames * hop].reshape(frames, hop) ** 2).mean(axis=1)) if frames else np.zeros(0)
    if not frames or rms.max() < MIN_LEVEL:
        return []
    loud = rms >= max(LOUD_FRACTION * rms.max(), MIN_LEVEL)
    runs: list[list[int]] = []
    max_dip = round(MAX_DIP_SECONDS / ENVELOPE_SECONDS)
    for i in np.flatnonzero(loud):
        if runs and i - runs[-1][1] <= max_dip:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [(start * hop, end * hop) for start, end in runs]


def _tone_index(segment: np.ndarray, sample_rate: int) -> int | None:
    if len(segment) < 16:
        return None
    spectrum = np.abs(np.fft.rfft(segment * np.hanning(len(segment)), FFT_SIZE)) ** 2
    freqs = np.fft.rfftfreq(FFT_SIZE, 1 / sample_rate)
    peak = int(spectrum[1:].argmax()) + 1
    near = np.abs(freqs - freqs[peak]) <= PEAK_BAND * freqs[peak]
    if spectrum[near].sum() < MIN_PEAK_SHARE * spectrum.sum():
        return None
    distance = np.abs(LOG_TONES - math.log(freqs[peak]))
    index = int(distance.argmin())
    return index if distance[index] <= SNAP_TOLERANCE else None


def read_speech(wave: np.ndarray, sample_rate: int) -> tuple[str, ...] | None:
    """The words of a toy-speech wave, or None when any part of it is not a toy word."""
    wave = np.asarray(wave, dtype=np.float64).reshape(-1)
    if not np.isfinite(wave).all() or sample_rate < 2 * max(TONE_FREQUENCIES) * 1.05:  # 5% over Nyquist
        return None
    runs = _loud_runs(wave, sample_rate)
    if not runs:
        return None
    spoken = []
    for start, end in runs:
        length = end - start
        if not WORD_SECONDS[0] * sample_rate <= length <= WORD_SECONDS[1] * sample_rate:
            return None
        trim, middle = round(TONE_TRIM * length), start + length // 2
        tones = (
            _tone_index(wave[start + trim : middle - trim // 2], sample_rate),
            _tone_index(wave[middle + trim // 2 : end - trim], sample_rate),
        )
        word = WORD_OF_TONES.get(tones)
        if word is None:
            return None
        spoken.append(word)
    return tuple(spoken)


# ---------------------------------------------------------------- actions


def read_action(actions: np.ndarray, start: tuple[float, float] = (0.0, 0.0)) -> tuple[float, float]:
    """Final gripper position in image coordinates ([-1, 1], y down) after a normalised (steps, 2) chunk."""
    chunk = np.asarray(actions, dtype=np.float64)
    if chunk.ndim != 2 or chunk.shape[1] != 2:
        raise MediaError(f"action chunk: expected (steps, 2), got shape {chunk.shape}")
    dx, dy = np.nan_to_num(chunk).sum(axis=0) * MAX_STEP
    return float(start[0] + dx), float(start[1] + dy)


def reach_error(actions: np.ndarray, target_xy: tuple[float, float]) -> float:
    """Distance from the chunk's final position (started at the centre) to `target_xy`, as a fraction of image width."""
    x, y = read_action(actions)
    image_width = 2.0  # image coordinates run from -1 to 1
    return math.hypot(x - target_xy[0], y - target_xy[1]) / image_width
