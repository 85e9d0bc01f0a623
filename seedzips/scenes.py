"""Photo-like backgrounds: a small ray-cast scene whose depth map is what the picture shows.

A pinhole camera at eye height looks over a textured ground plane toward the horizon (its row
varies per scene, as a camera's pitch does). On the ground stand walls, boxes and balls, with a
ridge of hills behind them and sky above. Every surface is textured in its own coordinates, so
patterns shrink with distance; a sun lights the surfaces and casts shadows on the ground; far
things fade into haze. A pixel's depth is the camera-space z of the surface it shows, on a log
scale from DEPTH_NEAR (0) to DEPTH_FAR metres (255; the sky). Rendered at twice the size and
averaged down, so edges are antialiased as in a photograph. The surfaces themselves, and the
camera and z-buffer that draw them, are in surfaces.py.

`Scene.place` stands a foreground object on the ground: the row its base stands on sets its
depth (the ground's depth there) and its size (farther = higher up the picture = smaller), and
it goes only where it is nearer than everything it covers.
"""

from dataclasses import dataclass

import numpy as np
from PIL import Image

from . import surfaces
from .surfaces import Camera, Canvas, Material
from .textures import rng

DEPTH_NEAR, DEPTH_FAR = 1.0, 100.0  # metres on depth 0 and 255
SUPERSAMPLE = 2
PLACE_TRIES = 30
OBJECT_HEIGHT = (0.22, 0.6)  # a pasted object's height in pixels, as a fraction of the image's


def depth_value(z):
    """Camera-space depth in metres -> the 0..255 depth scale (log, clipped)."""
    z = np.clip(np.asarray(z, np.float64), DEPTH_NEAR, DEPTH_FAR)
    return 255 * np.log(z / DEPTH_NEAR) / np.log(DEPTH_FAR / DEPTH_NEAR)


@dataclass
class Scene:
    """One background: image [S,S,3] uint8, depth [S,S] uint8 (see depth_value), the float depth
    it was rounded from, and the camera at output size (for placing objects)."""

    image: np.ndarray
    depth: np.ndarray
    depth_exact: np.ndarray
    camera: Camera

    def ground_depth(self, row_edge: float) -> float:
        """Depth value of the ground seen at a row boundary below the horizon (float row)."""
        cam = self.camera
        return float(depth_value(cam.focal * cam.height / (row_edge - cam.horizon)))

    def place(self, generator, fg_image: Image.Image, fg_mask: Image.Image):
        """Stand the object on the ground: (x, y, image, mask, depth value) of one placement.

        A spot that does not fit in the picture, or where the object would cover something
        nearer than itself, is redrawn; after PLACE_TRIES the last spot that fitted is kept and
        the object made nearer than all it covers.
        """
        spot = None
        for _ in range(PLACE_TRIES):
            drawn = self._draw_spot(generator, fg_image.size)
            if drawn is None:
                continue
            spot = drawn
            value, nearest = self._depths(fg_mask, spot)
            if value < nearest:
                break
        else:
            spot = spot or self._bottom_spot(fg_image.size)
            value, nearest = self._depths(fg_mask, spot)
            value = min(value, nearest - 10)
        x, y, w, h = spot
        return (x, y, fg_image.resize((w, h), Image.BILINEAR), fg_mask.resize((w, h), Image.NEAREST),
                int(max(round(value), 0)))

    def _draw_spot(self, generator, fg_size) -> tuple | None:
        """(x, y, w, h) for a drawn height in pixels and stature (height over the camera's), which
        set the row its base stands on; None where that does not fit in the picture."""
        size = self.image.shape[0]
        height_px = generator.uniform(*OBJECT_HEIGHT) * size
        bottom = self.camera.horizon + height_px / generator.uniform(0.4, 1.3)  # its base's row edge
        w, h = max(int(round(height_px * fg_size[0] / fg_size[1])), 4), int(round(height_px))
        if bottom > size or bottom - h < 0 or w > size:
            return None
        return int(generator.integers(0, size - w + 1)), max(int(round(bottom)) - h, 0), w, h

    def _bottom_spot(self, fg_size) -> tuple:
        """As large as fits, centred on the bottom row: where an object goes when no draw fitted."""
        size = self.image.shape[0]
        h = max(int(min(OBJECT_HEIGHT[1] * size, size * fg_size[1] / fg_size[0])), 1)
        w = min(max(int(round(h * fg_size[0] / fg_size[1])), 1), size)
        return (size - w) // 2, size - h, w, h

    def _depths(self, fg_mask, spot) -> tuple[float, float]:
        """(the ground's depth under the spot's base, the nearest depth the object would cover)."""
        x, y, w, h = spot
        covered = self.depth_exact[y:y + h, x:x + w][np.asarray(fg_mask.resize((w, h), Image.NEAREST)) > 0]
        return self.ground_depth(y + h), float(covered.min(initial=np.inf))


