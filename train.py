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
previews/step-N.png, and .lock, which keeps a second run out while this one is alive. See
`python train.py --help` for every option.

Options, the run folder, every validation shard and the memory a step needs are checked before
the first step. SIGTERM (preemption) or SIGINT (Ctrl-C) stops every rank after the same step, also
while a step waits for data, with last.pt saved and the workers ended (continue with --resume);
a second signal 2 s or more after the first exits at once, without saving (training/signals.py).
A loader worker that dies (the OOM killer, SIGBUS on a full /dev/shm) is replaced where the epoch
stands, with the same batches; --stall-warn seconds without data name the worker and its read.
Exit status: 0 done; 2 bad input, or data that stopped coming (--worker-restarts deaths in a pass,
--data-timeout): one `train.py: error:` line, last.pt saved for the latter; 128 + the signal's
number when stopped by one: 143 for SIGTERM, 130 for SIGINT.
"""

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model import LossWeights, UNet, UNetConfig, count_parameters
from pipeline import PipelineError
from pipeline.errors import WaitStopped
from training import UserError, baselines, checkpoint, distributed, preflight, signals, valsources
from training.logger import RunLogger, Window, count_window, window_record
from training.options import LOSS_TERMS, parse_args
from training.run import Progress, Setup
from training.runfolder import claim_run_folder
from training.steps import amp_dtype_for, evaluate, make_optimizer, prepare_batch, train_step, warmup_cosine
from training.visual import save_preview


# --- setup: the data, and the checks that need it or the device ---------------------------
def open_data(args, ctx: distributed.Context, amp_dtype):
    """make_loader's arguments shared by every pass, the training URLs, their Pipeline and the
    validation Pipelines by source name (none without validation shards), checked on every rank before the first step.
    Their workers live for the whole run: epochs and validations reuse them."""
    loader_args = dict(batch_size=args.batch_size, workers=args.workers, image_size=args.image_size,
                       scaled_decode=args.scaled_decode, seed=args.seed,
                       storage_options=args.storage_options, retries=args.retries, cache_dir=args.cache_dir,
                       cache_limit=args.cache_limit, max_restarts=args.worker_restarts,
                       stall_warn=args.stall_warn, data_timeout=args.data_timeout,
                       pin_memory=ctx.device.type == "cuda")
    train_urls, train_data, val_urls, val_data = preflight.check_training(args, ctx, loader_args, amp_dtype)
    if ctx.is_main:
        tqdm.write(f"data: {len(train_urls)} training shards, {len(val_urls)} validation shards")
    return loader_args, train_urls, train_data, val_data


# --- model and optimizer ----------------------------------------------------------------
def build(args, ctx: distributed.Context, stop_request: signals.StopRequest) -> Setup:
    """The data, the model, its optimizer and schedule."""
    amp_dtype = amp_dtype_for(args.amp, ctx.device)
    loader_args, train_urls, train_data, val_data = open_data(args, ctx, amp_dtype)
    config = UNetConfig(width=args.width, difference_input=args.difference_input, task_heads=args.task_heads)
    torch.manual_seed(args.seed)  # the same initial weights on every rank and in every rerun
    # NHWC (channels_last) convolutions are faster with cuDNN and with oneDNN on the CPU too
    # (measured here on 2 cores: ~15% per step at 64 px, more at 224 px).
    model = UNet(config).to(ctx.device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, device=ctx.device)
    total_steps = args.steps or args.epochs * train_data.batches_per_epoch
    schedule_steps = args.schedule_steps or total_steps
    warmup = args.warmup_steps if args.warmup_steps is not None else min(1000, schedule_steps // 20)
    forward = model
    if ctx.world_size > 1:
        forward = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    setup = Setup(
        args=args, ctx=ctx, stop_request=stop_request, train_urls=train_urls, loader_args=loader_args,
        train_data=train_data, val_data=val_data, config=config, model=model,
        forward=torch.compile(forward) if args.compile else forward, optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(max(warmup, 1), schedule_steps)),
        scaler=torch.amp.GradScaler(ctx.device.type, enabled=amp_dtype == torch.float16),
        weights=LossWeights(**{term: getattr(args, f"w_{term}") for term in LOSS_TERMS}), amp_dtype=amp_dtype)
    setup.say(f"model: U-Net {config.to_dict()}, {count_parameters(model):,} parameters")
    return setup


# --- resume -------------------------------------------------------------------------------
def start_or_resume(setup: Setup) -> Progress:
    """Step 0, or where OUT/last.pt stopped (--resume)."""
    return checkpoint.resume(setup) if setup.args.resume else Progress()


# --- the loop -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Stop:
    """Why the run ends before its step budget: a signal (`signum`), or the time budget (0)."""

    signum: int


def stop_now(setup: Setup, started: float) -> Stop | None:
    """Once per step, the same answer on every rank: None to go on, else a Stop: the signal
    when any rank has been sent SIGTERM/SIGINT, or 0 when the time budget is spent. Under
    torchrun the ranks' flags are agreed a step late (a barrier every step would cost every
    rank the slowest one's time), so they all stop one step after the vote, the same step."""
    minutes = setup.args.minutes
    out_of_time = bool(minutes) and time.monotonic() - started > minutes * 60
    out_of_time, signum = distributed.all_max_a_step_late([out_of_time, setup.stop_request.signum])
    return Stop(int(signum)) if out_of_time or signum else None


