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
the first step. SIGTERM (preemption) or SIGINT (Ctrl-C) stops every rank after the same step,
with last.pt saved and the workers ended (continue with --resume); a second signal 2 s or more
after the first exits at once, without saving (training/signals.py).
Exit status: 0 done; 2 bad input (one `train.py: error:` line); 128 + the signal number when
stopped by one: 143 for SIGTERM, 130 for SIGINT.
"""

import os
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model import LossWeights, UNet, UNetConfig, count_parameters
from pipeline import PipelineError
from training import UserError, baselines, checkpoint, distributed, preflight, signals
from training.logger import RunLogger, Window, log_window
from training.options import LOSS_TERMS, parse_args
from training.run import Run
from training.runfolder import claim_run_folder
from training.steps import amp_dtype_for, evaluate, prepare_batch, train_step, warmup_cosine
from training.visual import save_preview


def validate(run: Run) -> bool:
    """Score the validation shards, log and preview the result; True when it is the best yet
    (the caller saves best.pt)."""
    # Once per run: what predicting without looking scores, judged in the model's own pass.
    scorer = None
    if not run.baselines_logged:
        scorer = baselines.Scorer(baselines.fit(run.train_urls, run.loader_args, run.ctx.device), run.ctx.device)
    result, preview = evaluate(run.model, run.val_data.epoch(0), run.ctx.device, amp_dtype=run.amp_dtype,
                               channels_last=True, weights=run.weights, previews=run.args.previews, also=scorer)
    if scorer is not None:
        scores = scorer.compute()
        run.logger.log("baseline", run.step, {"fit_samples": scorer.baselines.samples, **scores})
        run.say(baselines.summary(scores, scorer.baselines.samples, result["rmse"]))
        run.baselines_logged = True
    run.logger.log("val", run.step, {"epoch": run.epoch, **result})
    run.say(f"val @ step {run.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
    if run.ctx.is_main and preview is not None:
        save_preview(run.out / "previews" / f"step-{run.step}.png", *preview)
    run.last_validated = run.step
    improved = result["loss"] < run.best_loss
    run.best_loss = min(run.best_loss, result["loss"])
    return improved


def save_checkpoints(run: Run, *, best: bool, last: bool) -> None:
    """best.pt and/or last.pt (rank 0), from one snapshot when both are due at this step."""
    if run.ctx.is_main and (best or last):
        state = checkpoint.snapshot(run)
        for due, name in ((best, "best.pt"), (last, "last.pt")):
            if due:
                checkpoint.save(run.out / name, state)


def stop_now(run: Run, started: float) -> bool:
    """Once per step, the same answer on every rank: is the time budget spent, or has any rank
    been sent SIGTERM/SIGINT (then run.signum says which)?"""
    out_of_time = bool(run.args.minutes) and time.monotonic() - started > run.args.minutes * 60
    out_of_time, signum = distributed.all_max([out_of_time, run.stop_request.signum])
    run.signum = int(signum)
    return bool(out_of_time or signum)


def train_epoch(run: Run, loader, bar: tqdm, started: float) -> bool:
    """Train on `loader`'s batches until the epoch or the step budget ends, validating and
    saving on schedule. Returns True when the run must stop (time budget spent, or a signal)."""
    args, ctx = run.args, run.ctx
    run.skipped_this_epoch = 0
    stop = exhausted = False
    terms = None
    run.window.follow(loader)
    batches = iter(loader)
    while run.step < run.total_steps and not stop:
        waiting = time.perf_counter()
        batch = next(batches, None)
        run.window.data_wait += time.perf_counter() - waiting
        if batch is None:
            exhausted = True
            break
        x, mask, depth = prepare_batch(batch, ctx.device, channels_last=True)
        loss, step_terms = train_step(run.forward, run.optimizer, run.scaler, x, mask, depth,
                                      weights=run.weights, amp_dtype=run.amp_dtype)
        terms = step_terms or terms  # an empty batch (spares ran out) has no loss terms to show
        run.scheduler.step()
        run.step, run.batch_in_epoch = run.step + 1, run.batch_in_epoch + 1
        run.window.loss += loss * x.shape[0]  # stays on the device: no sync until the next log line
        run.window.samples += x.shape[0]
        stop = stop_now(run, started)
        last = run.step == run.total_steps or stop
        if run.step % args.log_every == 0 or last:
            log_window(run, loader, terms, bar)
        bar.update(1)
        # A signal's grace period (SLURM, Kubernetes: ~30 s) is for saving, not for a validation pass.
        improved = False
        if run.val_data and (run.step % args.val_every == 0 or last) and not run.signum:
            try:
                improved = validate(run)
            except (UserError, PipelineError):  # the steps since the last save are not lost with it
                save_checkpoints(run, best=False, last=True)
                raise
        save_checkpoints(run, best=improved, last=run.step % args.save_every == 0 or last)
    if run.signum:  # now, before `batches` goes: its shutdown would wait for batches nobody wants
        signals.stop_workers()
    run.window.take_loader_stats(loader)
    if exhausted:  # the epoch ran out (not a step limit): the next one starts from its top
        run.skipped_before += distributed.all_sum([len(loader.skipped)])[0]
        run.skipped_this_epoch = 0
        run.epoch, run.batch_in_epoch = run.epoch + 1, 0
    return stop


def train(args, ctx: distributed.Context, stop_request: signals.StopRequest) -> int:
    """The whole run (OUT already claimed); returns the stop signal agreed on, or 0."""
    # --- setup: data, and the checks that need it or the device --------------------------
    out = Path(args.out)
    loader_args = dict(batch_size=args.batch_size, workers=args.workers, image_size=args.image_size,
                       seed=args.seed, storage_options=args.storage_options, retries=args.retries,
                       cache_dir=args.cache_dir, pin_memory=ctx.device.type == "cuda")
    amp_dtype = amp_dtype_for(args.amp, ctx.device)
    # Their workers live for the whole run: epochs and validations reuse them.
    train_urls, train_data, val_urls, val_data = preflight.check_training(args, ctx, loader_args, amp_dtype)
    steps_per_epoch = train_data.batches_per_epoch
    if ctx.is_main:
        tqdm.write(f"data: {len(train_urls)} training shards, {len(val_urls)} validation shards")

    # --- model and optimizer -------------------------------------------------------------
    config = UNetConfig(width=args.width)
    torch.manual_seed(args.seed)  # the same initial weights on every rank and in every rerun
    # NHWC (channels_last) convolutions are faster with cuDNN and with oneDNN on the CPU too
    # (measured here on 2 cores: ~15% per step at 64 px, more at 224 px).
    model = UNet(config).to(ctx.device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    total_steps = args.steps or args.epochs * steps_per_epoch
    schedule_steps = args.schedule_steps or total_steps
    warmup = args.warmup_steps if args.warmup_steps is not None else min(1000, schedule_steps // 20)
    forward = model
    if ctx.world_size > 1:
        forward = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    run = Run(args=args, ctx=ctx, stop_request=stop_request, out=out, train_urls=train_urls, loader_args=loader_args,
              train_data=train_data, val_data=val_data,
              loader_identity=dict(world_size=ctx.world_size, workers=args.workers, batch_size=args.batch_size,
                                   image_size=args.image_size, seed=args.seed),
              config=config, model=model, forward=torch.compile(forward) if args.compile else forward,
              optimizer=optimizer,
              scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(max(warmup, 1), schedule_steps)),
              scaler=torch.amp.GradScaler(ctx.device.type, enabled=amp_dtype == torch.float16),
              weights=LossWeights(**{term: getattr(args, f"w_{term}") for term in LOSS_TERMS}),
              amp_dtype=amp_dtype, total_steps=total_steps)
    run.say(f"model: U-Net {config.to_dict()}, {count_parameters(model):,} parameters")

    # --- resume ----------------------------------------------------------------------------
    if args.resume:
        checkpoint.resume(run)
        if run.step >= total_steps:
            run.say(f"nothing to do: {out / 'last.pt'} is at step {run.step} and the run asks for {total_steps} steps")
            return 0

    # --- the loop ------------------------------------------------------------------------
    run.logger = RunLogger(out, enabled=ctx.is_main)
    run.say(f"training to step {total_steps} ({steps_per_epoch} steps per epoch, batch {args.batch_size} x "
            f"{ctx.world_size} ranks) on {ctx.device}, amp {amp_dtype}")
    started, stop = time.monotonic(), False
    run.window = Window()  # from now: setup and resume are not in the first samples/s
    # Closed however the loop ends, so an error line does not land on the end of a progress bar.
    with tqdm(total=total_steps, initial=run.step, unit="step", disable=not ctx.is_main, dynamic_ncols=True) as bar:
        while run.step < total_steps and not stop:
            # Epoch after epoch from the same workers, which make epoch e+1 while e ends.
            this_pass = steps_per_epoch - run.batch_in_epoch
            loader = train_data.epoch(run.epoch, start_batch=run.batch_in_epoch,
                                      chain=total_steps - run.step > this_pass)
            stop = train_epoch(run, loader, bar, started)

    # --- final evaluation and checkpoint ---------------------------------------------------
    if val_data and run.last_validated != run.step and not run.signum:
        save_checkpoints(run, best=validate(run), last=False)
    run.logger.close()
    for data in (train_data, val_data):  # (an early exit leaves this to their garbage collection)
        if data is not None:
            data.close()
    ended = f"stopped by {signals.name(run.signum)}" if run.signum else "finished"
    if ctx.world_size > 1:  # every rank reports, so a rank that fell behind is visible
        print(f"rank {ctx.rank}/{ctx.world_size}: {ended} at step {run.step}", flush=True)
    if run.signum:
        run.say(f"{ended} at step {run.step}; {out / 'last.pt'} saved: continue with --resume")
    else:
        run.say(f"done at step {run.step}; checkpoints in {out}"
                + ("" if val_urls else " (no validation shards: no best.pt)"))
    skipped = int(run.skipped_before + run.skipped_this_epoch)
    if skipped:
        run.say(f"skipped {skipped} corrupt or incomplete samples (see the warnings above)")
    return run.signum


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
                    signum = train(args, ctx, stop_request)
            finally:
                distributed.teardown()
        except (UserError, PipelineError) as err:
            print(f"train.py: error: {err}", file=sys.stderr)
            return 2
    return signals.exit_status(signum) if signum else 0


if __name__ == "__main__":
    sys.exit(main())
