"""Seeded procedural data: one coloured shape on a coloured background, with its caption.

Shapes are defined in unit coordinates (u, v) = ((x - cx) / r, (y - cy) / r) so the same
formulas render training images (torch, batched, on any device) and the judge's templates
(numpy). Captions read "a red circle on a blue background".
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

IMAGE_SIZE = 128
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
COLOUR_NAMES = tuple(COLOURS)
CAPTION_WORDS = ("a", "on", "background") + SHAPES + COLOUR_NAMES
MIN_RADIUS, MAX_RADIUS, MARGIN = 22.0, 40.0, 4.0
COLOUR_JITTER = 10  # per channel, uniform in [-J, J]

# Extent of each shape in unit coordinates: (u_min, u_max, v_min, v_max). The judge maps a
# detected bounding box onto this box to draw its template.
UNIT_BOXES: dict[str, tuple[float, float, float, float]] = {
    "circle": (-1.0, 1.0, -1.0, 1.0),
    "square": (-0.85, 0.85, -0.85, 0.85),
    "triangle": (-1.0, 1.0, -1.0, 0.8),
    "diamond": (-1.0, 1.0, -1.0, 1.0),
    "cross": (-1.0, 1.0, -1.0, 1.0),
}


def shape_mask(shape: str, u: Any, v: Any) -> Any:
    """Inside-test for `shape` at unit coordinates; works on numpy arrays and torch tensors."""
    au, av = abs(u), abs(v)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (au <= 0.85) & (av <= 0.85)
    if shape == "diamond":
        return au + av <= 1.0
    if shape == "triangle":  # apex up, base at v = 0.8
        return (v <= 0.8) & (au <= (v + 1.0) / 1.8)
    if shape == "cross":
        return ((au <= 1 / 3) & (av <= 1.0)) | ((av <= 1 / 3) & (au <= 1.0))
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


@dataclass(frozen=True)
class Spec:
    """What one image shows. Position and size vary but are not part of the caption."""

    shape: str
    colour: str
    background: str
    cx: float = IMAGE_SIZE / 2
    cy: float = IMAGE_SIZE / 2
    radius: float = 30.0
    colour_rgb: tuple[int, int, int] | None = None  # jittered; None: the palette colour
    background_rgb: tuple[int, int, int] | None = None

    @property
    def caption(self) -> str:
        return caption(self.shape, self.colour, self.background)

    @property
    def combo(self) -> tuple[str, str, str]:
        return (self.shape, self.colour, self.background)


def caption(shape: str, colour: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def parse_caption(text: str) -> tuple[str, str, str]:
    """(shape, colour, background) of a caption made by `caption`; ValueError otherwise."""
    words = text.strip().lower().split()
    if len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background":
        raise ValueError(f"not a reference caption: {text!r}")
    colour, shape, background = words[1], words[2], words[5]
    if shape not in SHAPES or colour not in COLOURS or background not in COLOURS:
        raise ValueError(f"unknown shape or colour in caption: {text!r}")
    return shape, colour, background


def all_combos() -> list[tuple[str, str, str]]:
    """Every (shape, colour, background) with colour != background, in a fixed order."""
    return [(s, c, b) for s in SHAPES for c in COLOUR_NAMES for b in COLOUR_NAMES if c != b]


def is_held_out_combo(combo: tuple[str, str, str]) -> bool:
    """About 1 combo in 13 never appears in training; every shape, colour and colour pair
    still appears in other combos, so these test composition, not new words."""
    s, c, b = combo
    return (SHAPES.index(s) + 3 * COLOUR_NAMES.index(c) + 5 * COLOUR_NAMES.index(b)) % 13 == 0


def training_combos() -> list[tuple[str, str, str]]:
    return [c for c in all_combos() if not is_held_out_combo(c)]


def _jitter(rng: random.Random, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(min(255, max(0, ch + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for ch in rgb)  # type: ignore[return-value]


def random_spec(rng: random.Random, combo: tuple[str, str, str]) -> Spec:
    shape, colour, background = combo
    r = rng.uniform(MIN_RADIUS, MAX_RADIUS)
    lo, hi = r + MARGIN, IMAGE_SIZE - r - MARGIN
    return Spec(
        shape,
        colour,
        background,
        rng.uniform(lo, hi),
        rng.uniform(lo, hi),
        r,
        _jitter(rng, COLOURS[colour]),
        _jitter(rng, COLOURS[background]),
    )


def sample_specs(n: int, seed: int, combos: list[tuple[str, str, str]] | None = None) -> list[Spec]:
    """`n` specs drawn reproducibly from `combos` (default: the training combos)."""
    rng = random.Random(seed)
    pool = training_combos() if combos is None else combos
    return [random_spec(rng, rng.choice(pool)) for _ in range(n)]


@dataclass(frozen=True)
class HeldOutPrompt:
    prompt: str
    seed: int
    held_out_combo: bool


def held_out_prompts(seed: int = 20251126) -> list[HeldOutPrompt]:
    """The fixed evaluation set: every combo once (280 prompts), each with its own noise seed
    drawn from a stream training never uses; 22 of the combos were never trained on."""
    rng = random.Random(seed)
    return [HeldOutPrompt(caption(*c), rng.randrange(2**31), is_held_out_combo(c)) for c in all_combos()]


def render_numpy(spec: Spec, size: int = IMAGE_SIZE, supersample: int = 2) -> np.ndarray:
    """One image as uint8 HxWx3 (anti-aliased by supersampling)."""
    n = size * supersample
    coords = (np.arange(n, dtype=np.float64) + 0.5) / supersample
    x, y = np.meshgrid(coords, coords)
    inside = shape_mask(spec.shape, (x - spec.cx) / spec.radius, (y - spec.cy) / spec.radius)
    fg = np.array(spec.colour_rgb or COLOURS[spec.colour], dtype=np.float64)
    bg = np.array(spec.background_rgb or COLOURS[spec.background], dtype=np.float64)
    img = np.where(inside[..., None], fg, bg)
    img = img.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_torch(specs: list[Spec], device: Any = "cpu", size: int = IMAGE_SIZE, supersample: int = 2) -> Any:
    """A batch as float tensor (B, 3, H, W) in [-1, 1], the VAE's input range."""
    import torch

    n = size * supersample
    coords = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / supersample
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    t = lambda vals: torch.tensor(vals, device=device, dtype=torch.float32)[:, None, None]  # noqa: E731
    u = (x[None] - t([s.cx for s in specs])) / t([s.radius for s in specs])
    v = (y[None] - t([s.cy for s in specs])) / t([s.radius for s in specs])
    inside = torch.zeros(len(specs), n, n, dtype=torch.bool, device=device)
    for shape in SHAPES:
        rows = [i for i, s in enumerate(specs) if s.shape == shape]
        if rows:
            idx = torch.tensor(rows, device=device)
            inside[idx] = shape_mask(shape, u[idx], v[idx])
    fg = torch.tensor([s.colour_rgb or COLOURS[s.colour] for s in specs], device=device, dtype=torch.float32)
    bg = torch.tensor([s.background_rgb or COLOURS[s.background] for s in specs], device=device, dtype=torch.float32)
    img = torch.where(inside[:, None], fg[:, :, None, None], bg[:, :, None, None])
    img = torch.nn.functional.avg_pool2d(img, supersample)
    return img / 127.5 - 1.0


def batches(batch_size: int, seed: int) -> Iterator[list[Spec]]:
    """An endless, reproducible stream of training batches."""
    rng = random.Random(seed)
    pool = training_combos()
    while True:
        yield [random_spec(rng, rng.choice(pool)) for _ in range(batch_size)]
