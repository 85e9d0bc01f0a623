"""A cache_dir bounded by cache_limit: the folder's bytes never above it while ranks and workers
share it, nothing removed while open, nothing deleted that the cache did not make, a limit too
small said before the first batch, real SIGKILLs mid-download and mid-eviction survived; and
each index read once per process."""

import contextlib
import fcntl
import functools
import hashlib
import http.server
import json
import multiprocessing
import os
import re
import subprocess
import sys
import threading

import pytest
import counting  # tests/counting.py, tests/folderwatch.py: pytest puts this folder on the path
from folderwatch import FolderWatch

import convert_zips
import train
from helpers import ROOT, TORCHRUN, tiny, wait_for
from pipeline import Pipeline, PipelineError, cachelimit, make_loader, schema
from seedzips import synthetic
from seedzips.storage import sha256_of
from training import UserError

SIZE = 16
NAMES = [schema.shard_name(schema.TRAIN_PREFIX, n) for n in (1, 2, 3)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """48 flawless samples in 3 training shards of 16, with indexes and manifest."""
    base = tmp_path_factory.mktemp("limit")
    synthetic.generate(base / "seed", zips=3, bgs_per_zip=2, fg=4, placements=2, seed=1, image_size=64)
    convert_zips.convert(base / "seed", base / "shards", shards=3, val_fraction=0, workers=1, progress=False)
    return base / "shards"


def _largest(folder) -> int:
    return max(os.path.getsize(folder / name) for name in NAMES)


def _all_keys(folder) -> list[str]:
    return sorted(key for name in NAMES for key in schema.decode_index(
        (folder / schema.index_name(name)).read_bytes()).keys)


def _assert_copies_whole(cache_dir) -> None:
    """Every copy in the folder holds the bytes its name says; no download is left behind."""
    names = os.listdir(cache_dir)
    assert not [name for name in names if name.endswith(cachelimit.PART)]
    for name in names:
        if not name.endswith(cachelimit.ENTRY_LOCK) and name != cachelimit.LOCK:
            assert hashlib.sha256((cache_dir / name).read_bytes()).hexdigest() == name.split("-", 1)[0], name


# --- sizes and the option ------------------------------------------------------------------
def test_sizes_parse_in_decimal_and_binary_units_and_a_bad_one_names_the_option():
    sizes = {"50GB": 50 * 10**9, "1.5TB": 1.5e12, "500MB": 5 * 10**8, "10KB": 10**4, "512MiB": 512 << 20,
             "2GiB": 2 << 30, "1234": 1234}
    assert {text: cachelimit.parse_size(text) for text in sizes} == sizes
    assert train.parse_args(["--shards", "s", "--cache-dir", "d", "--cache-limit", "1.5TB"]).cache_limit == 1.5e12
    for bad in ("50XB", "GB", "0"):
        with pytest.raises(UserError, match="^argument --cache-limit: "):
            train.parse_args(["--shards", "s", "--cache-dir", "d", "--cache-limit", bad])
    with pytest.raises(UserError, match="^--cache-limit: needs --cache-dir"):
        train.parse_args(["--shards", "s", "--cache-limit", "1GB"])


# --- the flock discipline, by hand ---------------------------------------------------------
def _copy(folder, name: str, data: bytes) -> str:
    """A copy as the cache makes it: named by its sha256, its entry lock beside it."""
    path = os.path.join(folder, f"{hashlib.sha256(data).hexdigest()}-{name}")
    with open(path, "wb") as f:
        f.write(data)
    open(path + cachelimit.ENTRY_LOCK, "w").close()
    return path


def test_eviction_skips_what_a_reader_holds_and_what_the_user_put_there(tmp_path):
    folder = str(tmp_path)
    users = {"notes.txt": b"n" * 300, f"{'0' * 64}-mine.tar": b"u" * 300}  # a cache-like name, no lock
    for name, data in users.items():
        (tmp_path / name).write_bytes(data)
    held, idle = _copy(folder, "a.tar", b"a" * 1000), _copy(folder, "b.tar", b"b" * 1000)
    os.utime(held, ns=(1, 1))  # the least recently used: evicted first, unless held
    reader = os.open(held + cachelimit.ENTRY_LOCK, os.O_RDWR)
    fcntl.flock(reader, fcntl.LOCK_SH)  # what pipeline.cache holds while it reads a copy
    evicted = cachelimit.evictions
    part = os.path.join(folder, "c" * 64 + "-c.tar" + cachelimit.PART)
    fd, needed = cachelimit.open_part(folder, part, 1000, limit=2700)
    assert fd is not None and needed == 2600  # the idle copy made room; the held one was kept
    os.close(fd)
    assert not os.path.exists(idle) and os.path.getsize(held) == 1000 and cachelimit.evictions == evicted + 1
    assert cachelimit.bytes_under(folder) == 2600  # the download counts in full from its first byte
    os.unlink(part)
    fd, needed = cachelimit.open_part(folder, part, 2000, limit=2700)
    assert (fd, needed) == (None, 3600)  # only the held copy could go: nothing waits, nothing is removed
    os.close(reader)
    fd, needed = cachelimit.open_part(folder, part, 2000, limit=2700)
    assert fd is not None and needed == 2600 and not os.path.exists(held)
    os.close(fd)
    assert {name: (tmp_path / name).read_bytes() for name in users} == users


# --- ranks and workers sharing a bounded folder ----------------------------------------------
def _rank(rank, url, cache_dir, limit, looks, out):
    """Two epochs of one rank; each batch is kept until the watch has looked at the folder, so
    that the workers, their batches ahead all made, hold their copies across several looks.
    What it puts in `out`: (rank, epoch, keys, stats) per epoch, or the error that ended it."""
    try:
        _epochs_of_rank(rank, url, cache_dir, limit, looks, out)
    except BaseException as error:
        out.put(f"rank {rank}: {type(error).__name__}: {error}")
        raise


def _epochs_of_rank(rank, url, cache_dir, limit, looks, out):
    with Pipeline(url, batch_size=2, workers=2, image_size=SIZE, train=True, rank=rank, world_size=2,
                  cache_dir=cache_dir, cache_limit=limit) as pipeline:
        for epoch in (0, 1):
            loader = pipeline.epoch(epoch, chain=epoch == 0)
            keys = []
            for batch in loader:
                keys += batch["key"]
                wait_for(lambda seen=looks.value: looks.value > seen, "the watch's next look")
            out.put((rank, epoch, keys, dict(loader.stats)))


def test_two_ranks_x_two_workers_share_a_folder_of_one_and_a_half_shards(shards, tmp_path):
    cache_dir = tmp_path / "cache"
    limit = _largest(shards) * 3 // 2
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    with counting.http_server(shards) as server, FolderWatch(cache_dir, context) as watch:
        ranks = [context.Process(target=_rank, args=(rank, f"{server.url}/batch-{{1..3}}.tar", str(cache_dir),
                                                     limit, watch.looks, out)) for rank in (0, 1)]
        for process in ranks:
            process.start()
        results = [out.get(timeout=240) for _ in range(4)]
        assert not [result for result in results if isinstance(result, str)]
        for process in ranks:
            process.join(timeout=60)
            assert process.exitcode == 0
    for epoch in (0, 1):
        keys = [key for _, e, epoch_keys, _ in results if e == epoch for key in epoch_keys]
        assert sorted(keys) == _all_keys(shards)  # every sample once per epoch
    assert len(watch.sizes) >= 10 and 0 < max(watch.sizes) <= limit, (max(watch.sizes), limit)
    assert watch.removed_while_open == [] and not watch.overflowed
    stats = [result[3] for result in results]
    assert sum(s["cache_evictions"] for s in stats) >= 1
    # Each shard is downloaded at least once; whether another reader then finds its copy still
    # there (a hit) depends on how the readers interleave, so hits are not asserted here.
    assert sum(s["cache_misses"] for s in stats) >= 3
    assert all(s["cache_bytes"] <= limit for s in stats)
    _assert_copies_whole(cache_dir)


# --- limits too small ---------------------------------------------------------------------
def test_a_limit_below_the_largest_shard_is_one_line_before_the_first_batch(shards, tmp_path):
    half = _largest(shards) // 2
    with counting.http_server(shards) as server:
        with pytest.raises(PipelineError) as raised:
            make_loader(f"{server.url}/batch-{{1..3}}.tar", batch_size=2, workers=0, image_size=SIZE,
                        cache_dir=tmp_path / "cache", cache_limit=half)
        # the first shard's probe, no more (a compact set's backgrounds.tar is read at start-up)
        assert sum(server.bytes_sent(f"/{name}") for name in NAMES) <= 512
    message = str(raised.value)
    largest = max(NAMES, key=lambda name: os.path.getsize(shards / name))
    assert "\n" not in message
    assert message.startswith(f"cache_limit {cachelimit.format_size(half)} is below the largest shard to cache, "
                              f"{server.url}/{largest} ({cachelimit.format_size(_largest(shards))})")


def test_a_limit_for_one_shard_but_not_four_at_once_trains_and_warns_once(shards, tmp_path):
    """2 ranks x 2 workers under torchrun, one folder: the machine's first rank warns, once (the
    other ranks share its folder and its count), and both ranks train to the end."""
    limit = _largest(shards) * 3 // 2
    cache_dir, out, logs = tmp_path / "cache", tmp_path / "run", tmp_path / "rank-logs"
    with counting.http_server(shards) as server:
        done = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "--log-dir", str(logs),
                               "--redirects", "3", str(ROOT / "train.py"),
                               "--shards", f"{server.url}/batch-{{1..3}}.tar", "--out", str(out),
                               *tiny(batch_size=2, workers=2), "--steps", "8", "--no-val",
                               "--cache-dir", str(cache_dir), "--cache-limit", str(limit)],
                              capture_output=True, text=True, timeout=600, cwd=ROOT)
    rank_err = {path.parent.name: path.read_text() for path in logs.rglob("stderr.log")}
    assert done.returncode == 0, (done.stderr[-2000:], rank_err)
    assert sorted(rank_err) == ["0", "1"]
    # Split at carriage returns too: a progress bar may share the warning's line.
    warnings = {rank: [line[line.index("cache_limit"):] for line in re.split("[\r\n]", text) if "cache_limit" in line]
                for rank, text in rank_err.items()}
    needed = 4 * _largest(shards)
    assert warnings == {"0": [f"cache_limit {cachelimit.format_size(limit)} cannot hold the 4 files read at once on "
                              f"this machine (one per worker of each rank) of up to "
                              f"{cachelimit.format_size(_largest(shards))} each: that needs "
                              f"{cachelimit.format_size(needed)}; those that do not fit are read remotely"],
                        "1": []}, (warnings, done.stderr[-2000:])
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(line["step"] for line in lines) == 8
    assert all(0 <= line["cache_bytes"] <= limit for line in lines)
    assert sum(line["cache_hits"] + line["cache_misses"] for line in lines) >= 3
    _assert_copies_whole(cache_dir)


