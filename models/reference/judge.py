"""A deterministic judge: does an image show its caption's shape, shape colour and background?

Background = nearest palette colour to the median of the border pixels. The shape is the
largest 4-connected region of pixels far from the background colour; its colour is the
nearest palette colour to the median of its eroded interior; its kind is the template
(drawn into the region's bounding box) with the highest IoU. Pure numpy, no learned parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from models.reference.data import COLOURS, SHAPES, UNIT_BOXES, parse_caption, shape_mask

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float64)
_NAMES = tuple(COLOURS)
BORDER = 3  # pixels of frame used to read the background
FOREGROUND_DISTANCE = 60.0  # RGB distance from the background that counts as "shape"
MIN_AREA_FRACTION = 0.01  # a region smaller than this is "no shape"
MIN_IOU = 0.55  # best template below this is "no recognisable shape"


@dataclass(frozen=True)
class Verdict:
    shape: str | None
    colour: str | None
    background: str
    iou: float
    expected: tuple[str, str, str]

    @property
    def shape_ok(self) -> bool:
        return self.shape == self.expected[0]

    @property
    def colour_ok(self) -> bool:
        return self.colour == self.expected[1]

    @property
    def background_ok(self) -> bool:
        return self.background == self.expected[2]

    @property
    def ok(self) -> bool:
        return self.shape_ok and self.colour_ok and self.background_ok


def nearest_colour(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=1)))]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component of a boolean mask (label propagation, numpy only)."""
    h, w = mask.shape
    big = np.int64(h * w + 1)
    labels = np.where(mask, np.arange(h * w).reshape(h, w), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        neighbours = np.minimum.reduce(
            [padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        )
        new = np.where(mask, neighbours, big)
        if np.array_equal(new, labels):
            break
        labels = new
    if not mask.any():
        return mask
    values, counts = np.unique(labels[mask], return_counts=True)
    return labels == values[np.argmax(counts)]


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        p = np.pad(mask, 1, constant_values=False)
        mask = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask


def template(shape: str, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """`shape` drawn so that its extent fills the pixel box (y0, y1, x0, x1), inclusive."""
    y0, y1, x0, x1 = box
    u0, u1, v0, v1 = UNIT_BOXES[shape]
    ys, xs = np.mgrid[0 : size[0], 0 : size[1]].astype(np.float64) + 0.5
    u = u0 + (xs - x0) / max(x1 + 1 - x0, 1) * (u1 - u0)
    v = v0 + (ys - y0) / max(y1 + 1 - y0, 1) * (v1 - v0)
    return shape_mask(shape, u, v)


def classify_shape(region: np.ndarray) -> tuple[str | None, float]:
    ys, xs = np.nonzero(region)
    box = (int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max()))
    best, best_iou = None, 0.0
    for shape in SHAPES:
        t = template(shape, box, region.shape)
        iou = float((t & region).sum() / max((t | region).sum(), 1))
        if iou > best_iou:
            best, best_iou = shape, iou
    return (best if best_iou >= MIN_IOU else None), best_iou


def to_rgb_array(image: Any) -> np.ndarray:
    """PIL image, or HxWx3 uint8/float array, to float64 HxWx3 in 0..255."""
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got shape {arr.shape}")
    return arr.astype(np.float64) * (255.0 if arr.dtype.kind == "f" and arr.max() <= 1.0 else 1.0)


def judge(image: Any, caption: str) -> Verdict:
    """Score `image` against a reference caption ("a red circle on a blue background")."""
    expected = parse_caption(caption)
    img = to_rgb_array(image)
    h, w, _ = img.shape
    frame = np.ones((h, w), dtype=bool)
    frame[BORDER:-BORDER, BORDER:-BORDER] = False
    bg_rgb = np.median(img[frame], axis=0)
    background = nearest_colour(bg_rgb)
    far = np.sqrt(((img - bg_rgb) ** 2).sum(axis=2)) > FOREGROUND_DISTANCE
    if far.sum() < MIN_AREA_FRACTION * h * w:
        return Verdict(None, None, background, 0.0, expected)
    region = largest_component(far)
    if region.sum() < MIN_AREA_FRACTION * h * w:
        return Verdict(None, None, background, 0.0, expected)
    interior = _erode(region, 2)
    pixels = img[interior] if interior.sum() >= 20 else img[region]
    colour = nearest_colour(np.median(pixels, axis=0))
    shape, iou = classify_shape(region)
    return Verdict(shape, colour, background, iou, expected)


def judge_ok(item: tuple[Any, str]) -> bool:
    """`judge(image, caption).ok` for one (image, caption) pair; a picklable pool worker."""
    return judge(*item).ok


def accuracy(images: list[Any], captions: list[str]) -> float:
    if len(images) != len(captions) or not images:
        raise ValueError("need as many captions as images, and at least one")
    return sum(judge(i, c).ok for i, c in zip(images, captions)) / len(images)
