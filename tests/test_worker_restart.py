"""Loader workers that die or stall, for real: SIGKILL, SIGSTOP and a full /dev/shm, sent to the
worker processes of a Pipeline and of train.py runs (alone and under torchrun)."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from helpers import (ROOT, TINY, TORCHRUN, assert_same_checkpoint_weights, assert_same_weights, checkpoint_step,
                     run_train, tiny, wait_for)
from pipeline import Pipeline
from test_signals import SCHEDULE, Job, processes_left, stalling_server, start_train, tagged_processes

STEPS = ["--steps", "12", "--workers", "2"]  # 4 steps per epoch at batch 4: three epochs


def children(pid: int) -> list[int]:
    """The live child processes of `pid`, oldest first."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:  # the thread ended meanwhile
            continue
    return sorted(found)


def records(out: Path, kind: str) -> list[dict]:
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [record for record in map(json.loads, lines) if record["kind"] == kind]


def logged_steps(out: Path) -> int:
    """The last step of metrics.jsonl (--log-every 1), 0 before the first."""
    train = records(out, "train")
    return train[-1]["step"] if train else 0


def restart_lines(stderr: str) -> list[str]:
    return re.findall(r"loader: worker \d \(pid \d+\) was killed by \w+.*restarting the workers.*", stderr)


def assert_finished_after_one_restart(job, status: int, pid: int) -> None:
    """The run ended well, having said one restart line, for the SIGKILL of worker `pid`."""
    stderr = job.stderr.read_text()
    assert status == 0, stderr[-3000:]
    lines = restart_lines(stderr)
    assert len(lines) == 1 and f"(pid {pid}) was killed by SIGKILL" in lines[0], stderr[-3000:]


def batches_of(pipeline: Pipeline, epochs: int, kill_at=None) -> list:
    """Every batch of `epochs` passes as (keys, pixels, draws); at (epoch, batch) `kill_at`, worker 1
    is sent SIGKILL."""
    seen = []
    for epoch in range(epochs):
        for number, batch in enumerate(pipeline.epoch(epoch)):
            seen.append((list(batch["key"]), [batch[name].clone() for name in ("bg", "bgfg", "mask", "depth")],
                         batch["aug"].clone() if "aug" in batch else None))
            if (epoch, number) == kill_at:
                os.kill(pipeline._pool.heartbeats.pid(1), signal.SIGKILL)
    return seen


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_a_worker_killed_mid_pass_is_replaced_and_the_batches_are_those_of_an_uninterrupted_run(train, shard_dir,
                                                                                              caplog):
    options = dict(batch_size=2, workers=2, image_size=64, train=train)
    with Pipeline(f"{shard_dir}/batch-{{1..2}}.tar", **options) as whole:
        expected = batches_of(whole, 3)
    with Pipeline(f"{shard_dir}/batch-{{1..2}}.tar", **options) as interrupted:
        started = time.monotonic()
        got = batches_of(interrupted, 3, kill_at=(1, 1))
        took = time.monotonic() - started
        pids = [interrupted._pool.heartbeats.pid(worker) for worker in (0, 1)]
    assert [keys for keys, _, _ in got] == [keys for keys, _, _ in expected]
    for (_, images, draws), (_, want_images, want_draws) in zip(got, expected):
        for image, want in zip(images, want_images):
            assert torch.equal(image, want)
        assert (draws is None and want_draws is None) or torch.equal(draws, want_draws)
    lines = [r.getMessage() for r in caplog.records if "restarting the workers" in r.getMessage()]
    assert len(lines) == 1 and "worker 1 " in lines[0] and "SIGKILL" in lines[0] and "batch-" in lines[0], lines
    assert None not in pids and took < 60


