"""What a fixed training budget reaches on generated data, against a trivial predictor.

Generates a seed-layout dataset, converts it (validation = every sample of held-out
backgrounds), trains train.py for a fixed number of steps on the CPU, and prints one JSON
line: the validation IoU, Dice, RMSE, AbsRel, delta1 of the trained model and of the trivial
baseline measured on the same validation samples (mask: all background; depth: the mean
training depth everywhere), plus the time taken.

    python bench/quality.py [--steps 300] [--image-size 64] [--width 16]
"""

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import convert_zips  # noqa: E402
import train  # noqa: E402
from model import SegDepthMetrics  # noqa: E402
from pipeline import make_loader  # noqa: E402
from seedzips import synthetic  # noqa: E402

DATASET = dict(zips=4, bgs_per_zip=5, fg=20, placements=4, seed=1)  # 1,600 samples, 20 backgrounds


def trivial_baseline(train_urls: str, val_urls: str, image_size: int) -> dict:
    """Scores of 'no object anywhere, mean training depth everywhere' on the validation set."""
    loader_args = dict(batch_size=64, workers=0, image_size=image_size, train=False)
    total, pixels = 0.0, 0
    for batch in make_loader(train_urls, **loader_args):
        total += batch["depth"].double().sum().item() / 255
        pixels += batch["depth"].numel()
    mean_depth = total / pixels
    metrics = SegDepthMetrics()
    for batch in make_loader(val_urls, **loader_args):
        mask, depth = batch["mask"].float(), batch["depth"].float() / 255
        metrics.update(torch.full_like(mask, -1.0), torch.full_like(depth, mean_depth), mask, depth)
    return {"mean_depth": round(mean_depth, 4), **metrics.compute()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        tmp = Path(tmp)
        synthetic.generate(tmp / "dataset", **DATASET, workers=2)
        manifest = convert_zips.convert(tmp / "dataset", tmp / "shards", val_fraction=0.1, seed=0, progress=False)
        train_urls, val_urls = str(tmp / "shards" / "batch-*.tar"), str(tmp / "shards" / "val-*.tar")
        started = time.perf_counter()
        argv = ["--shards", train_urls, "--val-shards", val_urls, "--out", str(tmp / "run"), "--device", "cpu",
                "--image-size", str(args.image_size), "--width", str(args.width), "--batch-size",
                str(args.batch_size), "--workers", "1", "--steps", str(args.steps),
                "--val-every", str(args.steps), "--previews", "0"]
        log = io.StringIO()  # train.py's progress and messages; stdout keeps only the JSON line
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            status = train.main(argv)
        seconds = time.perf_counter() - started
        if status:
            raise SystemExit(f"bench/quality.py: train.py failed with status {status}:\n{log.getvalue()[-2000:]}")
        records = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
        final = [r for r in records if r["kind"] == "val"][-1]
        baseline = trivial_baseline(train_urls, val_urls, args.image_size)

    keys = ("iou", "dice", "rmse", "abs_rel", "delta1")
    print(json.dumps({
        "bench": "quality",
        "steps": final["step"], "image_size": args.image_size, "width": args.width, "batch_size": args.batch_size,
        "train_samples": manifest["totals"]["train_samples"], "val_samples": final["samples"],
        "train_seconds": round(seconds, 1),
        "model": {k: round(final[k], 4) for k in keys},
        "baseline": {k: round(baseline[k], 4) for k in keys},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
