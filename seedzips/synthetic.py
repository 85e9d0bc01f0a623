"""A synthetic dataset in the seed layout, with the seed's quirks, that a model can learn.

Backgrounds are smooth textured scenes whose colour and texture follow a per-background depth
ramp (so depth is visible in the image); foregrounds are coloured, striped shapes. Each zip's
composite is a foreground pasted on a background exactly at the mask, and its depth map is the
background's ramp with the object nearer (smaller value; larger = farther) than what it covers.

    python -m seedzips.synthetic --out data/seed --zips 2 --bgs-per-zip 5 --fg 100 --placements 20
"""

import argparse
import io
import multiprocessing
import os
import random
import sys
import zipfile

import numpy as np
from tqdm import tqdm
from PIL import Image, ImageDraw

from pipeline import schema

DEPTH_MODES = ("gray", "color", "half", "mixed")
_FIXED_TIME = (2020, 1, 1, 0, 0, 0)  # zip timestamps, so the same seed gives identical zips


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


def _smooth_noise(rng, size: int, cells: int, channels: int) -> np.ndarray:
    """Noise in -1..1 that varies over about `cells` cells across the image."""
    grid = rng.uniform(0, 255, (cells, cells, channels)).astype(np.uint8)
    mode = "RGB" if channels == 3 else "L"
    up = Image.fromarray(grid.squeeze(), mode).resize((size, size), Image.BICUBIC)
    return np.asarray(up, np.float32).reshape(size, size, channels) / 127.5 - 1.0