# --- SIGKILL mid-download and mid-eviction -------------------------------------------------
class _StallingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files; a GET of the server's `stall` path sends half the body, then waits."""

    def do_GET(self):
        if self.path != self.server.stall:
            return super().do_GET()
        data = open(self.translate_path(self.path), "rb").read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:len(data) // 2])
        self.wfile.flush()
        self.server.stalled.set()
        self.server.release.wait(timeout=120)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _stalling_server(root, stall: str):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_StallingHandler, directory=str(root)))
    server.daemon_threads, server.stall = True, stall
    server.stalled, server.release = threading.Event(), threading.Event()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()


# A child reading the shards in order through the cache; STOP_AT_EVICTION: it stops itself (a
# real SIGSTOP) just before it unlinks an evicted shard, so the test can kill it right there.
CHILD = """
import os, signal, sys
from pipeline import make_loader
url, cache_dir, limit, stop_at_eviction = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
unlink = os.unlink
def stopping_unlink(path, *args, **kwargs):
    if stop_at_eviction and os.path.dirname(path) == cache_dir and path.endswith(".tar"):
        os.kill(os.getpid(), signal.SIGSTOP)
    return unlink(path, *args, **kwargs)
os.unlink = stopping_unlink
for batch in make_loader(url, batch_size=2, workers=0, image_size=16, train=False, cache_dir=cache_dir,
                         cache_limit=limit):
    pass
"""