def make_background(seed: int, bg_id: int, size: int) -> Scene:
    """The scene of background bg_id, rendered at SUPERSAMPLE x size and averaged down."""
    generator = rng(seed, 11, bg_id)
    n = size * SUPERSAMPLE
    cam = Camera(n, focal=n * generator.uniform(0.85, 1.25), horizon=n * generator.uniform(0.2, 0.5),
                 height=generator.uniform(1.4, 1.8))
    elevation, azimuth = generator.uniform(0.35, 1.1), generator.uniform(-2.4, 2.4)
    sun = np.array([np.cos(elevation) * np.sin(azimuth), np.sin(elevation), np.cos(elevation) * np.cos(azimuth)])
    sky, haze = surfaces.sky(generator, cam)
    tint = 0.75 + 0.25 * haze / 255
    canvas = Canvas(sky.copy())
    surfaces.hills(cam, canvas, generator, sun, tint)
    shadows = []
    for _ in range(int(generator.integers(0, 3))):  # walls across the view
        a = np.array([generator.uniform(-12, 6), generator.uniform(6, 30)])
        angle, length = generator.uniform(-0.8, 0.8), generator.uniform(4, 14)
        b = a + length * np.array([np.cos(angle), np.sin(angle)])
        height = generator.uniform(1.2, 4.0)
        material = Material.draw(generator, (0.2, 0.6), kinds=("bricks", "tiles", "planks", "noise"),
                                 palette=surfaces.WALLS)
        surfaces.wall(cam, canvas, material, a, b, lambda at, height=height: np.full(at.shape, height), sun, tint)
        shadows.append(surfaces.shadow_hull(np.stack([a, b]), height, sun))
    for _ in range(int(generator.integers(1, 5))):
        distance = generator.uniform(4, 25)
        centre = np.array([generator.uniform(-0.6, 0.6) * distance, distance])
        footprint, height = surfaces.box(cam, canvas, generator, sun, tint, centre, *generator.uniform(0.5, 2.5, 2))
        shadows.append(surfaces.shadow_hull(footprint, height, sun))
    for _ in range(int(generator.integers(0, 3))):
        distance, radius = generator.uniform(3, 20), generator.uniform(0.2, 0.8)
        centre = np.array([generator.uniform(-0.6, 0.6) * distance, distance])
        footprint, height = surfaces.ball(cam, canvas, generator, sun, tint, centre, radius)
        shadows.append(surfaces.shadow_hull(footprint, height, sun))
    surfaces.ground(cam, canvas, generator, sun, tint, shadows)
    seen = np.isfinite(canvas.z)
    fog = np.where(seen, 1 - np.exp(-canvas.z / generator.uniform(40, 120)), 0)[..., None]
    rgb = canvas.rgb + (haze - canvas.rgb) * fog
    rgb = rgb.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean((1, 3))
    image = np.clip(rgb + generator.normal(0, 2.0, rgb.shape), 0, 255).round().astype(np.uint8)  # sensor noise
    exact = depth_value(np.where(seen, canvas.z, np.inf)).reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean((1, 3))
    small = Camera(size, cam.focal / SUPERSAMPLE, cam.horizon / SUPERSAMPLE, cam.height)
    return Scene(image, exact.round().astype(np.uint8), exact, small)