def make_background(seed: int, bg_id: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 image, uint8 depth map) of one background: a ramp in a random direction."""
    rng = _rng(seed, 1, bg_id)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    ramp = np.cos(angle) * xx + np.sin(angle) * yy
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    ramp = np.clip(ramp + 0.08 * _smooth_noise(rng, size, 4, 1)[..., 0], 0, 1)
    near, far = rng.uniform(90, 140), rng.uniform(190, 250)
    depth = (near + (far - near) * ramp).round().astype(np.uint8)
    # Far parts are hazier (closer to the far colour) and carry less texture, like a real scene.
    near_colour, far_colour = rng.uniform(20, 200, 3), rng.uniform(120, 240, 3)
    t = ramp[..., None]
    image = (1 - t) * near_colour + t * far_colour
    image += 35 * _smooth_noise(rng, size, 6, 3)
    image += (1 - t) * 25 * _smooth_noise(rng, size, max(size // 8, 2), 3)
    return np.clip(image, 0, 255).astype(np.uint8), depth


def make_foreground(seed: int, fg_id: int, size: int) -> tuple[Image.Image, Image.Image]:
    """(RGB object on black, binary L mask) of one foreground: an ellipse or a polygon."""
    rng = _rng(seed, 2, fg_id)
    side = max(int(size * rng.uniform(0.25, 0.45)), 6)
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    if rng.random() < 0.4:
        rx, ry = side / 2 * rng.uniform(0.55, 1.0, 2)
        draw.ellipse((side / 2 - rx, side / 2 - ry, side / 2 + rx - 1, side / 2 + ry - 1), fill=255)
    else:
        corners = int(rng.integers(3, 8))
        angles = rng.uniform(0, 2 * np.pi) + np.linspace(0, 2 * np.pi, corners, endpoint=False)
        radii = side / 2 * rng.uniform(0.6, 1.0, corners)
        centre = (side - 1) / 2
        draw.polygon([(centre + r * np.cos(a), centre + r * np.sin(a)) for r, a in zip(radii, angles)], fill=255)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    stripe_angle, period = rng.uniform(0, np.pi), rng.uniform(4, 12)
    stripes = np.sin((np.cos(stripe_angle) * xx + np.sin(stripe_angle) * yy) * 2 * np.pi / period)
    colour, stripe_colour = rng.uniform(0, 255, 3), rng.uniform(-70, 70, 3)
    texture = colour + stripes[..., None] * stripe_colour + 10 * _smooth_noise(rng, side, 3, 3)
    on = np.asarray(mask)[..., None] > 0
    return Image.fromarray(np.where(on, np.clip(texture, 0, 255), 0).astype(np.uint8)), mask


def _depth_colormap() -> list[int]:
    """An RGB lookup table whose luma (0.299 R + 0.587 G + 0.114 B) equals the depth value."""
    d = np.arange(256, dtype=np.float64)
    tint = 60 * d * (255 - d) / 255**2
    red, green, blue = d + tint, d, d - tint * 0.299 / 0.114
    return [int(v) for channel in (red, green, blue) for v in np.clip(channel.round(), 0, 255)]


_COLORMAP = _depth_colormap()


def _encode(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _depth_image(depth: Image.Image, mode: str) -> Image.Image:
    if mode == "color":
        return depth.convert("RGB").point(_COLORMAP)
    if mode == "half":
        return depth.resize((max(depth.width // 2, 1), max(depth.height // 2, 1)), Image.BILINEAR)
    return depth


def _zip_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, _FIXED_TIME)
    info.create_system = 3  # Unix, as `zip` on Linux records it
    if name.endswith("/"):
        info.external_attr = (0o40755 << 16) | 0x10
    else:
        info.external_attr = 0o644 << 16
        info.compress_type = zipfile.ZIP_DEFLATED
    return info


def _write_zip(job: dict) -> None:
    """Write one zipFiles/batch_{b}.zip: composites and masks interleaved, depth maps later."""
    seed, size, batch = job["seed"], job["image_size"], job["batch"]
    rng = _rng(seed, 3, batch)
    foregrounds = [make_foreground(seed, j, size) for j in range(1, job["fg"] + 1)]
    faults = job["faults"]
    depth_members, labels = [], []
    path = os.path.join(job["out"], schema.ZIP_DIR, schema.zip_name(batch))
    with zipfile.ZipFile(path + ".tmp", "w") as archive:
        for folder in (schema.COMPOSITE_DIR, schema.MASK_DIR):
            archive.writestr(_zip_info(folder + "/"), b"")
        for bg_id in job["bg_ids"]:
            bg_array, depth_array = make_background(seed, bg_id, size)
            background, bg_depth = Image.fromarray(bg_array), Image.fromarray(depth_array)
            for fg_index, (fg_image, fg_mask) in enumerate(foregrounds):
                for p in range(1, job["placements"] + 1):
                    key = schema.seed_key(bg_id, fg_index * job["placements"] + p)
                    scale = rng.uniform(0.7, 1.3)
                    w, h = (max(int(round(s * scale)), 4) for s in fg_image.size)
                    x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
                    obj, obj_mask = fg_image.resize((w, h), Image.BILINEAR), fg_mask.resize((w, h), Image.NEAREST)
                    composite = background.copy()
                    composite.paste(obj, (x, y), obj_mask)
                    mask = Image.new("L", (size, size), 0)
                    mask.paste(255, (x, y), obj_mask)
                    covered = depth_array[y:y + h, x:x + w][np.asarray(obj_mask) > 0]
                    nearest = int(covered.min()) if covered.size else int(depth_array.min())
                    depth = bg_depth.copy()
                    depth.paste(max(nearest - int(rng.integers(25, 71)), 0), (x, y), obj_mask)
                    mode = job["depth"] if job["depth"] != "mixed" else ("gray", "color", "half")[int(rng.integers(3))]
                    name = key + (".jpg.jpg" if key in faults["double_ext"] else ".jpg")
                    composite_bytes = _encode(composite, 60)
                    if key in faults["truncated"]:
                        composite_bytes = composite_bytes[: len(composite_bytes) // 2]
                    archive.writestr(_zip_info(f"{schema.MASK_DIR}/{name}"), _encode(mask, 60))
                    archive.writestr(_zip_info(f"{schema.COMPOSITE_DIR}/{name}"), composite_bytes)
                    labels.append(name)
                    if key not in faults["missing_depth"]:
                        depth_members.append((f"{schema.DEPTH_DIR}/{name}", _encode(_depth_image(depth, mode), 60)))
        # The depth maps were added in a later pass, in an order unrelated to the rest.
        archive.writestr(_zip_info(schema.DEPTH_DIR + "/"), b"")
        for index in rng.permutation(len(depth_members)):
            archive.writestr(_zip_info(depth_members[index][0]), depth_members[index][1])
        archive.writestr(_zip_info(schema.LABELS), "".join(n + "\n" for n in sorted(labels)))
    os.replace(path + ".tmp", path)


def _write_sources(out: str, seed: int, bg_count: int, fg_count: int, size: int) -> None:
    for folder in (schema.BG_DIR, schema.FG_DIR, schema.FG_MASK_DIR, schema.ZIP_DIR):
        os.makedirs(os.path.join(out, folder), exist_ok=True)
    for bg_id in range(1, bg_count + 1):
        image = Image.fromarray(make_background(seed, bg_id, size)[0])
        image.save(os.path.join(out, schema.BG_DIR, schema.bg_name(bg_id)), quality=75)
    for fg_id in range(1, fg_count + 1):
        image, mask = make_foreground(seed, fg_id, size)
        image.save(os.path.join(out, schema.FG_DIR, schema.fg_name(fg_id)), quality=90)
        mask.save(os.path.join(out, schema.FG_MASK_DIR, schema.fg_mask_name(fg_id)), quality=90)


def generate(out, *, zips=2, bgs_per_zip=2, fg=3, placements=2, seed=0, image_size=224,
             depth="gray", faults=False, workers=1, progress=False) -> dict:
    """Write a seed-layout dataset to `out` and describe it.

    Returns {"root", "zips": [{"name", "bg_ids", "keys"}], "samples", "faults"}: "samples" counts
    composites written; "faults" maps missing_depth / truncated / double_ext to the affected keys
    (empty lists unless faults=True). The same arguments always give byte-identical files.
    progress shows a bar over the zips written.
    """
    if min(zips, bgs_per_zip, fg, placements) < 1:
        raise ValueError("zips, bgs_per_zip, fg and placements must all be at least 1")
    if depth not in DEPTH_MODES:
        raise ValueError(f"depth must be one of {', '.join(DEPTH_MODES)}, not {depth!r}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16, not {image_size}")
    per_bg = fg * placements
    zip_list = []
    for batch in range(1, zips + 1):
        bg_ids = list(range((batch - 1) * bgs_per_zip + 1, batch * bgs_per_zip + 1))
        keys = [schema.seed_key(i, k) for i in bg_ids for k in range(1, per_bg + 1)]
        zip_list.append({"name": schema.zip_name(batch), "bg_ids": bg_ids, "keys": keys})
    all_keys = [key for entry in zip_list for key in entry["keys"]]
    fault_keys = {"missing_depth": [], "truncated": [], "double_ext": []}
    if faults:
        if len(all_keys) < 3:
            raise ValueError("faults=True needs at least 3 samples")
        chosen = random.Random(seed).sample(all_keys, 3)
        fault_keys = {kind: [key] for kind, key in zip(fault_keys, chosen)}
    _write_sources(out, seed, zips * bgs_per_zip, fg, image_size)
    jobs = [{"out": out, "seed": seed, "image_size": image_size, "batch": batch, "fg": fg,
             "placements": placements, "depth": depth, "faults": fault_keys,
             "bg_ids": entry["bg_ids"]} for batch, entry in enumerate(zip_list, 1)]
    bar = tqdm(total=zips, unit="zip", desc="generating", disable=not progress)
    if workers > 1 and zips > 1:
        with multiprocessing.get_context("fork").Pool(min(workers, zips)) as pool:
            for _ in pool.imap_unordered(_write_zip, jobs):
                bar.update()
    else:
        for job in jobs:
            _write_zip(job)
            bar.update()
    bar.close()
    return {"root": str(out), "zips": zip_list, "samples": len(all_keys), "faults": fault_keys}


def main(argv=None) -> int:
    """CLI: write a synthetic seed-layout dataset."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="dataset folder to create (bg/, fg/, mask/, zipFiles/)")
    parser.add_argument("--zips", type=int, default=2, help="number of zipFiles/batch_{b}.zip (default 2)")
    parser.add_argument("--bgs-per-zip", type=int, default=2, help="backgrounds per zip (default 2)")
    parser.add_argument("--fg", type=int, default=3, help="foreground objects (default 3)")
    parser.add_argument("--placements", type=int, default=2, help="placements per bg and fg (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--image-size", type=int, default=224, help="image side in pixels (default 224)")
    parser.add_argument("--depth", choices=DEPTH_MODES, default="gray",
                        help="depth maps: gray, colour-mapped RGB, half size, or a per-sample mix (default gray)")
    parser.add_argument("--faults", action="store_true",
                        help="add a sample without depth, a truncated composite and .jpg.jpg names")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes writing zips in parallel (default: all cores)")
    args = parser.parse_args(argv)
    try:
        summary = generate(args.out, zips=args.zips, bgs_per_zip=args.bgs_per_zip, fg=args.fg,
                           placements=args.placements, seed=args.seed, image_size=args.image_size,
                           depth=args.depth, faults=args.faults, workers=args.workers, progress=True)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {summary['samples']} samples in {len(summary['zips'])} zips to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
