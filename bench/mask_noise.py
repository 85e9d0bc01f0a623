"""What the JPEG coding of the seed's masks costs: the stored masks against the true ones.

The generator pastes each object exactly at its mask and stores that mask as a JPEG (q60 in the
seed layout). The loader thresholds the decoded mask at schema.MASK_THRESHOLD and shrinks it by
nearest neighbour to the training size. This places bench/quality.py's objects the way the
generator does, codes each true mask at each quality, and prints one JSON line: the IoU of the
stored mask against the true one (pooled over all samples, as the training metrics pool), at the
generator's 224 px and at each training size, with the largest coding error in grey levels and
the pixels the threshold puts on the wrong side. A model judged against stored masks is judged
against this much noise; the IoU it loses to it cannot be told from the model's own error.

    python bench/mask_noise.py [--qualities 60,95] [--sizes 96,64] [--backgrounds 12]
"""

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import schema  # noqa: E402
from seedzips import objects, scenes, synthetic  # noqa: E402
from seedzips.textures import rng  # noqa: E402

IMAGE_SIZE, FOREGROUNDS, SEED = 224, 10, 1  # bench/quality.py's dataset: 224 px, 10 objects, seed 1


def true_masks(backgrounds: int) -> list[np.ndarray]:
    """One placement of each object on each of the first `backgrounds` photo-style scenes, as
    the generator places them: the 0/255 mask it pastes the object at."""
    foregrounds = [objects.make_foreground(SEED, j, IMAGE_SIZE) for j in range(1, FOREGROUNDS + 1)]
    generator, masks = rng(SEED, 3, 0), []
    for bg_id in range(1, backgrounds + 1):
        backdrop = scenes.make_background(SEED, bg_id, IMAGE_SIZE)
        for fg_image, fg_mask in foregrounds:
            x, y, _, obj_mask, _ = backdrop.place(generator, fg_image, fg_mask)
            mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
            mask.paste(255, (x, y), obj_mask)
            masks.append(np.asarray(mask))
    return masks


def stored(mask: np.ndarray, quality: int) -> np.ndarray:
    """The 0/255 mask as the loader sees it after a JPEG round trip at `quality`."""
    data = synthetic.encode_jpeg(Image.fromarray(mask), quality)
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"))


def shrink(masks: np.ndarray, size: int) -> torch.Tensor:
    """[N,H,W] 0/1 masks -> [N,size,size] by nearest neighbour, as the loader resizes them."""
    batch = torch.from_numpy(masks).float()[:, None]
    return F.interpolate(batch, size=(size, size), mode="nearest-exact")[:, 0] > 0.5


def iou(found: torch.Tensor, truth: torch.Tensor) -> float:
    return ((found & truth).sum() / (found | truth).sum()).item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qualities", default="60,95", help="JPEG qualities to code the masks at")
    parser.add_argument("--sizes", default="96,64", help="training sizes to shrink to")
    parser.add_argument("--backgrounds", type=int, default=12, help="scenes to place the objects on")
    args = parser.parse_args(argv)
    truth = np.stack(true_masks(args.backgrounds)) > schema.MASK_THRESHOLD
    sizes = [IMAGE_SIZE, *(int(s) for s in args.sizes.split(","))]
    result = {"bench": "mask_noise", "samples": len(truth), "object_share": round(float(truth.mean()), 4)}
    for quality in (int(q) for q in args.qualities.split(",")):
        coded = np.stack([stored(m, quality) for m in truth.astype(np.uint8) * 255])
        found = coded > schema.MASK_THRESHOLD
        result[f"q{quality}"] = {
            "max_error": int(np.abs(coded.astype(np.int16) - truth * 255).max()),  # grey levels
            "flipped_pixels": int((found != truth).sum()),
            **{str(size): round(iou(shrink(found, size), shrink(truth, size)), 4) for size in sizes}}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
