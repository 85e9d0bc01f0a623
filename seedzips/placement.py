"""The composer's pictures: a user's backgrounds and cut-outs read in, and one paste.

Backgrounds are centre-cropped to a square and resized to the seed's 224x224. A foreground is
an RGBA cut-out (a PNG's alpha, or a mask file of the same name in --fg-masks, which wins over
the alpha), cropped to the box where its alpha is non-zero; its mirror image is a foreground
too. Each (background, foreground) pair gets its own draws of a scale (the cut-out's longer
side as a fraction of the frame's) and a position that keeps the whole cut-out inside the
frame. The composite is the alpha blend; the mask is that alpha above schema.MASK_THRESHOLD.
"""

import os
from typing import NamedTuple

import numpy as np
from PIL import Image

from pipeline import schema
from seedzips.errors import ConvertError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SIZE = 224  # the seed's side
# The cut-out is resized with the alpha premultiplied (Pillow does this for RGBA), so the
# colours at its soft edge do not bleed towards the transparent pixels' colour.
RESAMPLE = Image.LANCZOS


class Foreground(NamedTuple):
    name: str  # source file name
    mirrored: bool
    rgba: np.ndarray  # H x W x 4 uint8, cropped to its alpha's box


class Placement(NamedTuple):
    x: int
    y: int
    width: int
    height: int


def list_images(folder: str, option: str) -> list[str]:
    """The sorted JPEG/PNG file names in `folder` (hidden files are none)."""
    if not os.path.isdir(folder):
        raise ConvertError(f"{option} {folder}: not a folder")
    names = sorted(n for n in os.listdir(folder)
                   if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")
                   and os.path.isfile(os.path.join(folder, n)))
    if not names:
        raise ConvertError(f"{option} {folder}: no JPEG or PNG images in it")
    return names


def _open(path: str) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ConvertError(f"unreadable image {path}: {error}") from None
    return image


def load_background(path: str, size: int = SIZE) -> np.ndarray:
    """size x size x 3 uint8: the largest centred square of the image, resized."""
    image = _open(path).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    return np.asarray(square.resize((size, size), RESAMPLE))


def _alpha_of(image: Image.Image) -> Image.Image | None:
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        return image.convert("RGBA").getchannel("A")
    return None


def load_foreground(path: str, mask_path: str | None) -> np.ndarray:
    """H x W x 4 uint8 cut-out, cropped to where its alpha is non-zero."""
    image = _open(path)
    alpha = _alpha_of(image)
    if mask_path is not None:
        alpha = _open(mask_path).convert("L")
        if alpha.size != image.size:
            raise ConvertError(f"mask {mask_path} is {alpha.width}x{alpha.height}, its foreground {path} "
                               f"{image.width}x{image.height}")
    if alpha is None:
        raise ConvertError(f"foreground {path} has no alpha channel and no mask (give it one in --fg-masks)")
    box = alpha.getbbox()
    if box is None:
        raise ConvertError(f"foreground {path} is fully transparent")
    rgba = image.convert("RGB").crop(box)
    rgba.putalpha(alpha.crop(box))
    return np.asarray(rgba)


def _mask_path(mask_dir: str, name: str) -> str | None:
    """The mask file of foreground `name`: the same name, or the same stem as a JPEG/PNG."""
    stem = os.path.splitext(name)[0]
    extensions = IMAGE_EXTENSIONS + tuple(ext.upper() for ext in IMAGE_EXTENSIONS)
    for candidate in (name, *(stem + ext for ext in extensions)):
        if os.path.isfile(os.path.join(mask_dir, candidate)):
            return os.path.join(mask_dir, candidate)
    return None


def load_sources(bg_dir: str, fg_dir: str, mask_dir: str | None, size: int = SIZE):
    """([(file name, background array)], [Foreground]: each cut-out, then all their mirror images,
    [(option, path)] of every file read: the record of what the dataset was made from)."""
    bg_names = list_images(bg_dir, "--bg")
    fg_names = list_images(fg_dir, "--fg")
    if mask_dir is not None and not os.path.isdir(mask_dir):
        raise ConvertError(f"--fg-masks {mask_dir}: not a folder")
    backgrounds = [(name, load_background(os.path.join(bg_dir, name), size)) for name in bg_names]
    read = [("--bg", os.path.join(bg_dir, name)) for name in bg_names]
    cutouts = []
    for name in fg_names:
        mask_path = _mask_path(mask_dir, name) if mask_dir is not None else None
        cutouts.append(Foreground(name, False, load_foreground(os.path.join(fg_dir, name), mask_path)))
        read += [("--fg", os.path.join(fg_dir, name))] + ([("--fg-masks", mask_path)] if mask_path else [])
    mirrors = [Foreground(fg.name, True, np.ascontiguousarray(fg.rgba[:, ::-1])) for fg in cutouts]
    return backgrounds, cutouts + mirrors, read


def draw_placements(seed: int, bg_id: int, fg_id: int, count: int, shape: tuple, scale: tuple,
                    size: int = SIZE) -> list[Placement]:
    """`count` placements of a cut-out of `shape` (H, W) on background bg_id, fully inside the
    frame: its longer side a uniform fraction in `scale` of the frame's side, its position
    uniform. The draws depend on (seed, bg_id, fg_id) only, never on which process makes them."""
    generator = np.random.default_rng([seed, bg_id, fg_id])
    height, width = shape
    out = []
    for _ in range(count):
        longer = max(round(generator.uniform(*scale) * size), 1)
        ratio = longer / max(height, width)
        w, h = max(round(width * ratio), 1), max(round(height * ratio), 1)
        x, y = (int(v) for v in generator.integers(0, (size - w + 1, size - h + 1)))
        out.append(Placement(x, y, w, h))
    return out


def paste(background: np.ndarray, rgba: np.ndarray, where: Placement) -> tuple[np.ndarray, np.ndarray]:
    """(composite H x W x 3, mask H x W with 0/255): the cut-out resized to the placement and
    alpha-blended onto the background; the mask is its alpha thresholded."""
    cutout = np.asarray(Image.fromarray(rgba, "RGBA").resize((where.width, where.height), RESAMPLE))
    rows, cols = slice(where.y, where.y + where.height), slice(where.x, where.x + where.width)
    alpha = cutout[..., 3:].astype(np.float32) / 255
    composite = background.copy()
    blended = background[rows, cols] * (1 - alpha) + cutout[..., :3] * alpha
    composite[rows, cols] = np.rint(blended).astype(np.uint8)
    mask = np.zeros(background.shape[:2], np.uint8)
    mask[rows, cols] = np.where(cutout[..., 3] > schema.MASK_THRESHOLD, 255, 0)
    return composite, mask
