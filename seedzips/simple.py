"""The simple style: flat shapes on colour noise, for fast tests.

A background is a smooth texture whose colour and texture follow a depth ramp in a random
direction (so depth is visible in the image, if trivially); a foreground is a coloured, striped
ellipse or polygon pasted anywhere at a random scale, its depth 25..70 levels nearer than the
nearest thing it covers. The photo style (scenes, objects) is the one that resembles the task.
"""

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .textures import rng, smooth_noise


@dataclass
class Flat:
    """One background: image [S,S,3] uint8 and its depth ramp [S,S] uint8."""

    image: np.ndarray
    depth: np.ndarray

    def place(self, generator, fg_image: Image.Image, fg_mask: Image.Image):
        """(x, y, image, mask, depth value) of one placement anywhere at a random scale."""
        size = self.image.shape[0]
        scale = generator.uniform(0.7, 1.3)
        w, h = (max(int(round(s * scale)), 4) for s in fg_image.size)
        x, y = int(generator.integers(0, size - w + 1)), int(generator.integers(0, size - h + 1))
        obj_mask = fg_mask.resize((w, h), Image.NEAREST)
        covered = self.depth[y:y + h, x:x + w][np.asarray(obj_mask) > 0]
        nearest = int(covered.min()) if covered.size else int(self.depth.min())
        value = max(nearest - int(generator.integers(25, 71)), 0)
        return x, y, fg_image.resize((w, h), Image.BILINEAR), obj_mask, value


def make_background(seed: int, bg_id: int, size: int) -> Flat:
    """A ramp in a random direction, hazier and smoother where it is farther."""
    generator = rng(seed, 1, bg_id)
    angle = generator.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    ramp = np.cos(angle) * xx + np.sin(angle) * yy
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    ramp = np.clip(ramp + 0.08 * smooth_noise(generator, size, 4, 1)[..., 0], 0, 1)
    near, far = generator.uniform(90, 140), generator.uniform(190, 250)
    depth = (near + (far - near) * ramp).round().astype(np.uint8)
    near_colour, far_colour = generator.uniform(20, 200, 3), generator.uniform(120, 240, 3)
    t = ramp[..., None]
    image = (1 - t) * near_colour + t * far_colour
    image += 35 * smooth_noise(generator, size, 6, 3)
    image += (1 - t) * 25 * smooth_noise(generator, size, max(size // 8, 2), 3)
    return Flat(np.clip(image, 0, 255).astype(np.uint8), depth)


def make_foreground(seed: int, fg_id: int, size: int) -> tuple[Image.Image, Image.Image]:
    """(RGB object on black, binary L mask) of one foreground: an ellipse or a polygon."""
    generator = rng(seed, 2, fg_id)
    side = max(int(size * generator.uniform(0.25, 0.45)), 6)
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    if generator.random() < 0.4:
        rx, ry = side / 2 * generator.uniform(0.55, 1.0, 2)
        draw.ellipse((side / 2 - rx, side / 2 - ry, side / 2 + rx - 1, side / 2 + ry - 1), fill=255)
    else:
        corners = int(generator.integers(3, 8))
        angles = generator.uniform(0, 2 * np.pi) + np.linspace(0, 2 * np.pi, corners, endpoint=False)
        radii = side / 2 * generator.uniform(0.6, 1.0, corners)
        centre = (side - 1) / 2
        draw.polygon([(centre + r * np.cos(a), centre + r * np.sin(a)) for r, a in zip(radii, angles)], fill=255)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    stripe_angle, period = generator.uniform(0, np.pi), generator.uniform(4, 12)
    stripes = np.sin((np.cos(stripe_angle) * xx + np.sin(stripe_angle) * yy) * 2 * np.pi / period)
    colour, stripe_colour = generator.uniform(0, 255, 3), generator.uniform(-70, 70, 3)
    texture = colour + stripes[..., None] * stripe_colour + 10 * smooth_noise(generator, side, 3, 3)
    on = np.asarray(mask)[..., None] > 0
    return Image.fromarray(np.where(on, np.clip(texture, 0, 255), 0).astype(np.uint8)), mask
