"""Train the mask + depth U-Net on WebDataset shards streamed from local disk or object storage.

One GPU, or the CPU (`--device cpu`):
    python train.py --shards 'shards/batch-{1..20}.tar' --out runs/exp1
Continue an interrupted run where it stopped (same --out; --steps may grow):
    python train.py --shards 'shards/batch-{1..20}.tar' --out runs/exp1 --resume
Several GPUs on one machine (DDP over NCCL; --batch-size is per GPU):
    torchrun --nproc_per_node=8 train.py --shards 's3://bucket/shards/batch-{1..20}.tar' --out runs/exp1
Several machines: run this on every node, K = 0..N-1, HOST0 = node 0's address; OUT must be on
storage that all nodes see if you want --resume (only rank 0 writes, every rank reads last.pt):
    torchrun --nnodes=N --nproc_per_node=8 --node_rank=K --master_addr=HOST0 --master_port=29500 \
        train.py --shards 's3://bucket/shards/batch-{1..20}.tar' --out /shared/runs/exp1
Several CPU processes (DDP over gloo), e.g. to test the distributed path without GPUs:
    torchrun --nproc_per_node=2 train.py --device cpu --shards 'shards/batch-{1..4}.tar' --out runs/cpu

The run folder gets last.pt / best.pt (checkpoints), metrics.jsonl, tensorboard/ and
previews/step-N.png. See `python train.py --help` for every option.
"""

import math
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model import LossWeights, UNet, UNetConfig, count_parameters
from pipeline import PipelineError, expand_urls, make_loader
from training import UserError, checkpoint, distributed
from training.logger import RunLogger, Window
from training.options import parse_args
from training.runfolder import find_val_shards, prepare_run_folder
from training.steps import evaluate, prepare_batch, train_step
from training.visual import save_preview


