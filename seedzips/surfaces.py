"""Ray-cast surfaces of the photo style: a pinhole camera, a z-buffer, textured materials, and
what the scenes are made of (ground, walls, boxes, balls, hills, sky), lit by a sun whose
shadows fall on the ground. A surface's texture lives in its own coordinates (metres), so it
shrinks with distance as in a photograph; textures are evaluated only where a surface is seen.
"""

from dataclasses import dataclass

import numpy as np

from .textures import PATTERNS, pattern, value_noise

# Colour ranges (low RGB, high RGB) of familiar materials, so scenes look like places.
GROUND = (((60, 90, 30), (110, 150, 70)), ((110, 80, 50), (160, 120, 80)), ((170, 150, 110), (220, 200, 150)),
          ((60, 60, 60), (115, 115, 115)), ((120, 110, 100), (190, 180, 170)))
WALLS = (((120, 45, 30), (180, 90, 60)), ((110, 110, 105), (180, 180, 170)), ((170, 150, 120), (230, 215, 190)),
         ((90, 60, 35), (150, 110, 70)))
HILLS = (((40, 70, 30), (90, 120, 60)), ((70, 80, 90), (120, 130, 140)), ((90, 80, 60), (140, 125, 95)))
ANY = (((30, 30, 30), (225, 225, 225)),)


@dataclass
class Camera:
    """Pinhole looking along +z from (0, height, 0), y up; pixel rows grow downward."""

    size: int  # side in pixels
    focal: float  # pixels
    horizon: float  # the horizon's row, in pixels from the top edge
    height: float  # metres above the ground

    def rays(self) -> tuple[np.ndarray, np.ndarray]:
        """(dx [1,W], dy [H,1]): the ray through a pixel centre is (dx, dy, 1)."""
        centres = np.arange(self.size, dtype=np.float64) + 0.5
        return ((centres - self.size / 2) / self.focal)[None, :], ((self.horizon - centres) / self.focal)[:, None]


@dataclass
class Material:
    """A texture pattern with its colour and period (metres); the same seed, the same look."""

    kind: str
    base: np.ndarray
    period: float
    seed: int

    @classmethod
    def draw(cls, generator, period: tuple, kinds=PATTERNS, palette=ANY):
        low, high = palette[int(generator.integers(len(palette)))]
        return cls(kinds[int(generator.integers(len(kinds)))], generator.uniform(low, high),
                   generator.uniform(*period), int(generator.integers(1 << 31)))

    def albedo(self, u, v, metres_per_pixel):
        return pattern(np.random.default_rng(self.seed), self.kind, u / self.period, v / self.period,
                       self.base, metres_per_pixel / self.period)


class Canvas:
    """A z-buffer: a surface drawn keeps only the pixels where it is the nearest so far."""

    def __init__(self, sky: np.ndarray):
        self.z = np.full(sky.shape[:2], np.inf)
        self.rgb = sky

    def draw(self, z: np.ndarray, colour) -> None:
        """colour(where) gives the RGB [N,3] of the pixels `where` (a mask) selects: textures are
        evaluated only where the surface is seen."""
        nearer = z < self.z
        if nearer.any():
            self.z[nearer] = z[nearer]
            self.rgb[nearer] = colour(nearer)


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Counter-clockwise hull of [N,2] points (monotone chain)."""
    pts = sorted(map(tuple, points))

    def half(seq):
        out = []
        for p in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out[:-1]

    return np.array(half(pts) + half(pts[::-1]))


def _inside(hull: np.ndarray, x: np.ndarray, z: np.ndarray) -> np.ndarray:
    inside = np.ones(np.broadcast(x, z).shape, bool)
    for p, q in zip(hull, np.roll(hull, -1, axis=0)):
        inside &= (q[0] - p[0]) * (z - p[1]) - (q[1] - p[1]) * (x - p[0]) >= 0
    return inside


def shadow_hull(footprint: np.ndarray, height: float, sun: np.ndarray) -> np.ndarray:
    """Ground region shaded by an upright solid: its footprint swept along the sun's rays."""
    return _convex_hull(np.concatenate([footprint, footprint - height * sun[[0, 2]] / sun[1]]))


