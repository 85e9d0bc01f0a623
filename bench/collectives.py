"""What agreeing on a stop every step costs each step, at 2, 4 and 8 gloo CPU ranks on 127.0.0.1.

train.py's ranks vote every step on whether to stop (training.distributed). Before: a blocking
all-reduce per step (`all_max`), a host barrier: every rank waits for the slowest one and for
the round trips. After: `all_max_a_step_late`, an async all-reduce started after step k and
waited for after step k+1. Each rank runs a loop of simulated steps (a sleep of --step-ms, the
host waiting for its GPU; --jitter 0.2 makes each step of each rank up to 20% longer, a seeded
draw, for ranks of uneven speed) three ways, taking turns in --rounds rounds in the same
processes: without any vote (the baseline), with the blocking vote, with the one a step late. A scheme's cost per step is its loop time minus the baseline's, over the steps (the
mean over ranks, the median over rounds); `in_call_us` is the time inside the vote call alone.

    python bench/collectives.py [--ranks 2 4 8] [--steps 200] [--step-ms 10] [--jitter 0] [--rounds 3]

Prints one JSON line.
"""

import argparse
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import distributed  # noqa: E402

SCHEMES = {"none": None, "blocking": distributed.all_max, "a_step_late": distributed.all_max_a_step_late}


def timed_loop(vote, steps: int, step_s: float, jitter: float, rng: random.Random) -> tuple[float, float]:
    """(seconds for `steps` simulated steps, seconds of them inside `vote`), all ranks started together."""
    dist.barrier()
    in_call = 0.0
    started = time.perf_counter()
    for _ in range(steps):
        time.sleep(step_s * (1 + jitter * rng.random()))
        if vote is not None:
            called = time.perf_counter()
            vote([0.0, 0.0])
            in_call += time.perf_counter() - called
    distributed.finish_vote()  # the one a step late leaves its last vote in flight
    return time.perf_counter() - started, in_call


def rank_main(rank: int, world: int, port: int, args, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rng = random.Random(rank)
    names = list(SCHEMES)
    timed_loop(distributed.all_max, 20, args.step_ms / 1000, args.jitter, rng)  # connections made, code warm
    times = {name: [] for name in names}
    for round_ in range(args.rounds):
        for name in names[round_ % 3:] + names[:round_ % 3]:  # taking turns: no scheme always first
            times[name].append(timed_loop(SCHEMES[name], args.steps, args.step_ms / 1000, args.jitter, rng))
    distributed.teardown()
    Path(folder, f"rank-{rank}.json").write_text(json.dumps(times))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(world: int, args) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(rank_main, args=(world, free_port(), args, folder), nprocs=world)
        ranks = [json.loads(Path(folder, f"rank-{rank}.json").read_text()) for rank in range(world)]
    result = {}
    for name in ("blocking", "a_step_late"):
        per_round = []
        for round_ in range(args.rounds):
            cost = [(rank[name][round_][0] - rank["none"][round_][0]) / args.steps for rank in ranks]
            in_call = [rank[name][round_][1] / args.steps for rank in ranks]
            per_round.append((statistics.mean(cost), statistics.mean(in_call)))
        result[f"{name}_us"] = round(statistics.median(cost for cost, _ in per_round) * 1e6, 1)
        result[f"{name}_in_call_us"] = round(statistics.median(call for _, call in per_round) * 1e6, 1)
        result[f"{name}_rounds_us"] = [round(cost * 1e6, 1) for cost, _ in per_round]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--steps", type=int, default=200, help="simulated steps per scheme and round")
    parser.add_argument("--step-ms", type=float, default=10.0, help="the shortest simulated step")
    parser.add_argument("--jitter", type=float, default=0.0, help="each step up to this fraction longer, per rank (seeded)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    started = time.perf_counter()
    results = {str(world): measure(world, args) for world in args.ranks}
    print(json.dumps({"bench": "collectives", "step_ms": args.step_ms, "jitter": args.jitter, "steps": args.steps,
                      "rounds": args.rounds, "cpus": os.cpu_count(), "per_step_cost": results,
                      "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
