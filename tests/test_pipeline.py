"""Pipeline: workers that live across passes, batch memory that is reused but never under a
batch still held, corrupt JPEG data skipped, and the train step on an empty batch under DDP."""

import io
import multiprocessing
import random
import tarfile

import pytest
import torch

from helpers import copy_backgrounds
from model import UNet, UNetConfig
from pipeline import Pipeline, make_loader, schema
from pipeline.decode import BadSample, Decoder
from pipeline.shardreader import read_samples

SIZE = 32
IMAGES = ("bg", "bgfg", "mask", "depth")


def _train_urls(shard_dir):
    return [str(shard_dir / "batch-1.tar"), str(shard_dir / "batch-2.tar")]


def _worker_pids() -> set[int]:
    return {process.pid for process in multiprocessing.active_children()}


def _same_batches(a, b) -> bool:
    return [x["key"] for x in a] == [y["key"] for y in b] and all(
        torch.equal(x[f], y[f]) for x, y in zip(a, b) for f in IMAGES)


def _cloned(batches):
    return [{f: (batch[f].clone() if f != "key" else batch[f]) for f in (*IMAGES, "key")} for batch in batches]


def test_workers_live_across_epochs_and_validations_and_give_make_loaders_batches(shard_dir):
    options = dict(batch_size=2, workers=2, image_size=SIZE, seed=3)
    with Pipeline(_train_urls(shard_dir), train=True, **options) as train, \
            Pipeline(str(shard_dir / "val-1.tar"), train=False, **options) as val:
        before = _worker_pids()
        epoch0 = _cloned(train.epoch(0))
        train_pids = _worker_pids() - before
        first_val = _cloned(val.epoch(0))
        val_pids = _worker_pids() - before - train_pids
        epoch1 = _cloned(train.epoch(1))
        second_val = _cloned(val.epoch(0))
        assert len(train_pids) == len(val_pids) == 2
        assert _worker_pids() - before == train_pids | val_pids  # no process started after the first passes
    assert _same_batches(epoch0, _cloned(make_loader(_train_urls(shard_dir), train=True, epoch=0, **options)))
    assert _same_batches(epoch1, _cloned(make_loader(_train_urls(shard_dir), train=True, epoch=1, **options)))
    assert [b["key"] for b in epoch0] != [b["key"] for b in epoch1]
    assert _same_batches(first_val, second_val)
    assert not _worker_pids() & (train_pids | val_pids)  # close() ended them


@pytest.mark.parametrize("workers", [0, 2])
def test_a_pass_left_midway_resumes_where_it_stopped_and_a_restart_matches_start_batch(shard_dir, workers):
    options = dict(batch_size=2, workers=workers, image_size=SIZE, seed=1)
    whole = _cloned(make_loader(_train_urls(shard_dir), train=True, epoch=2, **options))
    with Pipeline(_train_urls(shard_dir), train=True, **options) as train:
        head = []
        for batch in train.epoch(2):
            head.append(batch)
            if len(head) == 3:
                break  # e.g. a validation in the middle of an epoch
        tail = train.epoch(2, start_batch=3)  # continues the running stream
        assert _same_batches(whole, _cloned(head) + _cloned(tail))
        restarted = train.epoch(2, start_batch=1)  # not where the stream is: a new pass
        assert _same_batches(whole[1:], _cloned(restarted))
        assert len(restarted) == len(whole) - 1


def test_batches_kept_by_the_consumer_are_never_overwritten(shard_dir):
    options = dict(batch_size=1, workers=1, image_size=SIZE, train=True, seed=2)
    one_by_one = _cloned(make_loader(_train_urls(shard_dir), **options))  # buffers reused as batches are dropped
    kept = list(make_loader(_train_urls(shard_dir), **options))  # more batches than buffers: all held at once
    assert len(kept) > 8
    assert _same_batches(one_by_one, kept)


def _flip_bits_in_scan(data: bytes, seed: int) -> bytes:
    """A JPEG with bytes of its entropy-coded data flipped; SOI..EOI markers kept."""
    damaged, rng = bytearray(data), random.Random(seed)
    scan = data.find(b"\xff\xda") + 20
    for _ in range(8):
        i = rng.randrange(scan, len(data) - 4)
        damaged[i] ^= 0xFF if damaged[i] not in (0x00, 0xFF) else 0x0F
    return bytes(damaged)


