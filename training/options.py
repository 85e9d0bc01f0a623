"""train.py's command line, grouped by topic, and the checks that need no data."""

import argparse
import math
import os

import torch

from model import LossWeights, UNetConfig, check_image_size
from pipeline.cachelimit import parse_size
from pipeline.clients import storage_option

from . import UserError
from .signals import DUPLICATE_WINDOW


def number(kind, *, least=None, above=None, below=None):
    """An argparse type: a finite `kind` (int or float) with least <= value, above < value and
    value < below. argparse names the option in its message: "argument --lr: must be > 0, got nan"."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if least is not None and value < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, got {text}")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"must be > {above}, got {text}")
        if below is not None and value >= below:
            raise argparse.ArgumentTypeError(f"must be < {below}, got {text}")
        return value

    return parse


def weights(text: str) -> list[float]:
    """An argparse type: comma-separated finite weights >= 0 (0.7,0.3), not all 0."""
    parse = number(float, least=0)
    values = [parse(part) for part in text.split(",")]
    if not any(values):
        raise argparse.ArgumentTypeError(f"the weights add up to 0: {text}")
    return values


def size(text: str) -> int:
    """An argparse type: a size in bytes, 50GB or 512MiB style (pipeline.cachelimit.parse_size), at least 1."""
    try:
        value = parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text}")
    return value


POSITIVE_INT, COUNT = number(int, least=1), number(int, least=0)
LOSS_TERMS = tuple(LossWeights().to_dict())  # --w-TERM
MAX_RETRIES = 20  # the wait doubles after each failure: 20 retries already wait up to 6 days


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a UserError (one line, exit status 2 in main) instead of
    the usage text plus a line: a bad value is then reported like every other bad input."""

    def error(self, message: str):
        raise UserError(message)


