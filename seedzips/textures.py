"""Seeded random streams and procedural textures for the synthetic renderers (numpy + PIL only).

Textures are functions of surface coordinates (u, v), not of pixels, so a surface seen from
farther away shows its pattern smaller: the perspective cue a depth model should learn. Each
pattern fades to its mean colour where one pixel covers more than about half a period
(`footprint`, in periods per pixel), which is what mip-mapping does in a real renderer.
"""

import numpy as np
from PIL import Image


def rng(seed: int, *stream: int) -> np.random.Generator:
    """The generator of one named stream: the same (seed, stream) always draws the same numbers."""
    return np.random.default_rng([seed, *stream])


def smooth_noise(generator, size: int, cells: int, channels: int) -> np.ndarray:
    """[size, size, channels] noise in -1..1 that varies over about `cells` cells across the image."""
    grid = generator.uniform(0, 255, (cells, cells, channels)).astype(np.uint8)
    mode = "RGB" if channels == 3 else "L"
    up = Image.fromarray(grid.squeeze(), mode).resize((size, size), Image.BICUBIC)
    return np.asarray(up, np.float32).reshape(size, size, channels) / 127.5 - 1.0


def value_noise(generator, u: np.ndarray, v: np.ndarray, octaves: int = 3, cells: int = 32) -> np.ndarray:
    """Fractal lattice noise in about -1..1 at any float coordinates (one lattice cell = 1 unit),
    periodic over `cells` units; each octave halves the cell and the amplitude."""
    total, amplitude, norm = np.zeros(np.broadcast(u, v).shape, np.float32), 1.0, 0.0
    for octave in range(octaves):
        lattice = generator.uniform(-1, 1, (cells, cells)).astype(np.float32)
        su, sv = u * 2**octave, v * 2**octave
        iu, iv = np.floor(su), np.floor(sv)
        fu, fv = su - iu, sv - iv
        fu, fv = fu * fu * (3 - 2 * fu), fv * fv * (3 - 2 * fv)  # smoothstep: no grid creases
        iu, iv = iu.astype(np.int64) % cells, iv.astype(np.int64) % cells
        ju, jv = (iu + 1) % cells, (iv + 1) % cells
        top = lattice[iv, iu] * (1 - fu) + lattice[iv, ju] * fu
        bottom = lattice[jv, iu] * (1 - fu) + lattice[jv, ju] * fu
        total += amplitude * (top * (1 - fv) + bottom * fv)
        norm += amplitude
        amplitude /= 2
    return total / norm


def _fade(footprint) -> np.ndarray:
    """1 where a pattern period spans many pixels, 0 where a pixel spans half a period or more."""
    return np.clip(2.0 - 4.0 * np.asarray(footprint, np.float32), 0.0, 1.0)


def _lines(x: np.ndarray, width: float) -> np.ndarray:
    """1 on thin lines at every integer of x (grout, mortar, seams), 0 elsewhere, soft edges."""
    distance = np.abs(x - np.round(x))
    return np.clip((width - distance) / max(width * 0.5, 1e-6), 0.0, 1.0)


def _cell_hash(a: np.ndarray, b: np.ndarray, salt: int) -> np.ndarray:
    """A pseudo-random value in 0..1 per integer cell (a, b): per-brick, per-plank variation."""
    h = (a.astype(np.int64) * 73856093) ^ (b.astype(np.int64) * 19349663) ^ (salt * 83492791)
    return ((h % 1009 + 1009) % 1009).astype(np.float32) / 1008.0


PATTERNS = ("checker", "bricks", "planks", "tiles", "stripes", "noise")


def pattern(generator, kind: str, u: np.ndarray, v: np.ndarray, base: np.ndarray, footprint) -> np.ndarray:
    """Albedo [..., 3] in 0..255 of pattern `kind` at surface coordinates (u, v) in periods.

    base is the mean RGB colour; footprint the pattern periods one pixel covers (scalar or
    shaped like u). A second colour, the line colour and the grain come from `generator`.
    """
    fade = _fade(footprint)[..., None]
    # The second colour is mostly lighter or darker, a little hue: as stone, wood, paint vary.
    other = np.clip(base * generator.uniform(0.55, 1.4) + generator.uniform(-25, 25, 3), 0, 255)
    line = base * generator.uniform(0.35, 0.7)
    salt = int(generator.integers(1 << 20))
    grain = value_noise(generator, u * 4, v * 4, octaves=3)[..., None]
    if kind == "checker":
        mix = ((np.floor(u) + np.floor(v)) % 2)[..., None]
        colour = base + (other - base) * mix
    elif kind in ("bricks", "tiles"):
        shifted = u + 0.5 * (np.floor(v) % 2) if kind == "bricks" else u
        vary = _cell_hash(np.floor(shifted), np.floor(v), salt)[..., None]
        colour = base + (other - base) * 0.5 * vary
        seams = np.maximum(_lines(shifted, 0.05), _lines(v, 0.08))[..., None]
        colour = colour + (line - colour) * seams * fade
    elif kind == "planks":
        vary = _cell_hash(np.floor(u), np.zeros_like(u), salt)[..., None]
        colour = base + (other - base) * 0.4 * vary
        colour = colour + (line - colour) * _lines(u, 0.04)[..., None] * fade
        grain = value_noise(generator, u * 12, v * 1.5, octaves=2)[..., None]
    elif kind == "stripes":
        colour = base + (other - base) * (0.5 + 0.5 * np.sin(2 * np.pi * u))[..., None]
    elif kind == "noise":
        colour = base + (other - base) * (0.5 + 0.5 * value_noise(generator, u, v, octaves=4))[..., None]
    else:
        raise ValueError(f"pattern kind must be one of {', '.join(PATTERNS)}, not {kind!r}")
    mean = (base + other) / 2
    colour = mean + (colour - mean) * fade
    return np.clip(colour + 18 * grain * fade, 0, 255)
