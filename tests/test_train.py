"""train.py end to end on the tiny shards of conftest: learning, resume, DDP, bad input."""

import errno
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import train
from faults import file_size_limit
from helpers import (ROOT, TINY, TORCHRUN, assert_same_checkpoint_weights, assert_same_weights, run_train, tiny,
                     weights)
from model import UNet, UNetConfig, total_loss
from pipeline import Batch, PipelineError, make_loader, schema
from pipeline.shardreader import read_samples
from servers import free_port
from training import runfolder, steps
from training.options import LOSS_TERMS
from training.steps import prepare_batch

def test_overfitting_one_batch_drives_the_loss_down(shard_dir):
    batch = next(iter(make_loader(f"{shard_dir}/batch-{{1..2}}.tar", batch_size=2, workers=0,
                                  image_size=64, train=False)))
    torch.manual_seed(0)
    model = UNet(UNetConfig(width=4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, mask, depth = prepare_batch(batch, torch.device("cpu"))
    losses = []
    for _ in range(80):
        loss, _ = total_loss(*model(x), mask, depth)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 4, losses[::10]


def test_evaluate_passes_over_an_empty_batch(shard_dir):
    batch = next(iter(make_loader(f"{shard_dir}/val-1.tar", batch_size=2, workers=0, image_size=64, train=False)))
    empty = Batch({name: value[:0] for name, value in batch.items()})
    model = UNet(UNetConfig(width=4))

    def score(batches):
        return steps.evaluate(model, batches, torch.device("cpu"))[0]

    alone, with_empty = score([batch]), score([empty, batch, empty])
    assert with_empty == alone and with_empty["samples"] == 2


def test_val_shards_come_from_the_manifest_or_a_listing_that_must_not_fail_silently(shard_dir, tmp_path, monkeypatch):
    manifest = json.loads((shard_dir / schema.MANIFEST).read_text())
    as_map = {"shards": {e["name"]: e for e in manifest["shards"]}}  # the other form readers accept
    (tmp_path / schema.MANIFEST).write_text(json.dumps(as_map))
    assert runfolder.find_val_shards([f"{tmp_path}/batch-1.tar"], None, None) == [f"{tmp_path}/val-1.tar"]
    (tmp_path / schema.MANIFEST).unlink()
    assert runfolder.find_val_shards([f"{tmp_path}/batch-1.tar"], None, None) == []  # no val-*.tar: no validation
    shutil.copy(shard_dir / "val-1.tar", tmp_path)
    assert runfolder.find_val_shards([f"{tmp_path}/batch-1.tar"], None, None) == [f"{tmp_path}/val-1.tar"]

    def unreachable(pattern, storage_options=None):
        raise PipelineError(f"cannot list {pattern}: ConnectionError") from ConnectionRefusedError()

    monkeypatch.setattr(runfolder, "expand_urls", unreachable)
    with pytest.raises(PipelineError, match="--no-val"):
        runfolder.find_val_shards([f"{tmp_path}/batch-1.tar"], None, None)


@pytest.mark.parametrize("workers", ["0", "2"])
def test_three_steps_then_resume_three_equals_six_steps(shard_dir, tmp_path, workers):
    common = ("--no-val", "--workers", workers)
    assert run_train(shard_dir, tmp_path / "six", "--steps", "6", *common) == 0
    # The interrupted run plans the same 6-step LR schedule, stops at 3, then resumes.
    assert run_train(shard_dir, tmp_path / "split", "--steps", "3", "--schedule-steps", "6", *common) == 0
    assert run_train(shard_dir, tmp_path / "split", "--steps", "6", "--resume", *common) == 0
    assert_same_checkpoint_weights(tmp_path / "six" / "last.pt", tmp_path / "split" / "last.pt")
    logged = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]  # no step trained twice


def test_run_writes_checkpoints_metrics_previews_and_resume_extends_it(shard_dir, tmp_path):
    out = tmp_path / "run"
    assert run_train(shard_dir, out, "--steps", "2", "--val-every", "1", "--previews", "2") == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in val] == [1, 2]
    assert {"iou", "dice", "rmse", "abs_rel", "delta1", "loss"} <= val[0].keys()
    assert val[0]["samples"] > 0  # the val-*.tar beside the shards was found on its own
    assert sorted(p.name for p in (out / "previews").iterdir()) == ["step-1.png", "step-2.png"]
    best = torch.load(out / "best.pt", weights_only=False)
    assert best["step"] in (1, 2) and best["model_config"] == UNetConfig(width=4).to_dict()
    assert not list(out.glob("*.tmp"))
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert run_train(shard_dir, out, "--steps", "4", "--resume", "--no-val") == 0
    assert torch.load(out / "last.pt", weights_only=False)["step"] == 4