def test_a_worker_killed_mid_epoch_under_train_py_is_restarted_and_the_weights_are_an_uninterrupted_runs(
        shard_dir, tmp_path):
    out = tmp_path / "run"
    with start_train(shard_dir, out, tmp_path / "logs", *STEPS, "--no-val") as job:
        wait_for(lambda: logged_steps(out) >= 3, "three steps")
        workers = children(job.process.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        status = job.wait()
    assert_finished_after_one_restart(job, status, workers[1])
    assert sum(r["worker_restarts"] for r in records(out, "train")) == 1
    assert run_train(shard_dir, tmp_path / "whole", *STEPS, "--no-val") == 0
    assert_same_checkpoint_weights(tmp_path / "whole" / "last.pt", out / "last.pt")


def test_a_validation_worker_killed_between_passes_is_restarted_and_validation_scores_the_same(shard_dir, tmp_path):
    out, schedule = tmp_path / "run", [*STEPS, "--val-every", "4"]
    with start_train(shard_dir, out, tmp_path / "logs", *schedule) as job:
        wait_for(lambda: logged_steps(out) >= 1, "the first step")
        training = children(job.process.pid)
        wait_for(lambda: records(out, "val"), "the first validation")
        validation = sorted(set(children(job.process.pid)) - set(training))
        assert len(training) == len(validation) == 2
        os.kill(validation[0], signal.SIGKILL)
        status = job.wait()
    assert_finished_after_one_restart(job, status, validation[0])
    assert run_train(shard_dir, tmp_path / "whole", *schedule) == 0
    assert records(out, "val") and [{k: v for k, v in r.items() if k != "time"} for r in records(out, "val")] == \
        [{k: v for k, v in r.items() if k != "time"} for r in records(tmp_path / "whole", "val")]
    assert_same_checkpoint_weights(tmp_path / "whole" / "last.pt", out / "last.pt")


def _rank_process(tag: str, rank: int) -> int | None:
    for pid in tagged_processes(tag):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"ddp_probe.py" in cmdline and children(pid):
            return pid
    return None


def test_under_torchrun_a_worker_of_rank_1_killed_mid_epoch_is_restarted_and_both_ranks_train_as_uninterrupted(
        shard_dir, tmp_path):
    def command(report: Path, out: Path) -> list:
        return [TORCHRUN, "--standalone", "--nproc_per_node=2", str(ROOT / "tests" / "ddp_probe.py"), str(report),
                "--shards", f"{shard_dir}/batch-{{1..2}}.tar", "--out", str(out), *tiny(batch_size=2, workers=2),
                "--steps", "12", "--no-val"]

    (tmp_path / "killed").mkdir()
    with Job(command(tmp_path / "killed", tmp_path / "killed" / "run"), tmp_path / "logs") as job:
        wait_for(lambda: logged_steps(tmp_path / "killed" / "run") >= 3, "three steps")
        rank_1 = wait_for(lambda: _rank_process(job.tag, 1), "rank 1's process")
        victim = children(rank_1)[0]
        os.kill(victim, signal.SIGKILL)
        status = job.wait(timeout=240)
    output = job.stdout.read_text() + job.stderr.read_text()
    assert status == 0, output[-3000:]
    lines = restart_lines(output)
    assert len(lines) == 1 and f"(pid {victim}) was killed by SIGKILL" in lines[0], output[-3000:]
    (tmp_path / "whole").mkdir()
    done = subprocess.run(command(tmp_path / "whole", tmp_path / "whole" / "run"), capture_output=True, text=True,
                          timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        killed, whole = (torch.load(tmp_path / run / f"rank-{rank}.pt", weights_only=False) for run in ("killed", "whole"))
        assert killed["batches"] == whole["batches"] and len(whole["batches"]) == 12
        assert_same_weights(whole["parameters"], killed["parameters"])


def _kill_every_worker(pid: int, done: threading.Event, killed: list) -> None:
    while not done.is_set():
        try:
            workers = children(pid)
        except OSError:  # the run is over
            return
        for worker in workers:
            if worker not in killed:
                killed.append(worker)
                os.kill(worker, signal.SIGKILL)
        time.sleep(0.01)  # a polling interval, not a synchronisation: each new worker is met as it starts


def test_workers_killed_each_time_they_start_end_the_run_with_one_line_last_pt_and_an_exact_resume(shard_dir,
                                                                                                   tmp_path):
    out = tmp_path / "run"
    with start_train(shard_dir, out, tmp_path / "logs", "--steps", "10000", "--workers", "2", "--no-val") as job:
        wait_for(lambda: logged_steps(out) >= 2, "two steps")
        done, killed = threading.Event(), []
        killer = threading.Thread(target=_kill_every_worker, args=(job.process.pid, done, killed))
        started = time.monotonic()
        killer.start()
        try:
            status = job.wait(timeout=60)
        finally:
            done.set()
            killer.join()
        took = time.monotonic() - started
    stderr = job.stderr.read_text()
    errors = [line for line in stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert status == 2 and len(errors) == 1, stderr[-3000:]
    assert errors[0].startswith("train.py: error: loader worker ") and "killed by SIGKILL" in errors[0]
    assert "more than the 3 restarts allowed; likely cause: out of memory" in errors[0]
    assert len(restart_lines(stderr)) == 3 and took < 30
    step = checkpoint_step(out / "last.pt")
    assert step == logged_steps(out) >= 2
    assert run_train(shard_dir, out, "--steps", str(step + 2), "--schedule-steps", "10000", "--workers", "2",
                     "--no-val", "--resume") == 0
    assert run_train(shard_dir, tmp_path / "whole", "--steps", str(step + 2), "--schedule-steps", "10000",
                     "--workers", "2", "--no-val") == 0
    assert_same_checkpoint_weights(tmp_path / "whole" / "last.pt", out / "last.pt")


def _stall_lines(stderr: str, pid: int) -> list[str]:
    return [line for line in stderr.splitlines() if "loader: no batch for" in line and f"(pid {pid})" in line]


def test_a_stopped_worker_is_reported_after_stall_warn_and_training_goes_on_once_it_continues(shard_dir, tmp_path):
    # Long enough that worker 1 cannot have made all its batches before it is stopped: the
    # main process puts aside the records that come early, so a worker may run far ahead of
    # training (12 steps were, once, all made before the test's SIGSTOP on a loaded host).
    out, steps = tmp_path / "run", 60
    with start_train(shard_dir, out, tmp_path / "logs", "--steps", str(steps), "--workers", "2", "--no-val",
                     "--stall-warn", "1") as job:
        wait_for(lambda: logged_steps(out) >= 2, "two steps")
        worker = children(job.process.pid)[1]
        os.kill(worker, signal.SIGSTOP)
        try:
            wait_for(lambda: len(_stall_lines(job.stderr.read_text(), worker)) >= 2, "two stall lines", log=job.stderr)
        finally:
            os.kill(worker, signal.SIGCONT)
        status = job.wait()
    stderr = job.stderr.read_text()
    assert status == 0, stderr[-3000:]
    first, second = _stall_lines(stderr, worker)[:2]
    assert re.search(r"from worker 1 \(pid \d+\), (reading|decoding|waiting for the main process).* for \d+ s", first)
    assert "batch-" in first and "no batch for 1 s" in first and "no batch for 2 s" in second  # growing intervals
    assert restart_lines(stderr) == [] and logged_steps(out) == steps


def test_a_stall_past_data_timeout_is_one_error_line_with_last_pt(shard_dir, tmp_path):
    out = tmp_path / "run"
    with start_train(shard_dir, out, tmp_path / "logs", "--steps", "10000", "--workers", "2", "--no-val",
                     "--data-timeout", "3") as job:
        wait_for(lambda: logged_steps(out) >= 2, "two steps")
        worker = children(job.process.pid)[0]
        os.kill(worker, signal.SIGSTOP)
        status = job.wait()
        left = processes_left(job.tag)
    stderr = job.stderr.read_text()
    errors = [line for line in stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert status == 2 and len(errors) == 1, stderr[-3000:]
    assert errors[0].startswith("train.py: error: no batch for 3 s (the data timeout is 3 s)")
    assert f"from worker 0 (pid {worker})" in errors[0] and left == []
    assert checkpoint_step(out / "last.pt") == logged_steps(out) >= 2


_HELD_THEN_STOPPED = """
import os, signal, sys
sys.path[:0] = [{root!r}, {tests!r}]
from helpers import wait_for
from pipeline import Pipeline, PipelineError
from pipeline.workers import BUFFERS_PER_WORKER
with Pipeline({urls!r}, batch_size=2, workers=2, image_size=64, train=True, stall_warn=1, data_timeout=4) as pipeline:
    batches = (batch for epoch in range(100) for batch in pipeline.epoch(epoch))
    held = [next(batches) for _ in range(2 * BUFFERS_PER_WORKER + 4)]  # every buffer: the workers go on in fresh memory
    wait_for(lambda: "waiting for the main process" in pipeline._pool.describe(1), "worker 1 to have its batches made")
    worker = pipeline._pool.heartbeats.pid(1)
    os.kill(worker, signal.SIGSTOP)
    try:
        for batch in batches:
            held.append(batch)
            print("batch after the stop", flush=True)
    except PipelineError as error:
        print(f"error: {{error}} (stopped pid {{worker}})", flush=True)
    finally:
        os.kill(worker, signal.SIGCONT)
"""


def test_a_worker_stopped_with_batches_in_fresh_memory_on_their_way_is_a_data_timeout_not_a_hang(shard_dir, tmp_path):
    # A batch in fresh shared memory (all of a worker's buffers held) used to reach the main
    # process as a file descriptor fetched from the worker itself: a stopped worker hung the
    # main process inside DataLoader, with no stall line and no data timeout.
    script = _HELD_THEN_STOPPED.format(root=str(ROOT), tests=str(ROOT / "tests"), urls=f"{shard_dir}/batch-{{1..2}}.tar")
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"the main process hung: {(hung.stderr or b'')[-2000:]!r}")
    assert done.returncode == 0, done.stderr[-3000:]
    error = done.stdout.splitlines()[-1]
    pid = re.search(r"\(stopped pid (\d+)\)", error).group(1)
    assert error.startswith("error: no batch for 4 s (the data timeout is 4 s)") and f"worker 1 (pid {pid})" in error
    assert "batch after the stop" in done.stdout  # the batches it had made still came
    assert re.search(rf"loader: no batch for 1 s, waiting for batch \d+ of epoch \d+ from worker 1 \(pid {pid}\)",
                     done.stderr)


def test_sigterm_while_every_worker_is_stopped_saves_last_pt_and_exits_143_with_no_process_left(shard_dir, tmp_path):
    out = tmp_path / "run"
    with start_train(shard_dir, out, tmp_path / "logs", "--steps", "10000", "--workers", "2", "--no-val",
                     "--stall-warn", "1") as job:
        wait_for(lambda: logged_steps(out) >= 2, "two steps")
        workers = children(job.process.pid)
        for worker in workers:
            os.kill(worker, signal.SIGSTOP)
        wait_for(lambda: "loader: no batch for" in job.stderr.read_text(), "the main process to wait for data")
        job.process.send_signal(signal.SIGTERM)
        status = job.wait(timeout=60)
        left = processes_left(job.tag)
    stdout, stderr = job.stdout.read_text(), job.stderr.read_text()
    assert status == 128 + signal.SIGTERM and left == [], stderr[-3000:]
    assert "Traceback" not in stderr
    step = int(re.search(r"stopped by SIGTERM at step (\d+)", stdout).group(1))
    assert checkpoint_step(out / "last.pt") == step == logged_steps(out)


def test_sigterm_while_a_step_waits_for_a_stalled_server_saves_last_pt_and_exits_143(shard_dir, tmp_path):
    out = tmp_path / "run"
    with stalling_server(shard_dir) as (url, _), \
            Job([sys.executable, str(ROOT / "train.py"), "--shards", f"{url}/batch-{{1..2}}.tar", "--out", str(out),
                 *TINY, *SCHEDULE, "--workers", "2", "--no-val"], tmp_path / "logs") as job:
        wait_for(lambda: "training to step" in job.stdout.read_text(), "the loop to start")
        job.process.send_signal(signal.SIGTERM)
        status = job.wait(timeout=60)
        left = processes_left(job.tag)
    stderr = job.stderr.read_text()
    assert status == 128 + signal.SIGTERM and left == [] and "Traceback" not in stderr, stderr[-3000:]
    assert "stopped by SIGTERM at step 0" in job.stdout.read_text() and checkpoint_step(out / "last.pt") == 0


def test_dev_shm_filled_mid_run_is_an_error_naming_it_with_last_pt(shard_dir, tmp_path):
    out = tmp_path / "run"
    train_py = [sys.executable, str(ROOT / "train.py"), "--shards", f"{shard_dir}/batch-{{1..2}}.tar",
                "--out", str(out), *TINY, "--steps", "12", "--workers", "2", "--val-every", "4"]
    # A /dev/shm of its own (32 MiB: the start-up check wants its 8 MiB of slack), in a mount namespace.
    script = "mount -t tmpfs -o size=32m tmpfs /dev/shm && exec " + " ".join(f"'{part}'" for part in train_py)
    with Job(["unshare", "--mount", "sh", "-c", script], tmp_path / "logs") as job:
        wait_for(lambda: logged_steps(out) >= 1, "the first step")
        # Another process fills it: this one, through the run's root (its mount namespace).
        with open(f"/proc/{job.process.pid}/root/dev/shm/filler", "wb", buffering=0) as filler:
            with pytest.raises(OSError, match="No space left"):
                while True:
                    filler.write(b"\0" * 2**20)
        status = job.wait()
        left = processes_left(job.tag)
    stderr = job.stderr.read_text()
    errors = [line for line in stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert status == 2 and len(errors) == 1 and "/dev/shm is full" in errors[0], stderr[-3000:]
    assert checkpoint_step(out / "last.pt") == logged_steps(out) == 4 and left == []