def check_device(choice: str) -> None:
    """--device cuda needs a CUDA device (auto falls back to the CPU)."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (use --device cpu or auto)")


def uses_cuda(choice: str) -> bool:
    """Whether --device `choice` (auto, cpu, cuda) runs on CUDA here."""
    return choice == "cuda" or (choice == "auto" and torch.cuda.is_available())


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show a default only where it says something (not None/False/[], not already in the help)."""

    def _get_help_string(self, action):
        quiet = action.default is None or action.default is False or action.default == []
        if quiet or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="train.py",
        description="Train the mask + depth U-Net on WebDataset shards streamed by pipeline.make_loader.",
        epilog="examples:\n"
        "  python train.py --shards 'shards/batch-{1..20}.tar' --out runs/exp1\n"
        "  python train.py --shards 'shards/batch-{1..20}.tar' --out runs/exp1 --resume --steps 20000\n"
        "  torchrun --nproc_per_node=8 train.py --shards 's3://bucket/shards/batch-{1..20}.tar' --out runs/exp1\n"
        "  (multi-node: torchrun --nnodes=N --node_rank=K --master_addr=HOST0 --master_port=29500 ...)\n\n"
        "exit status: 0 done; 2 bad input (one 'train.py: error:' line, checked before the first step), or\n"
        "  data that stopped coming (workers that keep dying, --data-timeout): one line, last.pt saved;\n"
        "  143 (SIGTERM) or 130 (SIGINT): stopped by the signal after the current step, last.pt saved,\n"
        f"  continue with --resume; a second signal {DUPLICATE_WINDOW:g} s or more after the first exits at once,\n"
        "  without saving, with the same status",
        formatter_class=_HelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--shards", required=True, action="append",
                      help="training shards: brace pattern, glob or fsspec URL; repeat it for a mixture of sources")
    data.add_argument("--weights", type=weights,
                      help="a mixture's weights, one per --shards (0.7,0.3): each epoch takes that share of its "
                      "samples from each source (default: each source in proportion to its size)")
    data.add_argument("--samples-per-epoch", type=POSITIVE_INT,
                      help="a mixture's epoch size (default: the sources' total)")
    data.add_argument("--val-shards", action="append",
                      help="validation shards, repeatable: each a source scored on its own beside the total "
                      "(default: the val-*.tar beside each --shards, from their manifest or a glob)")
    data.add_argument("--no-val", action="store_true", help="do not validate even if val shards exist")
    data.add_argument("--batch-size", type=POSITIVE_INT, default=32, help="samples per batch on each rank")
    data.add_argument("--workers", type=COUNT, default=min(4, os.cpu_count() or 1), help="loader processes per rank")
    data.add_argument("--image-size", type=POSITIVE_INT, default=224,
                      help="square training size (multiple of 32; checked against the device's memory)")
    data.add_argument("--no-scaled-decode", dest="scaled_decode", action="store_false",
                      help="decode every JPEG at full size, also when --image-size is at most half of it "
                      "(by default libjpeg decodes it at 1/2, 1/4 or 1/8 first: same result within JPEG noise)")
    data.add_argument("--retries", type=number(int, least=0, below=MAX_RETRIES + 1), default=5,
                      help=f"retries of a failing shard read (backoff 1, 2, 4... s; at most {MAX_RETRIES})")
    data.add_argument("--cache-dir", help="keep remote shards in this local folder (checked against the manifest's "
                      "sha256) for later epochs and runs; the ranks of one machine may share it")
    data.add_argument("--cache-limit", type=size,
                      help="bytes --cache-dir may hold, e.g. 50GB, 1.5TB, 500MB (decimal) or 512MiB (binary); "
                      "the least recently used shard no process reads is evicted to make room")
    data.add_argument("--worker-restarts", type=COUNT, default=3,
                      help="loader worker deaths (OOM killer, SIGBUS on a full /dev/shm, a crash) a pass survives, "
                      "each restarting the workers where it stands; the next ends the run (status 2, last.pt saved)")
    data.add_argument("--stall-warn", type=number(float, above=0), default=60.0,
                      help="seconds without a batch before a line names the loader worker, what it reads and does "
                      "(again at each doubling of the wait)")
    data.add_argument("--data-timeout", type=number(float, above=0),
                      help="seconds without a batch that end the run (status 2, last.pt saved); default: wait")
    data.add_argument(
        "--storage-option",
        dest="storage_options",
        action="append",
        type=storage_option,
        default=[],
        metavar="KEY=VALUE",
        help="fsspec option for remote shards, repeatable; VALUE may be JSON, "
        'e.g. anon=true or client_kwargs=\'{"endpoint_url": "http://127.0.0.1:9000"}\'',
    )

    model = parser.add_argument_group("model and loss")
    model.add_argument("--width", type=POSITIVE_INT, default=UNetConfig.width, help="U-Net base channels")
    model.add_argument("--difference-input", action="store_true",
                       help="also feed |bgfg - bg| to the network (3 more input channels)")
    model.add_argument("--soft-mask", action="store_true",
                       help="resample the mask of a training crop bilinearly (outline pixels 0..1, as the images') "
                       "instead of by nearest neighbour")
    model.add_argument("--task-heads", action="store_true",
                       help="give the mask and depth heads a 3x3 convolution each (features of their own)")
    for term, default in LossWeights().to_dict().items():
        model.add_argument(f"--w-{term}", type=number(float, least=0), default=default,
                           help=f"weight of the {term} loss term (>= 0)")

    schedule = parser.add_argument_group("schedule")
    length = schedule.add_mutually_exclusive_group()
    length.add_argument("--steps", type=POSITIVE_INT, help="optimizer steps in total (counting resumed ones)")
    length.add_argument("--epochs", type=POSITIVE_INT, help="passes over the training shards (default 5)")
    schedule.add_argument("--minutes", type=number(float, above=0), help="also stop after this much wall time")
    # 3e-3 and 0.05 won in bench/quality.py (held-out backgrounds; README, "Model quality").
    schedule.add_argument("--lr", type=number(float, above=0), default=3e-3, help="peak AdamW learning rate")
    schedule.add_argument("--weight-decay", type=number(float, least=0), default=0.05, help="AdamW weight decay")
    schedule.add_argument("--warmup-steps", type=COUNT, help="linear warmup (default: 5%% of the schedule, <= 1000)")
    schedule.add_argument(
        "--schedule-steps",
        type=POSITIVE_INT,
        help="length of the warmup + cosine schedule (default: the run's total steps); "
        "set it when you plan to stop early and resume with a larger --steps",
    )

    system = parser.add_argument_group("system")
    system.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto = CUDA when available (under torchrun: the GPU of LOCAL_RANK)")
    system.add_argument(
        "--amp",
        choices=("auto", "bf16", "fp16", "off"),
        default="auto",
        help="autocast dtype: auto = bf16 on CUDA, off on the CPU",
    )
    system.add_argument("--compile", action="store_true", help="torch.compile the model")

    output = parser.add_argument_group("output")
    output.add_argument("--out", default="runs/latest", help="run folder (checkpoints, metrics, previews)")
    output.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    output.add_argument("--val-every", type=POSITIVE_INT, default=1000, help="validate every N steps (and at the end)")
    output.add_argument("--flip-average", action="store_true",
                        help="validate on predictions averaged with those of the mirrored input "
                        "(test-time mirroring; twice the validation's cost)")
    output.add_argument("--save-every", type=POSITIVE_INT, default=1000, help="write OUT/last.pt every N steps")
    output.add_argument("--log-every", type=POSITIVE_INT, default=20, help="metrics.jsonl line every N steps")
    output.add_argument("--previews", type=COUNT, default=4, help="validation samples per preview PNG")
    output.add_argument("--seed", type=number(int, least=0, below=2**63), default=0,
                        help="seeds the weights, shuffling and augmentation")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check what can be checked before touching data or devices."""
    args = build_parser().parse_args(argv)
    args.storage_options = dict(args.storage_options) or None
    try:
        check_image_size(args.image_size, UNetConfig(width=args.width))
    except ValueError as err:
        raise UserError(f"--image-size: {err}") from None
    if not any(getattr(args, f"w_{term}") for term in LOSS_TERMS):
        raise UserError("--w-" + "/--w-".join(LOSS_TERMS) + ": all loss weights are 0, nothing would be learned")
    check_device(args.device)
    if args.weights is not None and len(args.weights) != len(args.shards):
        raise UserError(f"--weights: {len(args.weights)} weights for {len(args.shards)} --shards sources")
    if args.samples_per_epoch is not None and args.weights is None:
        raise UserError("--samples-per-epoch: needs --weights (a mixture)")
    if args.cache_limit is not None and args.cache_dir is None:
        raise UserError("--cache-limit: needs --cache-dir, the folder it bounds")
    if args.steps is None and args.epochs is None:
        args.epochs = 5
    return args
