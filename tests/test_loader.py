"""make_loader end to end on the converter's shards: splitting, determinism, faults, augmentation."""

import io
import json
import multiprocessing
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch.nn import functional as nn_functional

import convert_zips
from helpers import copy_backgrounds
from pipeline import Batch, PipelineError, make_loader, schema
from pipeline.augment import AUG_FIELDS, apply

SIZE = 32  # output side: small keeps the suite fast, and differs from the 64 px input


def _manifest(folder):
    return json.loads((folder / schema.MANIFEST).read_text())


def _names(folder, split_prefix):
    return [e["name"] for e in _manifest(folder)["shards"] if e["name"].startswith(split_prefix + "-")]


def _all_shards(folder):
    return [str(folder / e["name"]) for e in _manifest(folder)["shards"]]


def _shard_keys(path):
    with tarfile.open(path) as tar:
        return {schema.split_member(name)[0] for name in tar.getnames()}


@pytest.fixture(scope="module")
def one_shard_dir(seed_dataset, shard_options, tmp_path_factory):
    """The same seed dataset as a single training shard (fewer shards than ranks x workers)."""
    out = tmp_path_factory.mktemp("one-shard")
    convert_zips.convert(seed_dataset[0], out, **{**shard_options, "shards": 1, "val_fraction": 0})
    return out


class RankEpoch(NamedTuple):
    """One rank's epoch: the batch count its loader planned, the batches it gave, the loader."""

    planned: int
    batches: list
    loader: object


def _run_ranks(urls, world_size=2, **kwargs) -> list[RankEpoch]:
    """Every rank's epoch; ranks simulated by passing rank/world_size."""
    loaders = [make_loader(urls, rank=r, world_size=world_size, image_size=SIZE, **kwargs)
               for r in range(world_size)]
    return [RankEpoch(len(loader), list(loader), loader) for loader in loaders]


def _keys(batches):
    return [key for batch in batches for key in batch["key"]]


@pytest.mark.parametrize("which", ["unequal shards", "one shard"])
def test_eval_delivers_every_good_key_once_over_2_ranks_x_2_workers(which, shard_dir, one_shard_dir, seed_dataset):
    urls = _all_shards(shard_dir) if which == "unequal shards" else _all_shards(one_shard_dir)
    truncated = set(seed_dataset[1]["faults"]["truncated"])
    expected = set().union(*map(_shard_keys, urls))
    ranks = _run_ranks(urls, batch_size=2, workers=2, train=False)
    assert ranks[0].planned == ranks[1].planned == len(ranks[0].batches) == len(ranks[1].batches)
    delivered = _keys(ranks[0].batches) + _keys(ranks[1].batches)
    assert len(delivered) == len(set(delivered))
    assert set(delivered) == expected - truncated
    skipped = [record for rank in ranks for record in rank.loader.skipped]
    assert [r["key"] for r in skipped] == sorted(truncated)
    assert "truncated" in skipped[0]["reason"] and skipped[0]["shard"] in urls
    assert sum(rank.loader.stats["samples"] for rank in ranks) == len(expected) - 1


def test_train_equal_batches_and_no_sample_twice(one_shard_dir):
    ranks = _run_ranks(_all_shards(one_shard_dir), batch_size=3, workers=2, train=True)
    assert ranks[0].planned == ranks[1].planned == len(ranks[0].loader) > 0
    for rank in ranks:
        assert len(rank.batches) == rank.planned
        assert all(len(batch["key"]) == 3 for batch in rank.batches)  # spares replace the bad sample
        assert rank.loader.num_samples == 3 * rank.planned
    delivered = _keys(ranks[0].batches) + _keys(ranks[1].batches)
    assert len(delivered) == len(set(delivered))


def _batches(urls, **kwargs):
    return list(make_loader(urls, batch_size=2, workers=2, image_size=SIZE, train=True, seed=5, **kwargs))


def test_same_arguments_same_batches_and_start_batch_gives_the_tail(shard_dir):
    urls = [str(shard_dir / name) for name in _names(shard_dir, schema.TRAIN_PREFIX)]
    first, again = _batches(urls), _batches(urls)
    for start in (1, 3):
        resumed = _batches(urls, start_batch=start)
        assert len(resumed) == len(first) - start
        for a, b in zip(first[start:], resumed):
            assert a["key"] == b["key"]
            assert all(torch.equal(a[f], b[f]) for f in ("bg", "bgfg", "mask", "depth"))
    assert [b["key"] for b in first] == [b["key"] for b in again]
    assert all(torch.equal(a["bgfg"], b["bgfg"]) for a, b in zip(first, again))
    assert [b["key"] for b in _batches(urls, epoch=1)] != [b["key"] for b in first]