def _child(url, cache_dir, limit, stop_at_eviction: bool) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, url, str(cache_dir), str(limit), str(int(stop_at_eviction))],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _next_run_reads_every_sample(shards, cache_dir, limit, *, reused: list[str]) -> None:
    """A later run delivers every sample, reads the copies in `reused` without a byte of them
    fetched, and leaves only whole copies under the limit."""
    with counting.http_server(shards) as server:
        loader = make_loader(f"{server.url}/batch-{{1..3}}.tar", batch_size=2, workers=0, image_size=SIZE,
                             train=False, cache_dir=cache_dir, cache_limit=limit)
        keys = sorted(key for batch in loader for key in batch["key"])
        assert keys == _all_keys(shards) and loader.skipped == []
        assert [server.bytes_sent(f"/{name}") for name in reused] == [0] * len(reused)
    assert cachelimit.bytes_under(str(cache_dir)) <= limit
    _assert_copies_whole(cache_dir)


def test_a_sigkill_mid_download_leaves_nothing_read_half_written(shards, tmp_path):
    cache_dir, limit = tmp_path / "cache", 10 * _largest(shards)
    with _stalling_server(shards, f"/{NAMES[2]}") as (url, server):
        child = _child(f"{url}/batch-{{1..3}}.tar", cache_dir, limit, stop_at_eviction=False)
        try:
            assert server.stalled.wait(timeout=120), "the child never reached the third shard"
        finally:
            child.kill()
            child.wait()
    parts = [name for name in os.listdir(cache_dir) if name.endswith(cachelimit.PART)]
    assert parts == [f"{sha256_of(shards / NAMES[2])}-{NAMES[2]}{cachelimit.PART}"]
    _next_run_reads_every_sample(shards, cache_dir, limit, reused=NAMES[:2])


