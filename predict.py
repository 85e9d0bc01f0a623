"""Predict the object mask and the depth map for (bg, bgfg) pairs with a train.py checkpoint.

One pair (writes DIR/mask.png, DIR/depth.png, DIR/depth_color.png):
    python predict.py --checkpoint runs/exp1/best.pt --bg bg.jpg --bgfg bgfg.jpg --out DIR
A folder of pairs NAME.bg.jpg + NAME.bgfg.jpg (also .jpeg/.png), one subfolder per NAME:
    python predict.py --checkpoint runs/exp1/best.pt --pairs photos/ --out DIR
The samples of a shard (local or fsspec URL), one subfolder per sample key:
    python predict.py --checkpoint runs/exp1/best.pt --shard shards/val-1.tar --limit 8 --out DIR

Outputs have the input's size: mask.png is 0 or 255, depth.png is 8-bit gray on the training
targets' scale (0..255, larger = farther), depth_color.png is the same depth colour-mapped
(near red, far blue). Inputs are resized to the checkpoint's training size for the network.
"""

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.nn import functional as F
from tqdm import tqdm

from model import check_image_size, to_input
from pipeline import PipelineError, schema
from pipeline.shardreader import read_samples
from training import UserError
from training.checkpoint import load, model_from_checkpoint
from training.options import storage_option
from training.visual import colorize_depth

PAIR_SUFFIXES = (".jpg", ".jpeg", ".png")


def read_rgb(source, name: str) -> torch.Tensor:
    """An image file or its bytes -> uint8 [3,H,W]; `name` is what errors call it."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    except (OSError, UnidentifiedImageError) as err:
        raise UserError(f"cannot read image {name}: {err}".splitlines()[0]) from None


@torch.no_grad()
def predict(model, bg: torch.Tensor, bgfg: torch.Tensor, image_size: int, device) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [3,H,W] pair -> (mask uint8 0/255 [H,W], depth uint8 0..255 [H,W]) at the input's size."""
    height, width = bgfg.shape[-2:]
    pair = torch.stack([bgfg, bg]).to(device).float()
    pair = F.interpolate(pair, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    x = to_input(*pair.round().clamp(0, 255).unsqueeze(1))
    logits, depth = model(x)
    logits, depth = (F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)
                     for t in (logits, depth))
    mask = ((logits[0, 0] > 0).to(torch.uint8) * 255).cpu().numpy()
    depth = (depth[0, 0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return mask, depth


def write_outputs(folder: Path, mask: np.ndarray, depth: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(folder / "mask.png")
    Image.fromarray(depth).save(folder / "depth.png")
    Image.fromarray(colorize_depth(depth / 255.0)).save(folder / "depth_color.png")


def find_pairs(folder: Path) -> list[tuple[str, Path, Path]]:
    """(NAME, bg path, bgfg path) for every NAME.bg.EXT that has a NAME.bgfg.EXT beside it."""
    if not folder.is_dir():
        raise UserError(f"--pairs {folder} is not a folder")
    found: dict[str, dict[str, Path]] = {}
    for path in sorted(folder.iterdir()):
        name, _, rest = path.name.partition(".")
        role, _, ext = rest.partition(".")
        if role in ("bg", "bgfg") and "." + ext.lower() in PAIR_SUFFIXES:
            found.setdefault(name, {})[role] = path
    if not found:
        raise UserError(f"--pairs {folder} holds no NAME.bg.jpg / NAME.bgfg.jpg files")
    for name, roles in found.items():
        if len(roles) != 2:
            missing = "bgfg" if "bg" in roles else "bg"
            raise UserError(f"--pairs {folder}: {name} has no {name}.{missing}.jpg (or .jpeg/.png)")
    return [(name, roles["bg"], roles["bgfg"]) for name, roles in found.items()]


def shard_pairs(url: str, limit: int | None, storage_options):
    """(key, bg bytes, bgfg bytes) for the first `limit` complete samples of a shard."""
    wanted = (schema.BG, schema.BGFG)
    # stop=None: to the end of the shard with no count to check; `limit` counts complete samples only.
    for sample in read_samples(url, 0, None, storage_options, wanted=wanted):
        if limit is not None and limit <= 0:
            return
        if sample.error or set(sample.members) != set(wanted):
            print(f"predict.py: skipping {sample.key} in {url}: {sample.error or 'incomplete sample'}", file=sys.stderr)
            continue
        yield sample.key, sample.members[schema.BG], sample.members[schema.BGFG]
        limit = None if limit is None else limit - 1


def input_pairs(args):
    """(output subfolder name or None, bg, bgfg uint8 tensors) for the chosen input."""
    if args.bg:
        yield None, read_rgb(args.bg, args.bg), read_rgb(args.bgfg, args.bgfg)
    elif args.pairs:
        for name, bg, bgfg in find_pairs(Path(args.pairs)):
            yield name, read_rgb(bg, str(bg)), read_rgb(bgfg, str(bgfg))
    else:
        for key, bg, bgfg in shard_pairs(args.shard, args.limit, dict(args.storage_options) or None):
            where = f"{args.shard}:{key}"
            yield key, read_rgb(bg, f"{where}.{schema.BG}"), read_rgb(bgfg, f"{where}.{schema.BGFG}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="predict.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a train.py checkpoint (RUN/best.pt or RUN/last.pt)")
    parser.add_argument("--out", required=True, help="output folder")
    source = parser.add_argument_group("input (one of)")
    source.add_argument("--bg", help="background image (with --bgfg)")
    source.add_argument("--bgfg", help="the same background with the object pasted on it (with --bg)")
    source.add_argument("--pairs", help="folder of NAME.bg.jpg + NAME.bgfg.jpg pairs")
    source.add_argument("--shard", help="a shard's path or URL")
    parser.add_argument("--limit", type=int, help="with --shard: at most this many samples")
    parser.add_argument("--image-size", type=int, help="network input size (default: the training size)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--storage-option", dest="storage_options", action="append", type=storage_option,
                        default=[], metavar="KEY=VALUE",
                        help="fsspec option for --shard, repeatable (VALUE may be JSON)")
    return parser


def run(args) -> int:
    chosen = [bool(args.bg or args.bgfg), bool(args.pairs), bool(args.shard)]
    if sum(chosen) != 1 or (chosen[0] and not (args.bg and args.bgfg)):
        raise UserError("give exactly one input: --bg with --bgfg, --pairs FOLDER, or --shard URL")
    if args.limit is not None and not args.shard:
        raise UserError("--limit goes with --shard")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit}: must be at least 1")
    state = load(args.checkpoint)
    model = model_from_checkpoint(state)
    image_size = args.image_size or state["image_size"]
    try:
        check_image_size(image_size, model.config)
    except ValueError as err:
        raise UserError(f"--image-size: {err}") from None
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    model = model.to(device).eval()
    out = Path(args.out)

    written = 0
    for name, bg, bgfg in tqdm(input_pairs(args), unit="pair", disable=bool(args.bg), leave=False):
        if bg.shape != bgfg.shape:
            raise UserError(f"{name or args.bg}: bg is {tuple(bg.shape[1:])} but bgfg is {tuple(bgfg.shape[1:])}")
        write_outputs(out / name if name else out, *predict(model, bg, bgfg, image_size, device))
        written += 1
    print(f"predict.py: wrote {written} prediction(s) to {out}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (UserError, PipelineError, OSError) as err:
        print(f"predict.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