def _iou(a, b):
    return ((a & b).sum() / (a | b).sum()).item()


def test_augmentation_keeps_the_four_images_aligned(shard_dir):
    urls = [str(shard_dir / name) for name in _names(shard_dir, schema.TRAIN_PREFIX)]
    loader = make_loader(urls, batch_size=4, workers=0, image_size=48, train=True, seed=1)
    aligned, shifted, flips, crops = [], [], 0, 0
    for batch in loader:
        assert batch["bg"].shape[1:] == batch["bgfg"].shape[1:] == (3, 48, 48)
        assert batch["mask"].shape[1:] == batch["depth"].shape[1:] == (1, 48, 48)
        assert batch["mask"].dtype == batch["depth"].dtype == torch.uint8
        assert batch["aug"].shape == (len(batch["key"]), len(AUG_FIELDS))
        flips += int(batch["aug"][:, AUG_FIELDS.index("flip")].sum())
        crops += int((batch["aug"][:, AUG_FIELDS.index("height")] < 1).sum())
        assert isinstance(batch, Batch) and batch.augmented
        images = batch.to("cpu")
        assert set(images["mask"].unique().tolist()) <= {0.0, 1.0}
        # The pasted object is where bg and bgfg differ, so the composite recovers the mask.
        changed = (images["bgfg"] - images["bg"]).abs().amax(1, keepdim=True) > 40
        mask = images["mask"].bool()
        for i in range(len(mask)):
            aligned.append(_iou(changed[i], mask[i]))
            shifted.append(_iou(changed[i], mask[i].flip(-1)))
            # The object is nearer (smaller depth) than the background around it.
            assert images["depth"][i][mask[i]].mean() < images["depth"][i][~mask[i]].mean()
    assert flips > 0 and crops > 0  # the draws really move the images
    assert min(aligned) > 0.6
    assert sum(aligned) / len(aligned) > sum(shifted) / len(shifted) + 0.3


def _draw(**fields) -> list[float]:
    """One augmentation draw as an AUG_FIELDS row: the fields given, the rest leaving images as they are."""
    unchanged = dict(flip=0.0, top=0.0, left=0.0, height=1.0, width=1.0, brightness=1.0, contrast=1.0, saturation=1.0)
    assert fields.keys() <= unchanged.keys() and unchanged.keys() == set(AUG_FIELDS)
    return [float({**unchanged, **fields}[name]) for name in AUG_FIELDS]