def log_train(setup: Setup, progress: Progress, logger: RunLogger, window: Window, loader, terms, bar) -> None:
    """One metrics.jsonl line for the steps since the last one (all ranks take part), and the
    progress bar's figures; the next window starts."""
    totals = count_window(window, loader)
    progress.count_skipped(totals.skipped_this_epoch)
    record = window_record(window, totals, epoch=progress.epoch, terms=terms,
                           lr=setup.scheduler.get_last_lr()[0], skipped=progress.skipped)
    logger.log("train", progress.step, record)
    bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.1f}")
    window.restart()


def train_epoch(setup: Setup, progress: Progress, logger: RunLogger, window: Window, loader, bar: tqdm,
                started: float) -> Stop | None:
    """Train on `loader`'s batches until the epoch or the step budget ends, validating and
    saving on schedule. Returns stop_now's last answer: None, or why the run must stop now."""
    args, device, total_steps = setup.args, setup.ctx.device, setup.total_steps
    stop = None
    terms = None
    window.follow(loader)
    batches = iter(loader)
    while progress.step < total_steps and stop is None:
        waiting = time.perf_counter()
        batch = next(batches, None)
        window.data_wait += time.perf_counter() - waiting
        if batch is None:  # the epoch ran out (not a step limit): the next one starts from its top
            window.take_loader_stats(loader)
            progress.finish_epoch(skipped=distributed.all_sum([len(loader.skipped)])[0])
            return None
        x, mask, depth = prepare_batch(batch, device, channels_last=True, soft_mask=args.soft_mask)
        loss, step_terms = train_step(setup.forward, setup.optimizer, setup.scaler, x, mask, depth,
                                      weights=setup.weights, amp_dtype=setup.amp_dtype)
        terms = step_terms or terms  # an empty batch (spares ran out) has no loss terms to show
        setup.scheduler.step()
        progress.took_step(loader)
        window.loss += loss * x.shape[0]  # stays on the device: no sync until the next log line
        window.samples += x.shape[0]
        stop = stop_now(setup, started)
        last = progress.step == total_steps or stop is not None
        if progress.step % args.log_every == 0 or last:
            log_train(setup, progress, logger, window, loader, terms, bar)
        bar.update(1)
        # A signal's grace period (SLURM, Kubernetes: ~30 s) is for saving, not for a validation pass.
        improved = False
        if setup.val_data and (progress.step % args.val_every == 0 or last) and not (stop and stop.signum):
            improved = validate(setup, progress, logger)
        save_checkpoints(setup, progress, best=improved, last=progress.step % args.save_every == 0 or last)
    if stop and stop.signum:  # end the workers now, or `batches`' shutdown would wait for batches nobody wants
        signals.stop_workers()
    window.take_loader_stats(loader)
    return stop


def train(setup: Setup, progress: Progress, logger: RunLogger) -> int:
    """Epoch after epoch up to the step budget; returns the stop signal agreed on, or 0."""
    total_steps, steps_per_epoch = setup.total_steps, setup.steps_per_epoch
    setup.say(f"training to step {total_steps} ({steps_per_epoch} steps per epoch, batch {setup.args.batch_size} x "
              f"{setup.ctx.world_size} ranks) on {setup.ctx.device}, amp {setup.amp_dtype}")
    started, stop = time.monotonic(), None
    window = Window()  # from now: setup and resume are not in the first samples/s
    try:
        # Closed however the loop ends, so an error line does not land on the end of a progress bar.
        with tqdm(total=total_steps, initial=progress.step, unit="step", disable=not setup.ctx.is_main,
                  dynamic_ncols=True) as bar:
            while progress.step < total_steps and stop is None:
                # Epoch after epoch from the same workers, which make epoch e+1 while e ends, unless
                # the run ends in this pass.
                loader = setup.train_data.epoch(**progress.pass_start())
                if total_steps - progress.step <= len(loader):
                    loader = setup.train_data.epoch(**progress.pass_start(), chain=False)
                stop = train_epoch(setup, progress, logger, window, loader, bar, started)
        signum = stop.signum if stop else 0
        # --- final evaluation and checkpoint ---
        if setup.val_data and progress.last_validated != progress.step and not signum:
            save_checkpoints(setup, progress, best=validate(setup, progress, logger), last=False)
    except WaitStopped:  # a stop signal while waiting for data: the weights are the last finished step's
        save_checkpoints(setup, progress, best=False, last=True)
        signals.stop_workers()
        return setup.stop_request.signum
    except (UserError, PipelineError):  # data that stopped coming, a validation that failed: the
        save_checkpoints(setup, progress, best=False, last=True)  # steps since the last save are kept
        signals.stop_workers()  # a stalled (stopped) worker would outlast its pool's shutdown
        raise
    return signum