def _shade(albedo, facing_sun, lit, ambient_tint):
    """Lambert with an ambient term tinted like the sky; `lit` is 0 in shadow, 1 in the sun."""
    direct = np.clip(facing_sun, 0, None) * lit
    return albedo * (0.42 + 0.78 * direct)[..., None] * ambient_tint


def wall(cam, canvas, material, a, b, top, sun, tint, u_offset=0.0):
    """A vertical surface standing on the ground segment a-b, top(s) metres high at the point s
    (0..1) along it, shaded by its orientation and darker near the ground (occlusion)."""
    dx, dy = cam.rays()
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    e = b - a
    with np.errstate(divide="ignore", invalid="ignore"):
        s = (a[0] - a[1] * dx) / (e[1] * dx - e[0])  # where each column's ray crosses the segment
    s = np.broadcast_to(s, (cam.size, cam.size))
    t = a[1] + s * e[1]
    y = cam.height + t * dy  # the ray's height there
    with np.errstate(invalid="ignore"):
        hit = (s >= 0) & (s <= 1) & (t > 0.3) & (y >= 0)
    hit[hit] = y[hit] <= top(s[hit])
    length = float(np.hypot(*e))
    normal = np.array([-e[1], 0.0, e[0]]) / length
    if normal @ np.array([-a[0], cam.height, -a[1]]) < 0:  # the side the camera sees
        normal = -normal

    def colour(where):
        albedo = material.albedo(u_offset + s[where] * length, y[where], t[where] / cam.focal)
        occlusion = 1 - 0.35 * np.exp(-y[where] / 0.25)
        return _shade(albedo, np.full(occlusion.shape, normal @ sun), occlusion, tint)

    canvas.draw(np.where(hit, t, np.inf), colour)


def box(cam, canvas, generator, sun, tint, centre, width, depth):
    """An upright box on the ground: four textured faces and, when below eye height, its lid.
    Returns its footprint corners and height (for its shadow)."""
    yaw, height = generator.uniform(0, np.pi / 2), generator.uniform(0.4, 2.4)
    c, s = np.cos(yaw), np.sin(yaw)
    local = np.array([(-width, -depth), (width, -depth), (width, depth), (-width, depth)]) / 2
    corners = centre + local @ np.array([[c, s], [-s, c]])
    material = Material.draw(generator, (0.15, 0.7))
    u = 0.0
    for i in range(4):
        a, b = corners[i], corners[(i + 1) % 4]
        wall(cam, canvas, material, a, b, lambda at: np.full(at.shape, height), sun, tint, u)
        u += float(np.hypot(*(b - a)))
    if height < cam.height - 0.05:
        dx, dy = cam.rays()
        with np.errstate(divide="ignore"):
            t = np.broadcast_to(np.where(dy < 0, (height - cam.height) / dy, np.inf), (cam.size, cam.size))
        x = t * dx - centre[0]
        with np.errstate(invalid="ignore"):
            lx, lz = x * c + (t - centre[1]) * s, -x * s + (t - centre[1]) * c
        on = (np.abs(lx) <= width / 2) & (np.abs(lz) <= depth / 2)

        def colour(where):
            albedo = material.albedo(lx[where], lz[where], t[where] / cam.focal)
            return _shade(albedo, np.full(albedo.shape[0], sun[1]), 1.0, tint)

        canvas.draw(np.where(on, t, np.inf), colour)
    return corners, height


