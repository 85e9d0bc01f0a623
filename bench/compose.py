"""Benchmark: seedzips.compose's two stages, extrapolated to a seed-sized dataset, beside the seed.

The seed made 400,000 composites with masks and depth maps in "5 hours (from 4 days)". This
measures, on generated photos (the synthetic generator's photo style):
  composing: placements drawn, cut-outs resized and alpha-blended, composite and mask JPEG
             encoded (what compose's worker processes do), in one process and in --workers;
  depth:     seedzips.depthlabel on batches of composites, on each device present (the CPU, and
             CUDA when there is one), with a model of Depth-Anything-V2-Small's architecture and
             image processor, randomly initialised and loaded from a save_pretrained folder
             (the same arithmetic as the real weights; nothing downloaded), or --depth-model.
compose runs the two at once (workers compose while the main process labels), so a seed-sized
run takes about 400,000 / the slower rate. Prints one JSON line.
"""

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from seedzips import composezip, objects, placement, scenes  # noqa: E402  (needs ROOT on the path)

SEED_SAMPLES = 400_000
SEED_HOURS = 5.0


def _sources(count: int) -> tuple:
    """(background arrays, Foregrounds with mirror images) from generated 320x240 photos."""
    backgrounds = []
    for i in range(1, count + 1):
        photo = Image.fromarray(scenes.make_background(0, i, 320).image).crop((0, 40, 320, 280))
        side = min(photo.size)
        left = (photo.width - side) // 2
        square = photo.crop((left, 0, left + side, side)).resize((placement.SIZE,) * 2, placement.RESAMPLE)
        backgrounds.append(np.asarray(square))
    cutouts = []
    for j in range(1, count + 1):
        rgb, mask = objects.make_foreground(0, j, 160)
        rgba = rgb.convert("RGBA")
        rgba.putalpha(mask)
        box = mask.getbbox()
        cutouts.append(placement.Foreground(f"{j}.png", False, np.asarray(rgba.crop(box))))
    mirrors = [placement.Foreground(fg.name, True, np.ascontiguousarray(fg.rgba[:, ::-1])) for fg in cutouts]
    return backgrounds, cutouts + mirrors


def _chunks(sources, samples: int, batch_size: int) -> list:
    backgrounds, foregrounds = sources
    bg_ids = list(range(1, len(backgrounds) + 1))
    placements = -(-samples // (len(bg_ids) * len(foregrounds)))
    todo = composezip.zip_samples(bg_ids, foregrounds, placements, (0.25, 0.75), 0)
    todo = todo[:samples]
    return [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]


def _compose_rate(sources, chunks, workers: int) -> float:
    composezip.set_sources(sources)
    started = time.perf_counter()
    if workers == 1:
        done = sum(len(result) for result in map(composezip.compose_chunk, chunks))
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            done = sum(len(result) for result in pool.imap(composezip.compose_chunk, chunks))
    return done / (time.perf_counter() - started)


def _small_model(folder: str) -> str:
    """Depth-Anything-V2-Small's architecture and processor settings, random weights, saved."""
    import torch
    import transformers
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    transformers.logging.disable_progress_bar()
    backbone = Dinov2Config(image_size=518, hidden_size=384, num_attention_heads=6, out_indices=[3, 6, 9, 12],
                            apply_layernorm=True, reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, neck_hidden_sizes=[48, 96, 192, 384],
                                 fusion_hidden_size=64, head_hidden_size=32)
    torch.manual_seed(0)
    DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(size={"height": 518, "width": 518}, keep_aspect_ratio=True, ensure_multiple_of=14,
                      resample=Image.BICUBIC, image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


def _depth_rate(model: str, device: str, composites: list, batch_size: int) -> dict:
    from seedzips.depthlabel import DepthLabeller

    labeller = DepthLabeller(model, device)
    labeller(composites[:batch_size])  # warm-up: kernels chosen, memory allocated
    started = time.perf_counter()
    for i in range(0, len(composites), batch_size):
        labeller(composites[i:i + batch_size])
    if labeller.device.type == "cuda":
        labeller._torch.cuda.synchronize()
    rate = len(composites) / (time.perf_counter() - started)
    return {"samples_per_s": rate, "dtype": labeller.identity["dtype"]}


def main(argv=None) -> int:
    """Run the benchmark and print its JSON line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compose-samples", type=int, default=600, help="composites timed (default 600)")
    parser.add_argument("--depth-samples", type=int, default=48,
                        help="composites labelled per device, after a warm-up batch (default 48)")
    parser.add_argument("--gpu-depth-samples", type=int, default=2048, help="the same on CUDA (default 2048)")
    parser.add_argument("--batch-size", type=int, default=16, help="composites per depth batch (default 16)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="composing processes (default: all cores)")
    parser.add_argument("--depth-model", help="a depth model to time instead (hub id or folder)")
    args = parser.parse_args(argv)
    sources = _sources(10)
    chunks = _chunks(sources, args.compose_samples, args.batch_size)
    one = _compose_rate(sources, chunks, 1)
    parallel = _compose_rate(sources, chunks, args.workers) if args.workers > 1 else one
    composites = [composite for result in map(composezip.compose_chunk, chunks) for composite, _, _ in result]
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    depth = {}
    with tempfile.TemporaryDirectory(prefix="bench-compose-") as tmp:
        model = args.depth_model or _small_model(tmp)
        for device in devices:
            count = args.gpu_depth_samples if device == "cuda" else args.depth_samples
            pool = (composites * -(-count // len(composites)))[:count]
            depth[device] = _depth_rate(model, device, pool, args.batch_size)
    fastest = max(d["samples_per_s"] for d in depth.values())
    for d in depth.values():
        d["seed_sized_hours"] = round(SEED_SAMPLES / d["samples_per_s"] / 3600, 1)
        d["samples_per_s"] = round(d["samples_per_s"], 2)
    print(json.dumps({
        "bench": "compose", "cpus": os.cpu_count(), "workers": args.workers,
        "model": args.depth_model or "Depth-Anything-V2-Small architecture, random weights",
        "compose_samples_per_s": {"one_process": round(one, 1), "workers": round(parallel, 1)},
        "compose_seed_sized_hours": round(SEED_SAMPLES / parallel / 3600, 2),
        "depth": depth,
        "seed_sized_hours": round(SEED_SAMPLES / min(parallel, fastest) / 3600, 1),
        "seed": {"samples": SEED_SAMPLES, "hours": SEED_HOURS,
                 "samples_per_s": round(SEED_SAMPLES / SEED_HOURS / 3600, 1)},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
