"""Where a run reads validation shards from and writes its files to, checked up front."""

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path

from pipeline import PipelineError, expand_urls, read_manifest, schema
from pipeline.sources import shard_entries, shard_folder

from . import UserError
from .distributed import Context, fail_together

LOCK = ".lock"


class RunLock:
    """OUT/.lock, flock()ed for as long as a run uses OUT.

    The kernel drops a flock when its holder dies, however it dies, so the lock file a killed
    run leaves behind is simply free again. The file records the holder (pid, host, start) for
    a second run's error message; a clean exit empties it, so a record found on taking the lock
    is one a killed run left. The file itself is never deleted: a run that opened it just
    before the delete would lock a file no other run can see.
    """

    def __init__(self, out: Path):
        self.path = out / LOCK
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self.left_by_killed_run = ""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._record() or "another process"
            os.close(self.fd)
            raise UserError(f"run folder {out} is in use by a live run ({holder}, holding {self.path}): "
                            "wait for it to end or choose another --out") from None
        except OSError as error:
            os.close(self.fd)
            raise UserError(f"cannot lock {self.path}: {error.strerror or error} (a file system "
                            "without flock? choose an --out on one that has it)") from None
        self.left_by_killed_run = self._record()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)

    def _record(self) -> str:
        return os.pread(self.fd, 4096, 0).decode(errors="replace").strip()

    def release(self) -> None:
        os.ftruncate(self.fd, 0)
        # Explicitly: a forked DataLoader worker still alive shares the lock, so a close alone
        # would leave it held.
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _make_writable(out: Path, rank: int) -> None:
    probe = out / f".write-test-{rank}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"run folder {out} is not writable: {err.strerror or err}") from None


@contextlib.contextmanager
def claim_run_folder(out: Path, *, resume: bool, ctx: Context):
    """Create OUT and prove it writable, lock it against a second live run for the duration of
    the block (rank 0 holds the lock), and refuse to overwrite a run unless resuming. A failure
    on any rank stops every rank."""
    lock = None
    try:
        with fail_together(ctx):
            _make_writable(out, ctx.rank)
            if ctx.is_main:
                lock = RunLock(out)
                if lock.left_by_killed_run:
                    print(f"note: taking over {lock.path} from a run that ended without releasing it "
                          f"({lock.left_by_killed_run})", flush=True)
            if resume and not (out / "last.pt").exists():
                raise UserError(f"--resume: {out / 'last.pt'} does not exist (nothing to resume)")
            if not resume and (out / "last.pt").exists():
                raise UserError(f"run folder {out} already holds a run (last.pt): "
                                "pass --resume or choose another --out")
        yield
    finally:
        if lock is not None:
            lock.release()


def _val_names_in(manifest: dict) -> list[str]:
    """Validation shard names in a converter manifest."""
    return [name for name, entry in shard_entries(manifest).items() if entry.get("split") == schema.VAL_SPLIT]


def find_val_shards(train_urls: list[str], val_pattern: str | None, storage_options) -> list[str]:
    """--val-shards if given (must match), else the val-*.tar beside the training shards, else [].

    train_urls are the expanded training shards; the manifest beside the first one names the
    validation shards. Without a manifest, a folder with no val-*.tar means no validation, but
    a folder that cannot be listed (unreachable store, bad credentials) raises PipelineError.
    """
    if val_pattern:
        return expand_urls(val_pattern, storage_options)
    folder = shard_folder(train_urls[0])
    manifest = read_manifest(train_urls[0], storage_options)
    if manifest:
        return [f"{folder}/{name}" for name in _val_names_in(manifest)]
    pattern = f"{folder}/{schema.VAL_PREFIX}-*.tar"
    try:
        return expand_urls(pattern, storage_options)
    except PipelineError as error:
        # A listing failure carries the store's error as its cause; "matches nothing" has none.
        if error.__cause__ is None:
            return []
        raise PipelineError(f"looking for validation shards {pattern}: {error} "
                            "(pass --val-shards, or --no-val to train without validation)") from error