def test_corrupt_jpeg_data_is_a_counted_skip_with_libjpegs_reason(shard_dir, tmp_path):
    with tarfile.open(shard_dir / "val-1.tar") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    victim = schema.split_member(members[0][0].name)[0]
    # The victim's four images as the pipeline reads them (a compact sample's background included).
    sample = next(s.members for s in read_samples(str(shard_dir / "val-1.tar"), 0) if s.key == victim)
    out = {name: torch.empty(SIZE, SIZE, 3 if name in (schema.BG, schema.BGFG) else 1, dtype=torch.uint8).numpy()
           for name in schema.IMAGE_MEMBERS}

    def noticed(candidate):  # not every flip is one libjpeg notices; no decoder can tell the others
        try:
            Decoder(SIZE).decode_into({**sample, schema.BGFG: candidate}, out)
        except BadSample:
            return True
        return False

    damaged = next(c for c in (_flip_bits_in_scan(sample[schema.BGFG], seed) for seed in range(50)) if noticed(c))
    assert damaged.startswith(b"\xff\xd8") and damaged.endswith(b"\xff\xd9")  # the cheap checks pass it
    with tarfile.open(tmp_path / "val-1.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            data = damaged if member.name == f"{victim}.{schema.BGFG}" else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    copy_backgrounds(shard_dir, tmp_path)
    count = len({schema.split_member(m.name)[0] for m, _ in members})
    for train in (False, True):
        loader = make_loader(str(tmp_path / "val-1.tar"), batch_size=2, workers=1, image_size=SIZE, train=train,
                             shard_sizes=[count])
        delivered = [key for batch in loader for key in batch["key"]]
        assert victim not in delivered and len(delivered) == len(set(delivered)) > 0
        [record] = loader.skipped
        assert record["key"] == victim and loader.stats["skipped"] == 1
        assert record["reason"].startswith(f"{schema.BGFG} does not decode: Corrupt JPEG data")
        assert ".cpp" not in record["reason"] and "\n" not in record["reason"]


def _ddp_step(rank, init_file, batches, out):
    """One DDP (gloo) train step on this rank's batch; sends back the weights."""
    from torch.nn.parallel import DistributedDataParallel

    from training.steps import train_step

    torch.set_num_threads(1)  # forked from a process whose OpenMP pool may be in use: it does not survive fork
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = UNet(UNetConfig(width=4))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # linear in the gradient: thread counts cannot flip a step
        x, mask, depth = batches[rank]
        train_step(DistributedDataParallel(model), optimizer, torch.amp.GradScaler("cpu", enabled=False), x, mask, depth)
        out.put((rank, {k: v.numpy().copy() for k, v in model.state_dict().items()}))  # by value: this process ends
    finally:
        torch.distributed.destroy_process_group()


def test_an_empty_batch_on_one_ddp_rank_steps_with_the_others_samples_alone(tmp_path):
    from training.steps import train_step

    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 6, SIZE, SIZE, generator=generator)
    mask = (torch.rand(2, 1, SIZE, SIZE, generator=generator) > 0.5).float()
    depth = torch.rand(2, 1, SIZE, SIZE, generator=generator)
    empty = (x[:0], mask[:0], depth[:0])
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    ranks = [context.Process(target=_ddp_step, args=(r, tmp_path / "init", [(x, mask, depth), empty], out))
             for r in range(2)]
    for process in ranks:
        process.start()
    states = {rank: {k: torch.from_numpy(v) for k, v in state.items()} for rank, state in
              (out.get(timeout=120) for _ in ranks)}
    for process in ranks:
        process.join(timeout=60)
        assert process.exitcode == 0
    torch.manual_seed(0)
    alone = UNet(UNetConfig(width=4))  # the same step on rank 0's samples in one process
    train_step(alone, torch.optim.SGD(alone.parameters(), lr=0.1), torch.amp.GradScaler("cpu", enabled=False),
               x, mask, depth)
    torch.manual_seed(0)
    untouched = UNet(UNetConfig(width=4)).state_dict()
    for name, value in alone.state_dict().items():
        torch.testing.assert_close(states[0][name], value, rtol=1e-4, atol=1e-6, msg=name)
    for name, _ in alone.named_parameters():  # (BatchNorm statistics reach rank 1 at DDP's next forward)
        torch.testing.assert_close(states[1][name], states[0][name], msg=name)
    assert any(not torch.equal(states[0][name], value) for name, value in untouched.items())  # it did step


def test_a_step_where_every_batch_is_empty_leaves_the_weights_alone():
    from training.steps import train_step

    torch.manual_seed(0)
    model = UNet(UNetConfig(width=4))
    before = {k: v.clone() for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
    loss, terms = train_step(model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1),
                             torch.amp.GradScaler("cpu", enabled=False), torch.zeros(0, 6, SIZE, SIZE),
                             torch.zeros(0, 1, SIZE, SIZE), torch.zeros(0, 1, SIZE, SIZE))
    assert float(loss) == 0.0 and terms is None
    after = model.state_dict()
    assert all(torch.equal(value, after[name]) for name, value in before.items())
