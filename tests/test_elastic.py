"""Loader states: an epoch stopped on one topology and continued on others (ranks simulated
through make_loader's rank/world_size, each with its own worker processes)."""

import collections
import json
import os
import signal
import subprocess

import pytest
import torch

import convert_zips
import train
from helpers import ROOT, TORCHRUN, format_options, tiny, wait_for
from pipeline import Pipeline, PipelineError, make_loader
from pipeline.plan import split_evenly
from seedzips import synthetic
from test_signals import Job, tagged_processes, trained

SAMPLES = 120  # 2 zips x 2 backgrounds x 6 foregrounds x 5 placements, no faults
SHUFFLE = 6  # small, so a stopped train epoch has consumed a scattered set of its shares' samples


@pytest.fixture(scope="module")
def clean_shards(tmp_path_factory, shard_format):
    """120 samples without faults in batch-1..3.tar (40 each), no validation split, in each format."""
    root = tmp_path_factory.mktemp("elastic")
    synthetic.generate(root / "seed", zips=2, bgs_per_zip=2, fg=6, placements=5, seed=0, image_size=32)
    convert_zips.convert(root / "seed", root / "shards", shards=3, val_fraction=0, seed=0, workers=1, progress=False,
                         **format_options(shard_format))
    return f"{root}/shards/batch-{{1..3}}.tar"


def _ranks(urls, world, workers, batch_size, *, train, stop_after=None, state=None):
    """Every simulated rank's keys (in order) and its state after `stop_after` batches (None: all)."""
    keys, states, lengths = [], [], []
    for rank in range(world):
        loader = make_loader(urls, batch_size=batch_size, workers=workers, image_size=32, train=train,
                             shuffle_buffer=SHUFFLE, rank=rank, world_size=world, state=state)
        lengths.append(len(loader))
        batches = iter(loader)
        for taken, batch in enumerate(batches, 1):
            keys.append(list(batch["key"]))
            if taken == stop_after:
                break
        states.append(loader.state_dict())
        batches.close()
    assert len(set(lengths)) == 1, lengths  # every rank the same number of batches
    assert all(state == states[0] for state in states), states  # one rank's state is everyone's
    json.dumps(states[0])
    return [key for batch in keys for key in batch], states[0], keys


def _uninterrupted_drop(urls, world, batch_size) -> int:
    loader = make_loader(urls, batch_size=batch_size, workers=0, image_size=32, rank=0, world_size=world)
    return SAMPLES - world * len(loader) * batch_size


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("world, workers, batch_size", [(2, 3, 5), (1, 1, 3)])
def test_stopped_on_4_ranks_x_2_workers_and_continued_on_another_topology(clean_shards, train, world, workers,
                                                                          batch_size):
    before, state, _ = _ranks(clean_shards, 4, 2, 4, train=train, stop_after=3)
    assert len(before) == state["samples_done"] == 4 * 3 * 4 and state["epoch_samples"] == SAMPLES
    after, finished, batches = _ranks(clean_shards, world, workers, batch_size, train=train, state=state)
    seen = collections.Counter(before + after)
    assert max(seen.values()) == 1, [key for key, count in seen.items() if count > 1]  # never twice
    assert finished["samples_done"] == len(before) + len(after)
    if train:
        assert {len(batch) for batch in batches} == {batch_size}
        undelivered = SAMPLES - len(seen)
        assert undelivered - _uninterrupted_drop(clean_shards, 4, 4) <= world * batch_size
    else:
        assert len(seen) == SAMPLES  # each sample exactly once over both parts


def test_an_epoch_continued_twice_delivers_each_eval_sample_once(clean_shards):
    first, state, _ = _ranks(clean_shards, 4, 2, 4, train=False, stop_after=2)
    second, state, _ = _ranks(clean_shards, 2, 3, 5, train=False, stop_after=3, state=state)
    assert [s["world_size"] for s in state["segments"]] == [4, 2]
    third, state, _ = _ranks(clean_shards, 1, 1, 7, train=False, state=state)
    assert sorted(collections.Counter(first + second + third).values()) == [1] * SAMPLES
    assert state["samples_done"] == SAMPLES


def test_on_the_same_topology_a_state_gives_the_start_batch_batches_bit_for_bit(clean_shards):
    options = dict(batch_size=4, workers=2, image_size=32, train=True, shuffle_buffer=SHUFFLE, rank=1, world_size=4)
    loader = make_loader(clean_shards, **options)
    batches = iter(loader)
    for _ in range(3):
        next(batches)
    state = loader.state_dict()
    batches.close()
    resumed = [{name: value.clone() if torch.is_tensor(value) else value for name, value in batch.items()}
               for batch in make_loader(clean_shards, state=state, **options)]
    today = list(make_loader(clean_shards, start_batch=3, **options))
    assert len(resumed) == len(today) == len(loader) - 3
    for ours, theirs in zip(resumed, today):
        assert ours["key"] == theirs["key"]
        for name in ("bg", "bgfg", "mask", "depth", "aug"):
            assert torch.equal(ours[name], theirs[name]), name


