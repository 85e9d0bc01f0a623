"""Real signals to real train.py processes (alone and under torchrun), and the run folder lock.

Every process of a run carries a tag in its environment, so "no process left" is checked over
the whole tree, DataLoader workers included, even those re-parented after their parent died.
"""

import fcntl
import contextlib
import functools
import http.server
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from helpers import (ROOT, TINY, TORCHRUN, assert_same_checkpoint_weights, checkpoint_step, copy_backgrounds,
                     run_train, tiny, wait_for)
from pipeline import schema
from servers import free_port
from training.signals import DUPLICATE_WINDOW

SCHEDULE = ["--steps", "10000"]  # far more than a test runs: it is stopped by a signal
# An exit "at once" takes milliseconds; this much is headroom for a loaded 2-core machine, far
# below what a run stuck for good, or workers left to notice their parent is gone, would take.
SECOND_SIGNAL_EXIT = 10.0
TAG = "BGFG_TEST_RUN"


def tagged_processes(tag: str) -> list[int]:
    """Live processes (not zombies: a zombie's environment reads empty) carrying the tag."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:  # gone meanwhile
            continue
        if f"{TAG}={tag}".encode() in environ.split(b"\0"):
            found.append(int(pid))
    return found


# A batch made in fresh shared memory (pipeline.workers) is freed by torch's torch_shm_manager,
# which exits by itself 2 s after the last process using it has: that long is allowed. A worker
# or rank still there after that is left for good.
SHM_MANAGER_EXIT = 10.0


def processes_left(tag: str) -> list[str]:
    """The command lines of the processes carrying the tag that outlive SHM_MANAGER_EXIT."""
    deadline = time.monotonic() + SHM_MANAGER_EXIT
    while (left := tagged_processes(tag)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [_command_line(pid) for pid in left]


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:  # ended meanwhile
        return f"pid {pid} (ended)"


class Job:
    """A command started in a session of its own with a tag, its output in files."""

    def __init__(self, command: list, folder: Path, env: dict | None = None):
        self.tag, self.folder = uuid.uuid4().hex, folder
        folder.mkdir(exist_ok=True)
        self.stdout, self.stderr = folder / "stdout.txt", folder / "stderr.txt"
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.process = subprocess.Popen(command, stdout=out, stderr=err, cwd=ROOT, start_new_session=True,
                                            env={**os.environ, **(env or {}), TAG: self.tag})

    def wait(self, timeout: float = 120.0) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            pytest.fail(f"{self.process.args[:3]} did not exit within {timeout:.0f}s:\n"
                        f"{self.stderr.read_text()[-3000:]}")

    def kill_all(self) -> None:
        for pid in tagged_processes(self.tag):
            os.kill(pid, signal.SIGKILL)
        self.process.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if self.process.poll() is None:
            self.kill_all()


def start_train(shard_dir, out: Path, folder: Path, *extra) -> Job:
    return Job([sys.executable, str(ROOT / "train.py"), "--shards", f"{shard_dir}/batch-{{1..2}}.tar",
                "--out", str(out), *TINY, *extra], folder)


def trained(out: Path) -> bool:
    """True once the run has logged a step (--log-every 1), i.e. training is under way."""
    path = out / "metrics.jsonl"
    return path.exists() and path.read_text().count("\n") >= 1


# A terminal's Ctrl-C reaches the DataLoader workers too: they must leave it to train.py.
@pytest.mark.parametrize("signum, whole_group, workers", [(signal.SIGTERM, False, "0"), (signal.SIGINT, True, "2")],
                         ids=["SIGTERM to the process", "SIGINT to the group (Ctrl-C) with workers"])
def test_a_signal_saves_last_pt_ends_the_workers_and_resume_continues_exactly(signum, whole_group, workers,
                                                                               shard_dir, tmp_path):
    out = tmp_path / "run"
    with start_train(shard_dir, out, tmp_path / "logs", *SCHEDULE, "--workers", workers, "--no-val") as job:
        wait_for(lambda: trained(out), "the first step")
        if whole_group:
            os.killpg(job.process.pid, signum)
        else:
            job.process.send_signal(signum)
        status = job.wait()
        left = processes_left(job.tag)
    stdout, stderr = job.stdout.read_text(), job.stderr.read_text()
    assert status == 128 + signum, stderr[-3000:]
    assert left == []
    assert "Traceback" not in stderr and f"train.py: {signal.Signals(signum).name}: stopping" in stderr
    step = int(re.search(rf"stopped by {signal.Signals(signum).name} at step (\d+)", stdout).group(1))
    assert checkpoint_step(out / "last.pt") == step

    # Two more steps from last.pt give the weights of a run that was never interrupted.
    assert run_train(shard_dir, out, "--steps", str(step + 2), "--schedule-steps", "10000", "--workers", workers,
                     "--no-val", "--resume") == 0
    whole = tmp_path / "whole"
    assert run_train(shard_dir, whole, "--steps", str(step + 2), "--schedule-steps", "10000", "--workers", workers,
                     "--no-val") == 0
    assert_same_checkpoint_weights(whole / "last.pt", out / "last.pt")


def validated(out: Path) -> bool:
    path = out / "metrics.jsonl"
    return path.exists() and '"kind": "val"' in path.read_text()


def test_a_signal_while_the_validation_workers_wait_for_their_next_pass_still_exits(shard_dir, tmp_path):
    """Between validations the validation pipeline's workers sleep waiting for a pass; train.py
    kills them at a stop signal, and closing their pipeline after that must not wait on them
    (else last.pt is saved but the process never ends)."""
    out = tmp_path / "run"
    with start_train(shard_dir, out, tmp_path / "logs", *SCHEDULE, "--workers", "2", "--val-every", "2",
                     "--val-shards", str(shard_dir / "val-1.tar")) as job:
        wait_for(lambda: validated(out), "the first validation")
        job.process.send_signal(signal.SIGTERM)
        status = job.wait(timeout=60)
        left = processes_left(job.tag)
    stdout, stderr = job.stdout.read_text(), job.stderr.read_text()
    assert status == 128 + signal.SIGTERM, stderr[-3000:]
    assert left == [] and "Traceback" not in stderr
    step = int(re.search(r"stopped by SIGTERM at step (\d+)", stdout).group(1))
    assert checkpoint_step(out / "last.pt") == step


class _StallingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the set's small files (manifest, indexes, backgrounds.tar) whole; of a shard the
    first KiB, the rest once the test releases it."""

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        shard = path.suffix == ".tar" and path.name.startswith((schema.TRAIN_PREFIX + "-", schema.VAL_PREFIX + "-"))
        held = 1024 if shard else len(data)
        try:
            self.wfile.write(data[:held])
            self.wfile.flush()
            self.server.release.wait(timeout=300)
            self.wfile.write(data[held:])
        except (BrokenPipeError, ConnectionResetError):  # the client is gone: what the test did
            pass

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def stalling_server(root: Path):
    """(base URL, release event) of an HTTP server for `root` whose shards stall after their
    first KiB until the event is set."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_StallingHandler, directory=str(root)))
    server.daemon_threads, server.release = True, threading.Event()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.release
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


# A step waiting for data is not stuck: the first signal ends the wait and saves
# (tests/test_worker_restart.py). Inside C++ the first signal can only be recorded.
def test_a_second_signal_exits_at_once_where_the_run_is_stuck_in_a_rendezvous(shard_dir, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "train.py"), "--out", str(out), *TINY, *SCHEDULE, "--no-val"]
    with contextlib.ExitStack() as stack:
        # init_process_group waits for rank 1, never back in Python to run a handler
        port = free_port()
        env = dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        job = stack.enter_context(Job([*command, "--shards", f"{shard_dir}/batch-{{1..2}}.tar"],
                                      tmp_path / "logs", env))
        wait_for(lambda: _listening(port), "rank 0's rendezvous store")
        job.process.send_signal(signal.SIGTERM)
        wait_for(lambda: "stopping after the current step" in job.stderr.read_text(), "the first signal's notice")
        window_ends = time.monotonic() + DUPLICATE_WINDOW  # the run saw the first signal before its notice
        # Repeats well inside the window count as the first signal: the run goes on waiting.
        repeats = []
        wait_for(lambda: repeats.append(job.process.send_signal(signal.SIGTERM))
                 or time.monotonic() >= window_ends - DUPLICATE_WINDOW / 2, "repeats in the window")
        wait_for(lambda: time.monotonic() >= window_ends, "the end of the window", timeout=DUPLICATE_WINDOW)
        assert len(repeats) > 1 and job.process.poll() is None, f"{len(repeats)} repeats in the window ended the run"
        # One signal after the window ends the run at once: nothing else would ever end it, and the
        # exit is a kill of the workers and os._exit, so the bound is headroom for a loaded machine.
        job.process.send_signal(signal.SIGTERM)
        wait_for(lambda: job.process.poll() is not None, "the process to exit on the signal", timeout=SECOND_SIGNAL_EXIT)
        # The workers were sent SIGKILL before the exit; the kernel finishes them at its own pace.
        wait_for(lambda: not tagged_processes(job.tag), "no process of the run left", timeout=SECOND_SIGNAL_EXIT)
    stderr = job.stderr.read_text()
    assert job.process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "SIGTERM again: exiting now without saving" in stderr and "Traceback" not in stderr
    assert stderr.count("SIGTERM again") == 1 and not (out / "last.pt").exists()


def test_torchrun_ranks_stop_after_the_same_step_when_every_process_gets_sigterm(shard_dir, tmp_path):
    """As SLURM's scancel does it: torchrun, both ranks and their workers are signalled, and
    torchrun forwards the signal to the ranks once more."""
    out, logs = tmp_path / "ddp", tmp_path / "rank-logs"
    command = [TORCHRUN, "--standalone", "--nproc_per_node=2", "--log-dir", str(logs), "--redirects", "3",
               str(ROOT / "train.py"), "--shards", f"{shard_dir}/batch-{{1..2}}.tar", "--out", str(out),
               *tiny(batch_size=2, workers=1), *SCHEDULE, "--no-val"]
    with Job(command, tmp_path) as job:
        wait_for(lambda: trained(out), "the first step")
        for pid in tagged_processes(job.tag):
            os.kill(pid, signal.SIGTERM)
        assert job.wait() != 0  # torchrun reports that it was signalled
        left = processes_left(job.tag)
    assert left == []
    rank_out = {path.parent.name: path.read_text() for path in logs.rglob("stdout.log")}
    rank_err = {path.parent.name: path.read_text() for path in logs.rglob("stderr.log")}
    assert sorted(rank_out) == sorted(rank_err) == ["0", "1"]
    assert not any("Traceback" in text for text in rank_err.values()), rank_err
    stopped = {rank: re.search(rf"rank {rank}/2: stopped by SIGTERM at step (\d+)", text).group(1)
               for rank, text in rank_out.items()}
    assert stopped["0"] == stopped["1"], rank_out
    assert checkpoint_step(out / "last.pt") == int(stopped["0"])


def test_a_second_live_run_is_refused_and_a_killed_runs_lock_is_taken_over(shard_dir, tmp_path, capsys):
    out = tmp_path / "run"
    with start_train(shard_dir, out, tmp_path / "logs", *SCHEDULE, "--no-val", "--save-every", "100000") as job:
        wait_for(lambda: trained(out), "the first step")
        assert run_train(shard_dir, out, "--steps", "1", "--no-val") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(out) in err and f"pid {job.process.pid} " in err, err
        job.kill_all()  # SIGKILL: no chance to release anything
    assert f"pid {job.process.pid} " in (out / ".lock").read_text()
    assert run_train(shard_dir, out, "--steps", "1", "--no-val") == 0
    assert f"taking over {out / '.lock'}" in capsys.readouterr().out
    assert (out / ".lock").read_text() == ""  # released by a clean exit


def test_a_validation_that_fails_mid_run_is_one_line_and_keeps_the_steps_trained(shard_dir, tmp_path):
    val = tmp_path / "val-1.tar"
    val.write_bytes((shard_dir / "val-1.tar").read_bytes())
    copy_backgrounds(shard_dir, tmp_path)
    out = tmp_path / "run"
    with stalling_server(shard_dir) as (url, release), \
            Job([sys.executable, str(ROOT / "train.py"), "--shards", f"{url}/batch-{{1..2}}.tar", "--out", str(out),
                 *TINY, "--steps", "4", "--val-shards", str(val), "--val-every", "2", "--save-every", "4"],
                tmp_path / "logs") as job:
        # The start-up checks have opened the validation shard; the first batch is held back.
        wait_for(lambda: "training to step" in job.stdout.read_text(), "the loop to start")
        val.unlink()
        release.set()
        status = job.wait()
    errors = [line for line in job.stderr.read_text().splitlines() if "error" in line.lower()]
    assert status == 2 and len(errors) == 1 and errors[0].startswith("train.py: error:") and str(val) in errors[0]
    assert checkpoint_step(out / "last.pt") == 2


def test_under_torchrun_a_check_that_fails_on_rank_0_alone_stops_both_ranks(shard_dir, tmp_path):
    out, logs = tmp_path / "ddp", tmp_path / "rank-logs"
    out.mkdir()
    with open(out / ".lock", "w") as held:  # a live run holds the folder: only rank 0 takes the lock
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write(f"pid {os.getpid()} on this test\n")
        held.flush()
        command = [TORCHRUN, "--standalone", "--nproc_per_node=2", "--log-dir", str(logs), "--redirects", "3",
                   str(ROOT / "train.py"), "--shards", f"{shard_dir}/batch-{{1..2}}.tar", "--out", str(out), *TINY,
                   "--steps", "2"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode != 0
    stderr = {path.parent.name: path.read_text() for path in logs.rglob("stderr.log")}
    assert not any("Traceback" in text for text in stderr.values()), stderr
    # torch's own warnings aside (c10d's about host names, in a network namespace)
    errors = {rank: [line for line in text.splitlines() if line.startswith("train.py:")] for rank, text in stderr.items()}
    assert errors["0"] == [f"train.py: error: run folder {out} is in use by a live run (pid {os.getpid()} on this "
                           f"test, holding {out / '.lock'}): wait for it to end or choose another --out"]
    assert errors["1"] == ["train.py: error: rank 0 failed a start-up check (its own error line says which)"]
