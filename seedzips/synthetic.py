"""A synthetic dataset in the seed layout, with the seed's quirks, that a model can learn.

Two styles of picture, the same zips. photo (scenes, objects): ray-cast outdoor scenes with a
ground plane in perspective, walls, boxes, balls, hills and sky, textured and lit, and shaded,
textured objects standing on the ground, sized and given depth by the row they stand on.
simple: flat shapes on colour noise with a depth ramp (fast; the tests use it). Either way each
composite is a foreground pasted on a background exactly at the mask, and its depth map is the
background's with the object nearer (smaller value; larger = farther) than what it covers.

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
from PIL import Image

from pipeline import schema

from . import objects, scenes, simple
from .textures import rng

DEPTH_MODES = ("gray", "color", "half", "mixed")
# style -> (make_background(seed, bg_id, size) with .image, .depth, .place(); make_foreground)
STYLES = {"photo": (scenes.make_background, objects.make_foreground),
          "simple": (simple.make_background, simple.make_foreground)}
_FIXED_TIME = (2020, 1, 1, 0, 0, 0)  # zip timestamps, so the same seed gives identical zips
MEMBER_QUALITY = 60  # JPEG quality of the seed's zip members (composites, masks, depth maps)


def _depth_colormap() -> list[int]:
    """An RGB lookup table whose luma (0.299 R + 0.587 G + 0.114 B) equals the depth value."""
    d = np.arange(256, dtype=np.float64)
    tint = 60 * d * (255 - d) / 255**2
    red, green, blue = d + tint, d, d - tint * 0.299 / 0.114
    return [int(v) for channel in (red, green, blue) for v in np.clip(channel.round(), 0, 255)]


_COLORMAP = _depth_colormap()


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _depth_image(depth: Image.Image, mode: str) -> Image.Image:
    if mode == "color":
        return depth.convert("RGB").point(_COLORMAP)
    if mode == "half":
        return depth.resize((max(depth.width // 2, 1), max(depth.height // 2, 1)), Image.BILINEAR)
    return depth


def zip_info(name: str) -> zipfile.ZipInfo:
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
    generator = rng(seed, 3, batch)
    make_background, make_foreground = STYLES[job["style"]]
    foregrounds = [make_foreground(seed, j, size) for j in range(1, job["fg"] + 1)]
    faults = job["faults"]
    depth_members, labels = [], []
    path = os.path.join(job["out"], schema.ZIP_DIR, schema.zip_name(batch))
    with zipfile.ZipFile(path + ".tmp", "w") as archive:
        for folder in (schema.COMPOSITE_DIR, schema.MASK_DIR):
            archive.writestr(zip_info(folder + "/"), b"")
        for bg_id in job["bg_ids"]:
            backdrop = make_background(seed, bg_id, size)
            background, bg_depth = Image.fromarray(backdrop.image), Image.fromarray(backdrop.depth)
            for fg_index, (fg_image, fg_mask) in enumerate(foregrounds):
                for p in range(1, job["placements"] + 1):
                    key = schema.seed_key(bg_id, fg_index * job["placements"] + p)
                    x, y, obj, obj_mask, value = backdrop.place(generator, fg_image, fg_mask)
                    composite = background.copy()
                    composite.paste(obj, (x, y), obj_mask)
                    mask = Image.new("L", (size, size), 0)
                    mask.paste(255, (x, y), obj_mask)
                    depth = bg_depth.copy()
                    depth.paste(value, (x, y), obj_mask)
                    mode = job["depth"]
                    if mode == "mixed":
                        mode = ("gray", "color", "half")[int(generator.integers(3))]
                    name = key + (".jpg.jpg" if key in faults["double_ext"] else ".jpg")
                    composite_bytes = encode_jpeg(composite, MEMBER_QUALITY)
                    if key in faults["truncated"]:
                        composite_bytes = composite_bytes[: len(composite_bytes) // 2]
                    archive.writestr(zip_info(f"{schema.MASK_DIR}/{name}"), encode_jpeg(mask, MEMBER_QUALITY))
                    archive.writestr(zip_info(f"{schema.COMPOSITE_DIR}/{name}"), composite_bytes)
                    labels.append(name)
                    if key not in faults["missing_depth"]:
                        depth_bytes = encode_jpeg(_depth_image(depth, mode), MEMBER_QUALITY)
                        depth_members.append((f"{schema.DEPTH_DIR}/{name}", depth_bytes))
        # The depth maps were added in a later pass, in an order unrelated to the rest.
        archive.writestr(zip_info(schema.DEPTH_DIR + "/"), b"")
        for index in generator.permutation(len(depth_members)):
            archive.writestr(zip_info(depth_members[index][0]), depth_members[index][1])
        archive.writestr(zip_info(schema.LABELS), "".join(n + "\n" for n in sorted(labels)))
    os.replace(path + ".tmp", path)


def _write_sources(out: str, style: str, seed: int, bg_count: int, fg_count: int, size: int) -> None:
    make_background, make_foreground = STYLES[style]
    for folder in (schema.BG_DIR, schema.FG_DIR, schema.FG_MASK_DIR, schema.ZIP_DIR):
        os.makedirs(os.path.join(out, folder), exist_ok=True)
    for bg_id in range(1, bg_count + 1):
        image = Image.fromarray(make_background(seed, bg_id, size).image)
        image.save(os.path.join(out, schema.BG_DIR, schema.bg_name(bg_id)), quality=75)
    for fg_id in range(1, fg_count + 1):
        image, mask = make_foreground(seed, fg_id, size)
        image.save(os.path.join(out, schema.FG_DIR, schema.fg_name(fg_id)), quality=90)
        mask.save(os.path.join(out, schema.FG_MASK_DIR, schema.fg_mask_name(fg_id)), quality=90)


def generate(out, *, zips=2, bgs_per_zip=2, fg=3, placements=2, seed=0, image_size=224,
             depth="gray", faults=False, style="simple", workers=1, progress=False) -> dict:
    """Write a seed-layout dataset to `out` and describe it.

    style: "photo" or "simple" (STYLES). Here the default is "simple", which the tests and the
    loader benchmarks were built on; the command line's default is "photo".
    Returns {"root", "zips": [{"name", "bg_ids", "keys"}], "samples", "faults"}: "samples" counts
    composites written; "faults" maps missing_depth / truncated / double_ext to the affected keys
    (empty lists unless faults=True). The same arguments always give byte-identical files.
    progress shows a bar over the zips written.
    """
    if min(zips, bgs_per_zip, fg, placements) < 1:
        raise ValueError("zips, bgs_per_zip, fg and placements must all be at least 1")
    if depth not in DEPTH_MODES:
        raise ValueError(f"depth must be one of {', '.join(DEPTH_MODES)}, not {depth!r}")
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}, not {style!r}")
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
    _write_sources(out, style, seed, zips * bgs_per_zip, fg, image_size)
    jobs = [{"out": out, "style": style, "seed": seed, "image_size": image_size, "batch": batch, "fg": fg,
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
    parser.add_argument("--style", choices=tuple(STYLES), default="photo",
                        help="photo: ray-cast scenes with real depth cues and shaded objects standing on the "
                        "ground, the stand-in for real photographs; simple: flat shapes on colour noise, "
                        "faster, whose depth is easy to learn (default photo)")
    parser.add_argument("--faults", action="store_true",
                        help="add a sample without depth, a truncated composite and .jpg.jpg names")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes writing zips in parallel (default: all cores)")
    args = parser.parse_args(argv)
    try:
        summary = generate(args.out, zips=args.zips, bgs_per_zip=args.bgs_per_zip, fg=args.fg,
                           placements=args.placements, seed=args.seed, image_size=args.image_size,
                           depth=args.depth, faults=args.faults, style=args.style, workers=args.workers,
                           progress=True)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {summary['samples']} samples in {len(summary['zips'])} zips to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