def test_a_pipeline_finishes_the_continued_epoch_then_goes_on_with_normal_epochs(clean_shards):
    _, state, _ = _ranks(clean_shards, 4, 2, 4, train=True, stop_after=5)
    options = dict(batch_size=6, workers=2, image_size=32, shuffle_buffer=SHUFFLE)
    with Pipeline(clean_shards, **options) as pipeline:
        rest = [list(batch["key"]) for batch in pipeline.epoch(state=state)]
        assert len(rest) == (SAMPLES - 4 * 5 * 4) // 6
        next_epoch = [list(batch["key"]) for batch in pipeline.epoch(1)]
    assert next_epoch == [list(batch["key"]) for batch in make_loader(clean_shards, epoch=1, **options)]


def test_a_finished_epochs_state_continues_with_nothing(clean_shards):
    _, state, _ = _ranks(clean_shards, 4, 2, 4, train=True)
    assert len(make_loader(clean_shards, batch_size=2, workers=0, image_size=32, state=state)) == 0


def test_a_state_of_other_shards_seed_or_split_is_one_line_naming_what_differs(clean_shards):
    _, state, _ = _ranks(clean_shards, 2, 1, 4, train=True, stop_after=1)
    other_shards = clean_shards.replace("{1..3}", "{1..2}")
    for urls, options, differs in ((other_shards, {}, "shards"), (clean_shards, {"seed": 1}, "seed"),
                                   (clean_shards, {"train": False}, "train")):
        with pytest.raises(PipelineError, match=f"^the loader state is of another epoch plan: {differs} ") as raised:
            make_loader(urls, batch_size=4, workers=0, state=state, **options)
        assert "\n" not in str(raised.value)
    with pytest.raises(PipelineError, match="epoch 2 asked for with a loader state of epoch 0"):
        make_loader(clean_shards, batch_size=4, workers=0, epoch=2, state=state)


# --- train.py: a torchrun run stopped by SIGTERM mid-epoch, resumed on another number of ranks
BATCH = 2


def _train_command(world: int, report, shards: str, out, *extra) -> list:
    """torchrun of tests/ddp_probe.py (each rank's batch keys into REPORT/rank-R.pt)."""
    return [TORCHRUN, "--standalone", f"--nproc_per_node={world}", str(ROOT / "tests" / "ddp_probe.py"), str(report),
            "--shards", shards, "--out", str(out), *tiny(batch_size=BATCH, workers=1), "--no-val", *extra]


def _rank_batches(report, world: int) -> list[list]:
    return [torch.load(report / f"rank-{rank}.pt", weights_only=False)["batches"] for rank in range(world)]


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)], ids=["2 -> 1 processes", "1 -> 2 processes"])
def test_a_run_stopped_by_sigterm_mid_epoch_resumes_on_another_number_of_ranks_with_exactly_the_rest(
        clean_shards, tmp_path, before, after):
    out, first, second = tmp_path / "run", tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    with Job(_train_command(before, first, clean_shards, out, "--steps", "10000"), tmp_path / "logs") as job:
        wait_for(lambda: trained(out), "the first step")
        for pid in tagged_processes(job.tag):
            os.kill(pid, signal.SIGTERM)
        job.wait()
    saved = torch.load(out / "last.pt", weights_only=False)
    stopped, state = saved["step"], saved["loader_state"]
    assert state["samples_done"] == before * stopped * BATCH < SAMPLES  # stopped mid-epoch 0
    rest = min(split_evenly(SAMPLES - state["samples_done"], after)) // BATCH  # whole batches of the smaller rank

    resumed = subprocess.run(_train_command(after, second, clean_shards, out, "--steps", str(stopped + rest + 2),
                                            "--schedule-steps", "10000", "--resume"),
                             capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (f"resumed epoch 0 at sample {state['samples_done']} of {SAMPLES} on {after} ranks "
            f"(was {before} ranks)") in resumed.stdout
    assert "warning" not in resumed.stdout + resumed.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = {record["step"]: record["epoch"] for record in records if record["kind"] == "train"}
    assert sorted(epochs) == list(range(1, stopped + rest + 3))  # no step twice, none missing
    assert min(step for step, epoch in epochs.items() if epoch == 1) == stopped + rest + 1

    epoch_0 = [key for batches in _rank_batches(first, before) for keys in batches for key in keys]
    epoch_0 += [key for batches in _rank_batches(second, after) for keys in batches[:rest] for key in keys]
    assert len(epoch_0) == (before * stopped + after * rest) * BATCH
    assert len(set(epoch_0)) == len(epoch_0)  # no sample trained twice in the epoch
    undelivered = SAMPLES - len(epoch_0)  # at most the new ranks' last partial batches beyond the usual drop
    assert undelivered - _uninterrupted_drop(clean_shards, before, BATCH) <= after * BATCH


def test_resume_with_another_seed_or_other_shards_is_one_error_line(clean_shards, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--out", str(out), *tiny(batch_size=BATCH), "--no-val", "--schedule-steps", "100"]
    assert train.main(["--shards", clean_shards, *common, "--steps", "2"]) == 0
    for extra, differs in ((["--shards", clean_shards, "--seed", "1"], "seed 0, this loader's 1"),
                           (["--shards", clean_shards.replace("{1..3}", "{1..2}")], "shards ")):
        capsys.readouterr()
        assert train.main([*extra, *common, "--steps", "4", "--resume"]) == 2
        err = capsys.readouterr().err
        assert f"train.py: error: the loader state is of another epoch plan: {differs}" in err
        assert err.count("\n") == 1, err