# --- evaluation ---------------------------------------------------------------------------
def validate(setup: Setup, progress: Progress, logger: RunLogger) -> bool:
    """Score the validation shards, log and preview the result; True when it is the best yet
    (the caller saves best.pt)."""
    device, step = setup.ctx.device, progress.step
    # At this process's first validation: what predicting without looking scores, judged in
    # the model's own pass.
    scorer = None
    if progress.last_validated < 0:
        scorer = baselines.Scorer(baselines.fit(setup.train_urls, setup.loader_args, device), device)
    results, preview = {}, None
    for name, data in setup.val_data.items():
        results[name], shown = evaluate(setup.model, data.epoch(0), device, amp_dtype=setup.amp_dtype,
                                        channels_last=True, weights=setup.weights, previews=setup.args.previews,
                                        also=scorer, flip_average=setup.args.flip_average)
        preview = shown if preview is None else preview
    result = valsources.total(results)
    if scorer is not None:
        scores = scorer.compute()
        logger.log("baseline", step, {"fit_samples": scorer.baselines.samples,
                                      "bgsub_threshold": scorer.baselines.threshold, **scores})
        setup.say(baselines.summary(scores, scorer.baselines, result))
    logger.log("val", step, {"epoch": progress.epoch, **result, **valsources.by_source(results)})
    setup.say(f"val @ step {step}: " + "; ".join(
        [", ".join(f"{k} {v:.4g}" for k, v in result.items())]
        + [f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items())
           for name, scores in results.items() if len(results) > 1]))
    if setup.ctx.is_main and preview is not None:
        save_preview(setup.out / "previews" / f"step-{step}.png", *preview)
    return progress.validated(result["loss"])


# --- checkpoint ---------------------------------------------------------------------------
def save_checkpoints(setup: Setup, progress: Progress, *, best: bool, last: bool) -> None:
    """best.pt and/or last.pt (rank 0), from one snapshot when both are due at this step."""
    if setup.ctx.is_main and (best or last):
        state = checkpoint.snapshot(setup, progress)
        for due, name in ((best, "best.pt"), (last, "last.pt")):
            if due:
                checkpoint.save(setup.out / name, state)


def report(setup: Setup, progress: Progress, signum: int) -> None:
    """How the run ended, on every rank under torchrun (a rank that fell behind is visible)."""
    ended = f"stopped by {signals.name(signum)}" if signum else "finished"
    if setup.ctx.world_size > 1:
        print(f"rank {setup.ctx.rank}/{setup.ctx.world_size}: {ended} at step {progress.step}", flush=True)
    if signum:
        setup.say(f"{ended} at step {progress.step}; {setup.out / 'last.pt'} saved: continue with --resume")
    else:
        setup.say(f"done at step {progress.step}; checkpoints in {setup.out}"
                  + ("" if setup.val_data else " (no validation shards: no best.pt)"))
    if progress.skipped:
        setup.say(f"skipped {progress.skipped} corrupt or incomplete samples (see the warnings above)")


def run(args, ctx: distributed.Context, stop_request: signals.StopRequest) -> int:
    """The whole run (OUT already claimed); returns the stop signal agreed on, or 0."""
    setup = build(args, ctx, stop_request)
    progress = start_or_resume(setup)
    if progress.step >= setup.total_steps:
        setup.say(f"nothing to do: {setup.out / 'last.pt'} is at step {progress.step} and the run asks for "
                  f"{setup.total_steps} steps")
        return 0
    logger = RunLogger(setup.out, enabled=ctx.is_main)
    signum = train(setup, progress, logger)
    logger.close()
    for data in (setup.train_data, *setup.val_data.values()):  # (an early exit leaves this to their garbage collection)
        data.close()
    report(setup, progress, signum)
    return signum


def main(argv=None) -> int:
    """Entry point; returns the exit status: 0, 2 with a one-line message for bad input, or
    128 + the signal number when SIGTERM/SIGINT stopped the run (last.pt saved)."""
    # From the start: a signal during setup is kept for the first step instead of killing the
    # process half way. Only the main rank announces it (every rank of a job gets it).
    with signals.StopRequest(announce=os.environ.get("RANK", "0") == "0") as stop_request:
        try:
            args = parse_args(argv)
            ctx = distributed.setup(args.device)
            try:
                with claim_run_folder(Path(args.out), resume=args.resume, ctx=ctx):
                    signum = run(args, ctx, stop_request)
            finally:
                distributed.teardown()
        except (UserError, PipelineError) as err:
            print(f"train.py: error: {err}", file=sys.stderr)
            return 2
    return signals.exit_status(signum) if signum else 0


if __name__ == "__main__":
    sys.exit(main())