def test_a_sigkill_mid_eviction_leaves_every_copy_whole_or_gone(shards, tmp_path):
    cache_dir, limit = tmp_path / "cache", _largest(shards) * 3 // 2
    with counting.http_server(shards) as server:
        child = _child(f"{server.url}/batch-{{1..3}}.tar", cache_dir, limit, stop_at_eviction=True)
        try:
            _, status = os.waitpid(child.pid, os.WUNTRACED)
            assert os.WIFSTOPPED(status), "the child never evicted a copy"
            # Stopped inside the eviction: it holds the folder's lock, as every eviction does.
            lock = os.open(cache_dir / cachelimit.LOCK, os.O_RDWR)
            with pytest.raises(BlockingIOError):
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            child.kill()
            child.wait()
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the kernel released the dead process's locks
    os.close(lock)
    copies = sorted(name for name in os.listdir(cache_dir) if name.endswith(".tar")
                    and not name.endswith(schema.BACKGROUNDS))  # a compact set's, read at start-up
    assert copies == [f"{sha256_of(shards / NAMES[0])}-{NAMES[0]}"]  # the copy being evicted
    _next_run_reads_every_sample(shards, cache_dir, limit, reused=NAMES[:1])


# --- the per-process index LRU ---------------------------------------------------------------
def test_each_worker_reads_each_index_once_over_epochs(shards):
    index_bytes = sum(os.path.getsize(shards / schema.index_name(name)) for name in NAMES)
    with counting.http_server(shards) as server:
        with Pipeline(f"{server.url}/batch-{{1..3}}.tar", batch_size=2, workers=2, image_size=SIZE,
                      train=True) as pipeline:
            for epoch in range(3):
                assert sum(len(batch["key"]) for batch in pipeline.epoch(epoch, chain=epoch < 2)) == 48
        sent = server.bytes_sent(schema.INDEX_SUFFIX)
    # Each worker reads the ranges of about half the shards every epoch, in a new order each
    # time: without its parsed indexes kept, 3 epochs would read about 3 x half of them each.
    assert sent <= 2 * index_bytes, (sent, index_bytes)