def ball(cam, canvas, generator, sun, tint, centre, radius):
    """A ball resting on the ground, shaded by its normal. Returns its footprint and height."""
    dx, dy = np.broadcast_arrays(*cam.rays())
    oc = np.array([-centre[0], cam.height - radius, -centre[1]])  # camera minus the ball's centre
    a = dx * dx + dy * dy + 1
    b = 2 * (dx * oc[0] + dy * oc[1] + oc[2])
    disc = b * b - 4 * a * (oc @ oc - radius**2)
    with np.errstate(invalid="ignore"):
        t = (-b - np.sqrt(disc)) / (2 * a)
        hit = (disc >= 0) & (t > 0.3)
    material = Material.draw(generator, (0.1, 0.4))

    def colour(where):
        tw = t[where]
        normal = (np.stack([tw * dx[where], tw * dy[where], tw], -1) + oc) / radius
        u = np.arctan2(normal[:, 0], normal[:, 2]) * radius
        v = np.arccos(np.clip(normal[:, 1], -1, 1)) * radius
        return _shade(material.albedo(u, v, tw / cam.focal), normal @ sun, 1.0, tint)

    canvas.draw(np.where(hit, t, np.inf), colour)
    angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    return centre + radius * np.stack([np.cos(angles), np.sin(angles)], 1), radius


def sky(generator, cam) -> tuple[np.ndarray, np.ndarray]:
    """(RGB [H,W,3], horizon colour): a gradient brighter toward the horizon, with clouds."""
    zenith = generator.uniform((40, 90, 150), (140, 180, 240))
    horizon = np.clip(zenith + generator.uniform(40, 90), 0, 255)
    dx, dy = np.broadcast_arrays(*cam.rays())
    up = np.clip(dy, 0, None)
    t = (1 - np.exp(-4 * up))[..., None]
    rgb = horizon + (zenith - horizon) * t
    with np.errstate(divide="ignore"):
        spread = 1 / np.maximum(up, 0.05)  # clouds on a plane above: flatter toward the horizon
    clouds = value_noise(generator, dx * spread * 2, spread * 2, octaves=4)
    cover = np.clip((clouds - generator.uniform(-0.2, 0.4)) * 2.5, 0, 1)[..., None] * np.clip(up * 6, 0, 1)[..., None]
    return rgb + (245 - rgb) * cover * 0.8, horizon


def hills(cam, canvas, generator, sun, tint):
    """A ridge far away behind everything, as high as a noise profile says."""
    distance = generator.uniform(45, 80)
    profile = generator.uniform(-1, 1, 12)
    peak, base = generator.uniform(4, 14), generator.uniform(1, 4)

    def top(s):
        return base + peak * (0.5 + 0.5 * np.interp(s * 11, np.arange(12), profile))

    material = Material.draw(generator, (2.0, 6.0), kinds=("noise",), palette=HILLS)
    wall(cam, canvas, material, (-distance * 3, distance), (distance * 3, distance), top, sun, tint)


def ground(cam, canvas, generator, sun, tint, shadows):
    """The ground plane to the horizon, shaded where a solid's shadow falls."""
    dx, dy = np.broadcast_arrays(*cam.rays())
    with np.errstate(divide="ignore"):
        t = np.where(dy < 0, -cam.height / dy, np.inf)
    material = Material.draw(generator, (0.3, 1.5), kinds=("checker", "bricks", "planks", "tiles", "noise"),
                             palette=GROUND)
    turn = generator.uniform(0, np.pi)  # the pattern's axes need not line up with the view

    def colour(where):
        tw = t[where]
        x = tw * dx[where]
        u, v = x * np.cos(turn) + tw * np.sin(turn), -x * np.sin(turn) + tw * np.cos(turn)
        # One pixel covers t/f metres across and t^2/(f h) along the ground.
        albedo = material.albedo(u, v, tw * np.maximum(1, tw / cam.height) / cam.focal)
        lit = np.ones(tw.shape)
        for hull in shadows:
            lit[_inside(hull, x, tw)] = 0.0
        return _shade(albedo, np.full(tw.shape, sun[1]), lit, tint)

    canvas.draw(t, colour)
