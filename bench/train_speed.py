"""CPU training throughput through the whole pipeline, against the model step alone.

Generates and converts a small 224 px dataset, then times optimizer steps of the default
U-Net at batch 16 fed (a) by pipeline.make_loader from the shards and (b) by random tensors
already in memory (the baseline: compute only). Prints one JSON line; `pipeline_vs_compute`
near 1.0 means the data path costs (almost) nothing on top of the model.

    python bench/train_speed.py [--steps 4] [--workers 1]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import convert_zips  # noqa: E402
from model import UNet, UNetConfig, count_parameters  # noqa: E402
from pipeline import Batch, make_loader  # noqa: E402
from pipeline.augment import draw, sample_rng  # noqa: E402
from seedzips import synthetic  # noqa: E402
from training.steps import prepare_batch, train_step  # noqa: E402

IMAGE_SIZE, BATCH = 224, 16
DATASET = dict(zips=2, bgs_per_zip=2, fg=10, placements=3, seed=2, image_size=IMAGE_SIZE)  # 120 samples


def timed_steps(batches, steps: int) -> float:
    """Samples per second over `steps` optimizer steps, after one untimed warm-up step."""
    torch.manual_seed(0)
    model = UNet(UNetConfig()).to(memory_format=torch.channels_last)  # as train.py does
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batches = iter(batches)
    cpu = torch.device("cpu")
    train_step(model, optimizer, scaler, *prepare_batch(next(batches), cpu, channels_last=True))
    started, samples = time.perf_counter(), 0
    for _ in range(steps):
        batch = next(batches)  # fetching is part of the timed step, as in train.py
        x, mask, depth = prepare_batch(batch, cpu, channels_last=True)
        train_step(model, optimizer, scaler, x, mask, depth)
        samples += x.shape[0]
    return samples / (time.perf_counter() - started)


def random_batches():
    """Endless train batches shaped like the loader's (augmentation draws included, so that
    Batch.to does the same work), made in memory."""
    generator = torch.Generator().manual_seed(0)

    def image(channels):
        return torch.randint(0, 256, (BATCH, channels, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8, generator=generator)

    draws = torch.tensor([draw(sample_rng(0, 0, str(i))) for i in range(BATCH)], dtype=torch.float32)
    while True:
        yield Batch(bg=image(3), bgfg=image(3), depth=image(1), mask=image(1) % 2, aug=draws,
                    key=[str(i) for i in range(BATCH)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per measurement")
    parser.add_argument("--workers", type=int, default=1, help="loader processes")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-train-speed-") as tmp:
        tmp = Path(tmp)
        synthetic.generate(tmp / "dataset", **DATASET, workers=2)
        convert_zips.convert(tmp / "dataset", tmp / "shards", val_fraction=0, seed=0, progress=False)
        loader = make_loader(str(tmp / "shards" / "batch-*.tar"), batch_size=BATCH, workers=args.workers,
                             image_size=IMAGE_SIZE, train=True)
        if len(loader) < args.steps + 1:
            raise SystemExit(f"bench/train_speed.py: only {len(loader)} batches, need {args.steps + 1}")
        pipeline = timed_steps(loader, args.steps)
    compute = timed_steps(random_batches(), args.steps)
    print(json.dumps({
        "bench": "train_speed", "device": "cpu", "threads": torch.get_num_threads(), "image_size": IMAGE_SIZE,
        "batch_size": BATCH, "workers": args.workers, "parameters": count_parameters(UNet()), "steps": args.steps,
        "pipeline_samples_per_s": round(pipeline, 2), "compute_only_samples_per_s": round(compute, 2),
        "pipeline_vs_compute": round(pipeline / compute, 3),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
