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

With --shard, a sample that cannot be predicted (an undecodable or truncated image, a missing
member, damaged tar data) is skipped with one `predict.py: skipped` line naming it and the
shard, and the rest are predicted. A shard of a compact set takes its samples' backgrounds from
the backgrounds.tar beside it (a damaged background costs the samples composed on it). Exit status: 0 when something was predicted; 2 with one
`predict.py: error:` line for bad input (options, a missing, empty or non-tar shard, a shard
with no sample that could be predicted, an unreadable image file or checkpoint).
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

from model import check_image_size, flip_averaged, to_input
from pipeline import PipelineError, schema
from pipeline.clients import storage_option
from pipeline.shardreader import backgrounds_beside, read_samples
from training import UserError
from training.checkpoint import load, model_from_checkpoint
from training.options import POSITIVE_INT, OneLineParser, check_device, uses_cuda
from training.preflight import check_memory, probe_shard
from training.visual import colorize_depth

PAIR_SUFFIXES = (".jpg", ".jpeg", ".png")


def read_rgb(source, name: str) -> torch.Tensor:
    """An image file or its bytes -> uint8 [3,H,W]; `name` is what errors call it."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    except UnidentifiedImageError:  # its message names the file object, not the file
        raise UserError(f"{name} is not an image PIL can read") from None
    except OSError as err:
        raise UserError(f"cannot read image {name}: {err.strerror or err}".splitlines()[0]) from None


def read_pair(name: str, bg, bgfg, bg_name: str, bgfg_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Both images of a pair as uint8 [3,H,W]; UserError unless both read and match in size."""
    bg, bgfg = read_rgb(bg, bg_name), read_rgb(bgfg, bgfg_name)
    if bg.shape != bgfg.shape:
        raise UserError(f"{name}: bg is {tuple(bg.shape[1:])} but bgfg is {tuple(bgfg.shape[1:])}")
    return bg, bgfg


@torch.no_grad()
def predict(model, bg: torch.Tensor, bgfg: torch.Tensor, image_size: int, device, *,
            flip_average: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [3,H,W] pair -> (mask uint8 0/255 [H,W], depth uint8 0..255 [H,W]) at the input's size."""
    height, width = bgfg.shape[-2:]
    pair = torch.stack([bgfg, bg]).to(device).float()
    pair = F.interpolate(pair, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    x = to_input(*pair.round().clamp(0, 255).unsqueeze(1))
    logits, depth = flip_averaged(model, x) if flip_average else model(x)
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


def shard_pairs(url: str, storage_options, skip, backgrounds):
    """(key, bg, bgfg uint8 tensors) for the samples of a shard that can be predicted (those of
    a compact shard set with their `backgrounds`, from backgrounds_beside); the others go to
    skip(what, reason)."""
    wanted = (schema.BG, schema.BGFG)
    # stop=None: to the end of the shard with no count to check. Damaged tar data comes back
    # as samples with an error ("#N" where the damage hides the key), never as an exception.
    for sample in read_samples(url, 0, None, storage_options, wanted=wanted, backgrounds=backgrounds):
        missing = [member for member in wanted if member not in sample.members]
        if sample.error or missing:
            skip(sample.key, sample.error or f"no {' or '.join(missing)}")
            continue
        try:
            bg, bgfg = read_pair(sample.key, sample.members[schema.BG], sample.members[schema.BGFG],
                                 f"{sample.key}.{schema.BG}", f"{sample.key}.{schema.BGFG}")
        except UserError as error:
            skip(sample.key, str(error))
            continue
        yield sample.key, bg, bgfg


def input_pairs(args, skip, backgrounds):
    """(output subfolder name or None, bg, bgfg uint8 tensors) for the chosen input."""
    if args.bg:
        yield None, *read_pair(args.bg, args.bg, args.bgfg, args.bg, args.bgfg)
    elif args.pairs:
        for name, bg, bgfg in find_pairs(Path(args.pairs)):
            yield name, *read_pair(name, bg, bgfg, str(bg), str(bgfg))
    else:
        yield from shard_pairs(args.shard, dict(args.storage_options) or None, skip, backgrounds)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="predict.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a train.py checkpoint (RUN/best.pt or RUN/last.pt)")
    parser.add_argument("--out", required=True, help="output folder")
    source = parser.add_argument_group("input (one of)")
    source.add_argument("--bg", help="background image (with --bgfg)")
    source.add_argument("--bgfg", help="the same background with the object pasted on it (with --bg)")
    source.add_argument("--pairs", help="folder of NAME.bg.jpg + NAME.bgfg.jpg pairs")
    source.add_argument("--shard", help="a shard's path or URL")
    parser.add_argument("--limit", type=POSITIVE_INT, help="with --shard: at most this many predictions")
    parser.add_argument("--image-size", type=POSITIVE_INT,
                        help="network input size (default: the training size; a multiple of 32 that fits in memory)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--flip-average", action="store_true",
                        help="average each prediction with that of the mirrored input (test-time mirroring; "
                        "twice the cost); use it if the run validated with it")
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
    check_device(args.device)
    backgrounds = None
    if args.shard:
        probe_shard(args.shard, dict(args.storage_options) or None)
        # Before the progress bar: a compact shard whose backgrounds.tar is missing is one error line.
        backgrounds = backgrounds_beside(args.shard, dict(args.storage_options) or None)
    state = load(args.checkpoint)
    model = model_from_checkpoint(state)
    image_size = state["image_size"] if args.image_size is None else args.image_size
    try:
        check_image_size(image_size, model.config)
    except ValueError as err:
        raise UserError(f"--image-size: {err}") from None
    device = torch.device("cuda" if uses_cuda(args.device) else "cpu")
    check_memory(model.config, image_size, 1, device, training=False, options=f"--image-size {image_size}")
    model = model.to(device).eval()
    out = Path(args.out)

    skipped = []

    def skip(key: str, reason: str) -> None:
        skipped.append(key)
        tqdm.write(f"predict.py: skipped {key} of {args.shard}: {reason}", file=sys.stderr)

    written = 0
    # Closed however the loop ends, so an error line does not land on the end of a progress bar.
    with tqdm(input_pairs(args, skip, backgrounds), unit="pair", disable=bool(args.bg), leave=False) as pairs:
        for name, bg, bgfg in pairs:
            mask, depth = predict(model, bg, bgfg, image_size, device, flip_average=args.flip_average)
            write_outputs(out / name if name else out, mask, depth)
            written += 1
            if written == args.limit:
                break
    if skipped and not written:
        raise UserError(f"{args.shard}: no sample could be predicted ({len(skipped)} skipped, see above)")
    print(f"predict.py: wrote {written} prediction(s) to {out}"
          + (f"; skipped {len(skipped)} sample(s) of {args.shard}, listed above" if skipped else ""))
    return 0


def main(argv=None) -> int:
    try:
        return run(build_parser().parse_args(argv))
    except (UserError, PipelineError, OSError) as err:
        print(f"predict.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