def test_device_augmentation_crops_flips_and_jitters_as_drawn():
    ramp = torch.arange(64.0).view(1, 1, 8, 8)
    images = {"bg": ramp.repeat(2, 3, 1, 1), "bgfg": ramp.repeat(2, 3, 1, 1) + 1,
              "mask": (ramp > 30).float().repeat(2, 1, 1, 1), "depth": ramp.repeat(2, 1, 1, 1)}
    same = _draw()
    flipped_half = _draw(flip=1, left=0.5, width=0.5, brightness=1.2)  # right half, mirrored, brighter
    out = apply(images, torch.tensor([same, flipped_half]))
    assert torch.equal(out["depth"][0], ramp[0]) and torch.equal(out["mask"][0], images["mask"][0])
    right_half_mirrored = ramp[0, :, :, 4:].flip(-1)
    assert torch.allclose(out["depth"][1][..., ::2], right_half_mirrored, atol=0.51)
    assert set(out["mask"].unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(out["bgfg"][1] - out["bg"][1], torch.full_like(out["bg"][1], 1.2), atol=1e-4)


def test_a_soft_mask_is_resampled_as_the_images_are_and_is_fractional_only_along_the_outline():
    square = torch.zeros(2, 1, 16, 16)
    square[..., 4:10, 5:11] = 1
    images = {"bg": square.repeat(1, 3, 1, 1), "bgfg": square.repeat(1, 3, 1, 1), "mask": square, "depth": square * 255}
    draws = torch.tensor([_draw(), _draw(top=0.03, left=0.05, height=0.9, width=0.9)])  # off the pixel grid
    soft, hard = apply(images, draws, soft_mask=True), apply(images, draws)
    torch.testing.assert_close(soft["mask"] * 255, soft["depth"])
    torch.testing.assert_close(soft["mask"][0], square[0])  # uncropped: the mask as it was
    assert torch.equal(hard["mask"], hard["mask"].round())
    partial = (soft["mask"][1] > 0) & (soft["mask"][1] < 1)
    assert partial.any()
    dilated = nn_functional.max_pool2d(hard["mask"][1], 3, 1, 1)
    eroded = -nn_functional.max_pool2d(-hard["mask"][1], 3, 1, 1)
    assert not (partial & (dilated == eroded)).any()  # each within a pixel of the nearest mask's outline


def test_jitter_with_contrast_keeps_bgfg_minus_bg_zero_outside_the_object():
    generator = torch.Generator().manual_seed(0)
    bg = torch.rand(2, 3, 16, 16, generator=generator) * 200
    obj = torch.zeros(2, 1, 16, 16)
    obj[..., 4:9, 2:7] = 1  # the pasted object: a bright square on the left
    bgfg = torch.where(obj.bool(), torch.full_like(bg, 250.0), bg)
    images = {"bg": bg, "bgfg": bgfg, "mask": obj, "depth": bg[:, :1]}
    # Uncropped, one of them flipped; contrast != 1 both times, where a jitter
    # computed from each image's own statistics would leave bg and bgfg apart outside the object.
    draws = torch.tensor([_draw(brightness=1.1, contrast=0.7, saturation=0.8),
                          _draw(flip=1, brightness=0.9, contrast=1.3, saturation=1.2)])
    out = apply(images, draws)
    outside = out["mask"] == 0
    difference = (out["bgfg"] - out["bg"]).abs()
    assert torch.equal(out["mask"][1], obj[1].flip(-1))
    assert difference.masked_select(outside.expand_as(difference)).max() < 1e-3
    assert difference.masked_select(~outside.expand_as(difference)).min() > 1  # the object still shows
    assert not torch.allclose(out["bg"], bg.clamp(0, 255))  # the jitter did change the images


def _rewrite(src, dst, change):
    """Copy a shard, letting change(key, suffix, data) return new bytes or None (drop)."""
    with tarfile.open(src) as tar_in, tarfile.open(dst, "w", format=tarfile.USTAR_FORMAT) as tar_out:
        for member in tar_in:
            data = change(*schema.split_member(member.name), tar_in.extractfile(member).read())
            if data is not None:
                member.size = len(data)
                tar_out.addfile(member, io.BytesIO(data))


def test_missing_member_and_non_jpeg_are_skipped_counted_and_named(shard_dir, tmp_path):
    src = shard_dir / _names(shard_dir, schema.VAL_PREFIX)[0]
    keys = sorted(_shard_keys(src))
    broken = {keys[0]: schema.MASK, keys[1]: schema.DEPTH}

    def change(key, suffix, data):
        if broken.get(key) == suffix:
            return None if key == keys[0] else b"not a jpeg at all"
        return data

    _rewrite(src, tmp_path / "val-1.tar", change)
    copy_backgrounds(shard_dir, tmp_path)
    loader = make_loader(str(tmp_path / "val-1.tar"), batch_size=4, workers=1, image_size=SIZE,
                         train=False, shard_sizes=[len(keys)])
    delivered = _keys(loader)
    assert sorted(delivered) == keys[2:]
    assert len(loader) == -(-len(keys) // 4)
    reasons = {r["key"]: r["reason"] for r in loader.skipped}
    assert reasons == {keys[0]: f"missing member {schema.MASK}", keys[1]: f"{schema.DEPTH} is not a JPEG"}
    counts = {name: loader.stats[name] for name in ("batches", "samples", "skipped")}
    assert counts == {"batches": len(loader), "samples": len(keys) - 2, "skipped": 2}
    assert all(loader.stats[stage] > 0 for stage in ("read_s", "decode_s", "fit_s", "wait_s"))


def test_bad_patterns_and_unreadable_first_shard_fail_before_the_first_batch(shard_dir, tmp_path):
    pattern = str(shard_dir / "nothing-*.tar")
    with pytest.raises(PipelineError, match="nothing-"):
        make_loader(pattern, batch_size=2, workers=0)
    missing = str(shard_dir / "batch-{1..9}.tar")
    with pytest.raises(PipelineError, match="batch-3.tar"):
        make_loader(missing, batch_size=2, workers=0)
    empty = tmp_path / "batch-1.tar"
    empty.write_bytes(b"")
    with pytest.raises(PipelineError, match="batch-1.tar"):
        make_loader(str(empty), batch_size=2, workers=0, shard_sizes=[4])
    with pytest.raises(PipelineError, match="cannot fill one batch"):
        make_loader(str(shard_dir / "val-1.tar"), batch_size=100, workers=0)


def test_a_shard_lost_mid_epoch_raises_one_line_naming_it(shard_dir, tmp_path):
    for name in _names(shard_dir, schema.TRAIN_PREFIX):
        (tmp_path / name).write_bytes((shard_dir / name).read_bytes())
    loader = make_loader(str(tmp_path / f"{schema.TRAIN_PREFIX}-*.tar"), batch_size=2, workers=2,
                         image_size=SIZE, train=False, shard_sizes=[8, 9], retries=0)
    (tmp_path / schema.shard_name(schema.TRAIN_PREFIX, 2)).unlink()  # after the plan was made
    before = set(multiprocessing.active_children())
    with pytest.raises(PipelineError) as error:
        list(loader)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"cannot read {tmp_path}/batch-2.tar")
    # The pass's workers end with it, although the error's traceback still holds their DataLoader.
    assert set(multiprocessing.active_children()) - before == set()


# A script's unfinished pass often lives until the interpreter exits, whether the script ends
# or fails. multiprocessing then sends the workers SIGTERM and waits for them, and a worker
# ignores SIGTERM while its pool is open: the exit must not wait on it for good.
_LEFT_OPEN = """
import sys
from pipeline import make_loader
batches = iter(make_loader(sys.argv[1], batch_size=1, workers=2, image_size=32, train=False))
batch = next(batches)  # the pass is left unfinished, its workers running
print(len(batch["key"]), flush=True)
if sys.argv[2] == "raise":
    raise RuntimeError("the script failed")
"""


@pytest.mark.parametrize("ending", ["end", "raise"])
def test_a_script_that_exits_without_closing_its_loader_exits(ending, shard_dir):
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", _LEFT_OPEN, str(shard_dir / "val-1.tar"), ending],
                          cwd=root, capture_output=True, text=True, timeout=60)
    assert done.stdout == "1\n"
    if ending == "end":
        assert done.returncode == 0, done.stderr
    else:
        assert done.returncode == 1 and done.stderr.rstrip().endswith("RuntimeError: the script failed")


