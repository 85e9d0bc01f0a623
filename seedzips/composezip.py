"""The composer's writing: composites and masks made in worker processes, in order, and the
seed-layout files they go into (the source images, then one zip at a time, atomically).

A zip holds bg_fg_1/, bg_fg_mask_1/ and depthMap/ {key}.jpg (JPEG q60, as the seed's),
placements.json (where each sample's cut-out went) and labels.txt; it appears under its final
name only when complete.
"""

import json
import os
import zipfile
from collections import deque

import numpy as np
from PIL import Image

from pipeline import schema
from pipeline.schema import TEMPORARY
from seedzips import placement
from seedzips.storage import sha256_of
from seedzips.synthetic import MEMBER_QUALITY, encode_jpeg, zip_info

SOURCE_QUALITY = {schema.BG_DIR: 75, schema.FG_DIR: 90, schema.FG_MASK_DIR: 90}  # as the synthetic generator's
PLACEMENTS_NAME = "placements.json"
_SOURCES = None  # (background arrays, Foregrounds) in each composing process


def set_sources(sources) -> None:
    """Give this process the pictures compose_chunk pastes (a pool's initializer)."""
    global _SOURCES
    _SOURCES = sources


def compose_chunk(chunk: list) -> list:
    """[(composite array, composite JPEG, mask JPEG)] of [(key, bg_id, fg_id, Placement)]."""
    backgrounds, foregrounds = _SOURCES
    out = []
    for _, bg_id, fg_id, where in chunk:
        composite, mask = placement.paste(backgrounds[bg_id - 1], foregrounds[fg_id - 1].rgba, where)
        out.append((composite, encode_jpeg(Image.fromarray(composite), MEMBER_QUALITY),
                    encode_jpeg(Image.fromarray(mask), MEMBER_QUALITY)))
    return out


def ordered(pool, chunks, window: int):
    """compose_chunk of each chunk, in order, with at most `window` chunks composed ahead."""
    if pool is None:
        yield from map(compose_chunk, chunks)
        return
    pending = deque()
    for chunk in chunks:
        pending.append(pool.apply_async(compose_chunk, (chunk,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def zip_samples(bg_ids, foregrounds, placements: int, scale, seed: int) -> list:
    """[(key, bg_id, fg_id, Placement)] of one zip, in key order of background, foreground, draw."""
    samples = []
    for bg_id in bg_ids:
        for fg_id, fg in enumerate(foregrounds, 1):
            draws = placement.draw_placements(seed, bg_id, fg_id, placements, fg.rgba.shape[:2], scale)
            for p, where in enumerate(draws, 1):
                samples.append((schema.seed_key(bg_id, (fg_id - 1) * placements + p), bg_id, fg_id, where))
    return samples


def write_sources(out: str, backgrounds: list, foregrounds: list) -> None:
    """bg/, fg/ and mask/: the 224x224 backgrounds, each cut-out on black and its binary mask."""
    for bg_id, (_, image) in enumerate(backgrounds, 1):
        _write_jpeg(out, schema.BG_DIR, schema.bg_name(bg_id), image)
    for fg_id, fg in enumerate(foregrounds, 1):
        alpha = fg.rgba[..., 3:].astype(np.float32) / 255
        _write_jpeg(out, schema.FG_DIR, schema.fg_name(fg_id), np.rint(fg.rgba[..., :3] * alpha).astype(np.uint8))
        mask = np.where(fg.rgba[..., 3] > schema.MASK_THRESHOLD, 255, 0).astype(np.uint8)
        _write_jpeg(out, schema.FG_MASK_DIR, schema.fg_mask_name(fg_id), mask)


def _write_jpeg(out: str, folder: str, name: str, image: np.ndarray) -> None:
    schema.write_durably(os.path.join(out, folder, name), encode_jpeg(Image.fromarray(image), SOURCE_QUALITY[folder]))


def write_zip(path: str, samples: list, results, labeller, batch_size: int, foregrounds, bar) -> dict:
    """Write one zip from the composed chunks of its samples; return its record entry."""
    labels, placed = [], {}
    with zipfile.ZipFile(path + TEMPORARY, "w") as archive:
        for folder in (schema.COMPOSITE_DIR, schema.MASK_DIR, schema.DEPTH_DIR):
            archive.writestr(zip_info(folder + "/"), b"")
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            composed = next(results)
            depths = labeller([composite for composite, _, _ in composed])
            for (key, bg_id, fg_id, where), (_, composite, mask), depth in zip(chunk, composed, depths):
                name = key + ".jpg"
                archive.writestr(zip_info(f"{schema.COMPOSITE_DIR}/{name}"), composite)
                archive.writestr(zip_info(f"{schema.MASK_DIR}/{name}"), mask)
                archive.writestr(zip_info(f"{schema.DEPTH_DIR}/{name}"),
                                 encode_jpeg(Image.fromarray(depth), MEMBER_QUALITY))
                labels.append(name)
                fg = foregrounds[fg_id - 1]
                placed[key] = {"bg": bg_id, "fg": fg_id, "source": fg.name, "mirrored": fg.mirrored,
                               "box": list(where)}
            bar.update(len(chunk))
        archive.writestr(zip_info(PLACEMENTS_NAME), json.dumps(placed, sort_keys=True, separators=(",", ":")))
        archive.writestr(zip_info(schema.LABELS), "".join(n + "\n" for n in sorted(labels)))
    schema.replace_durably(path + TEMPORARY, path)
    return {"bytes": os.path.getsize(path), "sha256": sha256_of(path)}