def warmup_cosine(warmup: int, total: int):
    """LR factor per step: linear warmup, then a cosine from 1 down to 0 at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(1, total - warmup), 1.0)
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def amp_dtype_for(choice: str, device: torch.device) -> torch.dtype | None:
    if choice == "auto":
        choice = "bf16" if device.type == "cuda" else "off"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[choice]


def train(args, ctx: distributed.Context) -> None:
    say = tqdm.write if ctx.is_main else (lambda *_: None)
    out = Path(args.out)
    prepare_run_folder(out, resume=args.resume, rank=ctx.rank)
    train_urls = expand_urls(args.shards, args.storage_options)
    loader_args = dict(batch_size=args.batch_size, workers=args.workers, image_size=args.image_size,
                       seed=args.seed, storage_options=args.storage_options, retries=args.retries,
                       pin_memory=ctx.device.type == "cuda")
    # Epoch 0's loader tells the epoch length (it raises when a rank gets no batch) and, unless
    # resuming elsewhere, is the one the loop runs: its manifest read and probe happen once.
    loader = make_loader(train_urls, train=True, epoch=0, **loader_args)
    steps_per_epoch = len(loader)
    val_urls = [] if args.no_val else find_val_shards(train_urls, args.val_shards, args.storage_options)
    say(f"data: {len(train_urls)} training shards, {len(val_urls)} validation shards")

    config = UNetConfig(width=args.width)
    torch.manual_seed(args.seed)  # the same initial weights on every rank and in every rerun
    # NHWC (channels_last) convolutions are faster with cuDNN and with oneDNN on the CPU too
    # (measured here on 2 cores: ~15% per step at 64 px, more at 224 px).
    model = UNet(config).to(ctx.device, memory_format=torch.channels_last)
    say(f"model: U-Net {config.to_dict()}, {count_parameters(model):,} parameters")
    weights = LossWeights(args.w_bce, args.w_dice, args.w_l1, args.w_ssim, args.w_grad)
    amp_dtype = amp_dtype_for(args.amp, ctx.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=amp_dtype == torch.float16)

    total_steps = args.steps or args.epochs * steps_per_epoch
    schedule_steps = args.schedule_steps or total_steps
    warmup = args.warmup_steps if args.warmup_steps is not None else min(1000, schedule_steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(max(warmup, 1), schedule_steps))

    loader_identity = dict(world_size=ctx.world_size, workers=args.workers, batch_size=args.batch_size,
                           image_size=args.image_size, seed=args.seed)
    step, epoch, batch_in_epoch, skipped_before, best_loss = 0, 0, 0, 0, math.inf
    if args.resume:
        state = checkpoint.load(out / "last.pt")
        checkpoint.check_same_model(state, config, out / "last.pt")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        checkpoint.restore_rng_states(state["rng"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        skipped_before, best_loss = state["skipped"], state["best_val_loss"]
        if state["loader"] != loader_identity:
            say(f"warning: resuming with different loader settings ({state['loader']} -> {loader_identity}); "
                f"the rest of epoch {epoch} may repeat or miss samples")
        say(f"resumed from {out / 'last.pt'} at step {step} (epoch {epoch}, batch {batch_in_epoch})")
        if (epoch, batch_in_epoch) != (0, 0):
            loader = None  # the loop builds the one that starts where the run stopped
        if step >= total_steps:
            say(f"nothing to do: {out / 'last.pt'} is at step {step} and the run asks for {total_steps} steps")
            return

    ddp = model
    if ctx.world_size > 1:
        ddp = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    forward = torch.compile(ddp) if args.compile else ddp
    logger = RunLogger(out, enabled=ctx.is_main)

    def snapshot() -> dict:
        at_epoch_end = batch_in_epoch >= epoch_len
        return {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "step": step, "epoch": epoch + at_epoch_end, "batch_in_epoch": 0 if at_epoch_end else batch_in_epoch,
            # Storage options may hold credentials: keep their names only.
            "args": {**vars(args), "storage_options": sorted(args.storage_options or {})},
            "model_config": config.to_dict(), "image_size": args.image_size, "loader": loader_identity,
            "rng": checkpoint.rng_states(), "skipped": skipped_before + skipped_this_epoch,
            "best_val_loss": best_loss,
        }

    def validate() -> None:
        nonlocal best_loss
        result, preview = evaluate(model, val_urls, loader_args, ctx.device, amp_dtype=amp_dtype,
                                   channels_last=True, weights=weights, previews=args.previews)
        logger.log("val", step, {"epoch": epoch, **result})
        say(f"val @ step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
        if ctx.is_main and preview is not None:
            save_preview(out / "previews" / f"step-{step}.png", *preview)
        if result["loss"] < best_loss:
            best_loss = result["loss"]
            if ctx.is_main:
                checkpoint.save(out / "best.pt", snapshot())

    say(f"training to step {total_steps} ({steps_per_epoch} steps per epoch, batch {args.batch_size} x "
        f"{ctx.world_size} ranks) on {ctx.device}, amp {amp_dtype}")
    bar = tqdm(total=total_steps, initial=step, unit="step", disable=not ctx.is_main, dynamic_ncols=True)
    started = time.monotonic()
    window = Window()
    last_validated, stop = -1, False
    while step < total_steps and not stop:
        if loader is None:
            loader = make_loader(train_urls, train=True, epoch=epoch, start_batch=batch_in_epoch, **loader_args)
        epoch_len, skipped_this_epoch = len(loader) + batch_in_epoch, 0
        batches = iter(loader)
        while step < total_steps and not stop:
            waiting = time.perf_counter()
            batch = next(batches, None)
            window.data_wait += time.perf_counter() - waiting
            if batch is None:
                break
            x, mask, depth = prepare_batch(batch, ctx.device, channels_last=True)
            loss, terms = train_step(forward, optimizer, scaler, x, mask, depth, weights=weights, amp_dtype=amp_dtype)
            scheduler.step()
            step, batch_in_epoch = step + 1, batch_in_epoch + 1
            window.loss += loss  # stays on the device: no sync until the next log line
            window.steps, window.samples = window.steps + 1, window.samples + x.shape[0]
            if args.minutes:
                stop = distributed.any_rank(time.monotonic() - started > args.minutes * 60, ctx.device)

            if step % args.log_every == 0 or step == total_steps or stop:
                loss_sum, samples, skipped_this_epoch = distributed.all_sum(
                    [float(window.loss), window.samples, len(loader.skipped)], ctx.device)
                seconds = window.seconds()
                record = {"epoch": epoch, "loss": loss_sum / ctx.world_size / window.steps,
                          **{k: float(v) for k, v in terms.items()}, "lr": scheduler.get_last_lr()[0],
                          "samples_per_s": samples / seconds, "data_wait": window.data_wait / seconds,
                          "skipped": int(skipped_before + skipped_this_epoch)}
                logger.log("train", step, record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.1f}")
                window = Window()
            bar.update(1)
            if val_urls and (step % args.val_every == 0 or step == total_steps or stop):
                validate()
                last_validated = step
            if ctx.is_main and (step % args.save_every == 0 or step == total_steps or stop):
                checkpoint.save(out / "last.pt", snapshot())
        if batch is None:  # the epoch ran out (not a step limit): the next one starts from its top
            skipped_before += distributed.all_sum([len(loader.skipped)], ctx.device)[0]
            skipped_this_epoch = 0
            epoch, batch_in_epoch, loader = epoch + 1, 0, None
    bar.close()
    if val_urls and last_validated != step:
        validate()
    logger.close()
    if ctx.world_size > 1:  # every rank reports, so a rank that fell behind is visible
        print(f"rank {ctx.rank}/{ctx.world_size}: finished at step {step}", flush=True)
    say(f"done at step {step}; checkpoints in {out}" + ("" if val_urls else " (no validation shards: no best.pt)"))
    skipped = int(skipped_before + skipped_this_epoch)
    if skipped:
        say(f"skipped {skipped} corrupt or incomplete samples (see the warnings above)")


def main(argv=None) -> int:
    """Entry point; returns the exit status (2 with a one-line message for bad input)."""
    try:
        args = parse_args(argv)
        ctx = distributed.setup(args.device)
        try:
            train(args, ctx)
        finally:
            distributed.teardown()
    except (UserError, PipelineError) as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