@pytest.mark.parametrize("workers", [0, 2])
def test_a_shard_shorter_than_planned_gives_every_planned_batch_and_no_sample_twice(shard_dir, workers):
    url = str(shard_dir / _names(shard_dir, schema.TRAIN_PREFIX)[0])
    actual = _manifest(shard_dir)["shards"][0]["samples"]
    loader = make_loader(url, batch_size=2, workers=workers, image_size=SIZE, train=True,
                         shard_sizes=[actual + 6])  # a manifest that counts 6 samples too many
    batches = list(loader)
    assert len(batches) == len(loader) == (actual + 6) // 2  # no rank may take fewer steps
    delivered = _keys(batches)
    assert len(delivered) == len(set(delivered)) == actual  # every sample once, none repeated
    sizes = [len(batch["key"]) for batch in batches]
    assert 0 in sizes and max(sizes) == 2  # the stream ran dry: the last batches shrank, to empty
    empty = next(batch for batch in batches if not batch["key"])
    assert empty["bgfg"].shape == (0, 3, SIZE, SIZE) and empty["aug"].shape == (0, len(AUG_FIELDS))
    assert any("samples" in record["reason"] and "expected" in record["reason"] for record in loader.skipped)


def _rank_keys(rank, world_size, init_file, urls, out):
    """One gloo rank: rank and world size come from torch.distributed, not from arguments."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world_size)
    try:
        loader = make_loader(urls, batch_size=2, workers=1, image_size=SIZE, train=False)
        out.put((rank, len(loader), _keys(loader)))
    finally:
        torch.distributed.destroy_process_group()


def test_rank_and_world_size_come_from_torch_distributed(one_shard_dir, seed_dataset, tmp_path):
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    urls = _all_shards(one_shard_dir)
    ranks = [context.Process(target=_rank_keys, args=(r, 2, tmp_path / "init", urls, out)) for r in range(2)]
    for process in ranks:
        process.start()
    results = sorted(out.get(timeout=60) for _ in ranks)
    for process in ranks:
        process.join(timeout=30)
        assert process.exitcode == 0
    (_, length0, keys0), (_, length1, keys1) = results
    assert length0 == length1
    assert not set(keys0) & set(keys1) and keys0 and keys1
    truncated = set(seed_dataset[1]["faults"]["truncated"])
    assert set(keys0) | set(keys1) == set().union(*map(_shard_keys, urls)) - truncated
