"""The stop vote agreed a step late (training.distributed.all_max_a_step_late): every rank still
stops after the same step, when only one rank is signalled and the ranks run at uneven speeds."""

import json
import os
import random
import re
import signal
import time
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import ROOT, TORCHRUN, checkpoint_step, tiny, wait_for
from servers import free_port
from test_signals import SCHEDULE, Job, tagged_processes, trained
from training import distributed

WORLD = 3
FLAG_STEP = 5  # the step after which the signalled rank raises its flag


def _vote_rank(rank: int, port: int, signalled: int, folder: str) -> None:
    """One rank of the vote: uneven step times (a seeded few ms each, different on every rank),
    a log-like all_sum every third step among the votes, its flag raised from FLAG_STEP on."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    uneven = random.Random(rank)
    stopped_after, sums = None, []
    for step in range(1, 100):
        time.sleep(uneven.uniform(0, 0.004))  # the step's work: its length, not a synchronisation
        flag = signal.SIGTERM if rank == signalled and step >= FLAG_STEP else 0
        if step % 3 == 0:
            sums.append(distributed.all_sum([1])[0])
        if distributed.all_max_a_step_late([0, flag])[1]:
            stopped_after = step
            break
    distributed.teardown()
    Path(folder, f"rank-{rank}.json").write_text(json.dumps({"stopped_after": stopped_after, "sums": sums}))


def test_the_vote_a_step_late_stops_every_rank_after_the_same_step(tmp_path):
    for signalled in (0, WORLD - 1):
        folder = tmp_path / f"signalled-{signalled}"
        folder.mkdir()
        mp.spawn(_vote_rank, args=(free_port(), signalled, str(folder)), nprocs=WORLD)
        ranks = [json.loads((folder / f"rank-{rank}.json").read_text()) for rank in range(WORLD)]
        # The vote cast after FLAG_STEP is read, on every rank, after the step that follows it.
        assert [rank["stopped_after"] for rank in ranks] == [FLAG_STEP + 1] * WORLD, ranks
        assert all(rank["sums"] == [WORLD] * ((FLAG_STEP + 1) // 3) for rank in ranks), ranks


def test_without_a_process_group_the_vote_answers_at_once():
    assert distributed.all_max_a_step_late([0, 15]) == [0.0, 15.0]


def _rank_process(tag: str, rank: int) -> int:
    """The pid of torchrun's worker process of `rank` (no DataLoader workers run: --workers 0)."""
    found = [pid for pid in tagged_processes(tag)
             if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")]
    assert len(found) == 1, found
    return found[0]


def test_torchrun_ranks_stop_after_the_same_step_when_only_one_rank_gets_sigterm(shard_dir, tmp_path):
    """A node's own preemption notice reaches its ranks only: the other node's ranks learn of it
    from the vote, and all stop after the same step, with last.pt of that step."""
    out, logs = tmp_path / "ddp", tmp_path / "rank-logs"
    command = [TORCHRUN, "--standalone", "--nproc_per_node=2", "--log-dir", str(logs), "--redirects", "3",
               str(ROOT / "train.py"), "--shards", f"{shard_dir}/batch-{{1..2}}.tar", "--out", str(out),
               *tiny(batch_size=2), *SCHEDULE, "--no-val"]
    with Job(command, tmp_path) as job:
        wait_for(lambda: trained(out), "the first step")
        os.kill(_rank_process(job.tag, 1), signal.SIGTERM)
        assert job.wait() != 0  # torchrun reports ranks that exited with 143
        left = tagged_processes(job.tag)
    assert left == []
    rank_out = {path.parent.name: path.read_text() for path in logs.rglob("stdout.log")}
    rank_err = {path.parent.name: path.read_text() for path in logs.rglob("stderr.log")}
    assert not any("Traceback" in text for text in rank_err.values()), rank_err
    stopped = {rank: re.search(rf"rank {rank}/2: stopped by SIGTERM at step (\d+)", rank_out[rank])
               for rank in ("0", "1")}
    assert all(stopped.values()), rank_out
    assert stopped["0"].group(1) == stopped["1"].group(1), rank_out
    assert checkpoint_step(out / "last.pt") == int(stopped["0"].group(1))