def test_time_budget_stops_early_with_a_checkpoint_and_a_validation(shard_dir, tmp_path):
    out = tmp_path / "run"
    assert run_train(shard_dir, out, "--steps", "1000", "--minutes", "0.0001") == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["kind"] == "val" and records[-1]["step"] == 1
    assert torch.load(out / "last.pt", weights_only=False)["step"] == 1


def test_torchrun_two_cpu_processes_finish_the_same_steps(shard_dir, tmp_path):
    world, batch_size, epochs = 2, 2, 2
    manifest = json.loads((shard_dir / schema.MANIFEST).read_text())
    train_samples = sum(e["samples"] for e in manifest["shards"] if e["split"] == schema.TRAIN_SPLIT)
    # Train keeps whole batches of the smaller rank's equal share of the epoch.
    steps_per_epoch = train_samples // world // batch_size
    command = [TORCHRUN, "--standalone", f"--nproc_per_node={world}", str(ROOT / "tests" / "ddp_probe.py"),
               str(tmp_path), "--shards", f"{shard_dir}/batch-{{1..2}}.tar", "--out", str(tmp_path / "ddp"),
               *tiny(batch_size=batch_size), "--epochs", str(epochs)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    # The two ranks share one stdout, so their lines can run into each other: match, don't split.
    finished = re.findall(r"rank (\d)/2: finished at step (\d+)", done.stdout)
    assert sorted(finished) == [("0", str(epochs * steps_per_epoch)), ("1", str(epochs * steps_per_epoch))], \
        done.stdout
    assert torch.load(tmp_path / "ddp" / "last.pt", weights_only=False)["step"] == epochs * steps_per_epoch
    ranks = [torch.load(tmp_path / f"rank-{rank}.pt", weights_only=False) for rank in range(world)]
    shard_keys = {s.key for name in ("batch-1.tar", "batch-2.tar") for s in read_samples(str(shard_dir / name), 0)}
    for epoch in range(epochs):
        seen = [[key for keys in rank["batches"][epoch * steps_per_epoch:(epoch + 1) * steps_per_epoch]
                 for key in keys] for rank in ranks]
        assert [len(keys) for keys in seen] == [steps_per_epoch * batch_size] * world  # spares stand in for bad ones
        assert len(set(seen[0] + seen[1])) == len(seen[0] + seen[1])  # no sample on both ranks, nor twice on one
        assert set(seen[0] + seen[1]) <= shard_keys
    assert [len(rank["batches"]) for rank in ranks] == [epochs * steps_per_epoch] * world
    assert_same_weights(ranks[0]["parameters"], ranks[1]["parameters"])  # DDP kept the replicas in step
    assert_same_weights(ranks[0]["parameters"], {name: value for name, value in
                                                 weights(tmp_path / "ddp" / "last.pt").items()
                                                 if name in ranks[0]["parameters"]})


# case: (extra arguments, what the error line must name); the last of a repeated option wins.
BAD_VALUES = {
    "lr-nan": (["--lr", "nan"], "--lr"),
    "lr-inf": (["--lr", "inf"], "--lr"),
    "weight-decay": (["--weight-decay", "-1"], "--weight-decay"),
    "warmup": (["--warmup-steps", "-3"], "--warmup-steps"),
    "w-bce": (["--w-bce", "-1"], "--w-bce"),
    "w-dice": (["--w-dice", "nan"], "--w-dice"),
    "all-weights-zero": ([f"--w-{term}=0" for term in LOSS_TERMS], "all loss weights are 0"),
    "minutes": (["--minutes", "nan"], "--minutes"),
    "retries": (["--retries", "1000"], "--retries"),
    "seed": (["--seed", "-1"], "--seed"),
    "image-size-multiple": (["--image-size", "80"], "image size 80"),
    "image-size-huge": (["--image-size", "100000"], "--image-size 100000"),
    "width-huge": (["--width", "100000"], "--width 100000"),
    "unknown-option": (["--learning-rate", "1"], "--learning-rate"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_fail_before_the_first_step_with_one_line_naming_them(case, shard_dir, tmp_path, capsys):
    extra, named = BAD_VALUES[case]
    assert run_train(shard_dir, tmp_path / "run", "--steps", "2", "--no-val", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("train.py: error:") and named in err, err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # not one step was taken


def test_a_compact_set_without_its_backgrounds_fails_with_one_line_naming_the_file(compact_dir, tmp_path, capsys):
    shards = tmp_path / "shards"
    shutil.copytree(compact_dir, shards, ignore=shutil.ignore_patterns(schema.BACKGROUNDS))
    args = ["--shards", f"{shards}/batch-{{1..2}}.tar", "--out", str(tmp_path / "run"), *TINY, "--steps", "2", "--no-val"]
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("train.py: error:"), err
    assert str(shards / schema.BACKGROUNDS) in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("case", ["no-match", "unreachable", "unwritable", "other-model", "val-not-tar", "val-empty",
                                  "val-unreachable"])
def test_bad_input_fails_with_one_line_naming_it(case, shard_dir, tmp_path, capsys):
    out, shards = tmp_path / "run", f"{shard_dir}/batch-{{1..2}}.tar"
    extra, named = ["--no-val"], None
    if case == "no-match":
        shards, named = f"{tmp_path}/missing-{{1..2}}.tar", "missing-1.tar"
    elif case == "unreachable":
        port = free_port()
        shards, named = f"http://127.0.0.1:{port}/batch-{{1..2}}.tar", f"127.0.0.1:{port}"
        extra += ["--retries", "0"]
    elif case == "unwritable":
        (tmp_path / "file").write_text("")
        out, named = tmp_path / "file" / "run", str(tmp_path / "file" / "run")
    elif case == "other-model":
        assert run_train(shard_dir, out, "--steps", "1", "--no-val") == 0
        capsys.readouterr()
        extra, named = ["--no-val", "--resume", "--width", "8"], str(out / "last.pt")
    elif case == "val-not-tar":  # found at start-up, not at the first validation
        extra, named = ["--val-shards", str(shard_dir / schema.MANIFEST)], str(shard_dir / schema.MANIFEST)
    elif case == "val-empty":
        (tmp_path / "val-1.tar").write_bytes(b"")
        extra, named = ["--val-shards", str(tmp_path / "val-1.tar")], str(tmp_path / "val-1.tar")
    else:
        url = f"http://127.0.0.1:{free_port()}/val-1.tar"
        extra, named = ["--val-shards", url, "--retries", "0"], url
    args = ["--shards", shards, "--out", str(out), *TINY, "--steps", "2", *extra]  # last one wins
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("train.py: error:"), err
    assert named in err


def test_storage_options_parse_json_values_and_stay_out_of_checkpoints(shard_dir, tmp_path):
    out = tmp_path / "run"
    options = ["--storage-option", "secret=hunter2", "--storage-option", 'client_kwargs={"region_name": "x"}']
    args = train.parse_args(["--shards", "s", *options])
    assert args.storage_options == {"secret": "hunter2", "client_kwargs": {"region_name": "x"}}
    assert run_train(shard_dir, out, "--steps", "1", "--no-val", *options) == 0  # local files ignore them
    assert b"hunter2" not in (out / "last.pt").read_bytes()
    assert torch.load(out / "last.pt", weights_only=False)["args"]["storage_options"] == ["client_kwargs", "secret"]


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_leaves_no_temporary(shard_dir, tmp_path):
    out = tmp_path / "run"
    # A checkpoint at width 4 is 3.8 MB; metrics.jsonl and the TensorBoard events stay far below 1 MiB.
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--shards", f"{shard_dir}/batch-{{1..2}}.tar",
                           "--out", str(out), *TINY, "--steps", "2", "--no-val"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, preexec_fn=file_size_limit(1 << 20))
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-3000:]
    assert errors[0] == f"train.py: error: cannot write checkpoint {out / 'last.pt'}: {os.strerror(errno.EFBIG)}"
    assert not list(out.glob("last.pt*"))
