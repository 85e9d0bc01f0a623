"""Photo-like foreground objects: upright shapes with texture and shading, cut out exactly.

Each object is one of a few families (a turned shape like a vase, bottle or post; a rounded
rock or bush; stacked rounded parts; a tree; a flat sign), textured in its own coordinates and
lit by a directional light through a surface normal, so it looks solid. The mask is binary and
the object is cropped to it with its base on the bottom row, ready to stand on the ground. No
supersampling: objects are always shrunk when pasted, and PIL's resize antialiases then.
"""

import numpy as np
from PIL import Image

from .textures import PATTERNS, pattern, rng

FAMILIES = ("turned", "rock", "stack", "tree", "sign")


def _profile(generator, knots: int, low: float, high: float, n: int) -> np.ndarray:
    """A smooth random curve of n values in low..high (radius along a height, say)."""
    points = generator.uniform(low, high, knots)
    curve = np.interp(np.linspace(0, knots - 1, n), np.arange(knots), points)
    kernel = np.hanning(max(n // 6, 3))
    padded = np.pad(curve, len(kernel), mode="edge")
    return np.convolve(padded, kernel / kernel.sum(), mode="same")[len(kernel):-len(kernel)]


def _turned(xx, yy, generator, centre_x=0.0, top=-0.9, bottom=1.0, width=(0.15, 0.7)):
    """A surface of revolution around a vertical axis: (mask, normal [H,W,3], u, v)."""
    n = xx.shape[0]
    radius = _profile(generator, int(generator.integers(3, 7)), *width, n)[:, None]
    x = xx - centre_x
    mask = (np.abs(x) < radius) & (yy >= top) & (yy <= bottom)
    nx = np.clip(x / radius, -1, 1)
    normal = np.stack([nx, np.zeros_like(nx), np.sqrt(1 - nx**2)], -1)
    return mask, normal, np.arcsin(nx) * radius, yy + 0 * xx


def _dome(xx, yy, cx, cy, rx, ry, wobble):
    """An ellipse with a wavy rim, shaded like a dome: (mask, normal, u, v)."""
    angle = np.arctan2(yy - cy, xx - cx)
    rim = 1 + sum(a * np.cos(k * angle + p) for k, (a, p) in enumerate(wobble, 2))
    d = np.hypot((xx - cx) / rx, (yy - cy) / ry) / rim
    mask = d < 1
    nz = np.sqrt(np.clip(1 - d**2, 0, 1))
    scale = np.maximum(np.sqrt(1 - nz**2), 1e-6) / np.maximum(d, 1e-6)
    normal = np.stack([(xx - cx) / rx * scale / rim, (yy - cy) / ry * scale / rim, nz], -1)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    return mask, normal, xx + 0 * yy, yy + 0 * xx


def _wobble(generator, amount):
    return [(generator.uniform(0, amount), generator.uniform(0, 2 * np.pi)) for _ in range(4)]


def _union(parts):
    """Parts drawn in order, later ones in front: one (mask, normal, u, v)."""
    mask, normal, u, v = (np.copy(a) for a in parts[0])
    for part_mask, part_normal, part_u, part_v in parts[1:]:
        mask |= part_mask
        normal[part_mask], u[part_mask], v[part_mask] = part_normal[part_mask], part_u[part_mask], part_v[part_mask]
    return mask, normal, u, v


def _shape(generator, family: str, xx, yy):
    if family == "turned":
        return _turned(xx, yy, generator, top=generator.uniform(-0.95, -0.2))
    if family == "rock":
        return _dome(xx, yy, 0, 0.2, generator.uniform(0.5, 0.95), generator.uniform(0.35, 0.8), _wobble(generator, 0.12))
    if family == "stack":
        parts, bottom = [], 1.0
        for _ in range(int(generator.integers(2, 4))):
            ry = generator.uniform(0.15, 0.35)
            parts.append(_dome(xx, yy, generator.uniform(-0.1, 0.1), bottom - ry, generator.uniform(0.2, 0.6), ry,
                               _wobble(generator, 0.05)))
            bottom -= 1.7 * ry
        return _union(parts)
    if family == "tree":
        trunk = _turned(xx, yy, generator, top=-0.1, width=(0.05, 0.14))
        crown = _dome(xx, yy, 0, generator.uniform(-0.5, -0.2), generator.uniform(0.4, 0.9),
                      generator.uniform(0.35, 0.6), _wobble(generator, 0.15))
        return _union([trunk, crown])
    corners = int(generator.integers(3, 9))
    angles = generator.uniform(0, 2 * np.pi) + np.linspace(0, 2 * np.pi, corners, endpoint=False)
    radii = generator.uniform(0.5, 0.95, corners) * (1 if generator.random() < 0.5 else np.tile([1, 0.5], corners)[:corners])
    angle = np.arctan2(yy, xx)
    sector = ((angle - angles[0]) % (2 * np.pi)) / (2 * np.pi) * corners
    i = np.floor(sector).astype(int) % corners
    f = sector - np.floor(sector)
    mask = np.hypot(xx, yy) < radii[i] * (1 - f) + radii[(i + 1) % corners] * f
    tilt = generator.uniform(-0.3, 0.3, 2)
    normal = np.broadcast_to(np.array([tilt[0], tilt[1], 1.0]) / np.hypot(1, np.hypot(*tilt)), (*xx.shape, 3))
    return mask, np.array(normal), xx + 0 * yy, yy + 0 * xx


def make_foreground(seed: int, fg_id: int, size: int) -> tuple[Image.Image, Image.Image]:
    """(RGB object on black, binary L mask) of foreground fg_id, cropped to its mask."""
    generator = rng(seed, 12, fg_id)
    family = FAMILIES[int(generator.integers(len(FAMILIES)))]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) * 2 / (size - 1) - 1
    mask, normal, u, v = _shape(generator, family, xx, yy)
    kind = PATTERNS[int(generator.integers(len(PATTERNS)))]
    frequency = generator.uniform(2, 9)
    albedo = pattern(generator, kind, u * frequency, v * frequency, generator.uniform(25, 235, 3), frequency / size)
    light = np.array([generator.uniform(-0.7, 0.7), generator.uniform(-0.9, -0.2), 1.0])
    light /= np.linalg.norm(light)
    facing = normal @ light
    half = (light + np.array([0, 0, 1.0])) / np.linalg.norm(light + np.array([0, 0, 1.0]))
    shine = generator.uniform(0, 80) * np.clip(normal @ half, 0, 1) ** generator.uniform(8, 40)
    rgb = albedo * (0.35 + 0.75 * np.clip(facing, 0, 1))[..., None] + shine[..., None]
    rgb = np.where(mask[..., None], np.clip(rgb, 0, 255), 0).round().astype(np.uint8)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    box = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return Image.fromarray(rgb).crop(box), Image.fromarray((mask * 255).astype(np.uint8)).crop(box)
