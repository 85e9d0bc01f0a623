"""Scaled JPEG decode: a 224 px member decoded by libjpeg at 1/2, 1/4 or 1/8 and then fitted
is within JPEG-decoder tolerance of decoding it whole and resizing; masks, decoded whole, are
the same 0/1 pixels; depth maps (grey, colour-mapped, half-size) keep their orientation and
range; the same bytes give the same pixels; scaled_decode=False (train.py --no-scaled-decode) gives today's bytes."""

import numpy as np
import pytest
import simplejpeg
import torch
from torch.nn import functional as nn_functional

import convert_zips
from pipeline import make_loader, schema
from pipeline.batchmemory import FIELDS
from pipeline.decode import CHANNELS, COLORSPACES, MASK_THRESHOLD, Decoder, scaled_shape
from pipeline.shardreader import read_samples
from seedzips import synthetic
from training.options import build_parser

MEMBER = 224
# 1/2 (exactly), 1/2 then fit, 1/4 (exactly), 1/4 then fit, 1/8 then fit
SIZES = (112, 64, 56, 48, 20)
# Measured on this data, per member and size: the mean absolute difference 0.1-1.3 grey levels,
# its 99th percentile 1-12, the largest 69, at the pasted object's edges (libjpeg's reduced
# inverse DCT is sharper there than the antialiased bilinear resize from full size).
MEAN_TOLERANCE, P99_TOLERANCE, MAX_TOLERANCE = 2.0, 20, 96


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """The members of 3 x 4 x 2 = 24 samples at 224 px with grey, colour-mapped and half-size depth."""
    base = tmp_path_factory.mktemp("scaled")
    synthetic.generate(base / "seed", zips=1, bgs_per_zip=3, fg=4, placements=2, seed=4, image_size=MEMBER,
                       depth="mixed")
    convert_zips.convert(base / "seed", base / "shards", shards=1, val_fraction=0, progress=False)
    url = str(base / "shards" / "batch-1.tar")
    members = {sample.key: sample.members for sample in read_samples(url, 0, None)}
    assert len(members) == 24 and all(len(m) == 4 for m in members.values())
    return url, members


def _depth_kind(data: bytes) -> str:
    height, _, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    return "half" if height < MEMBER else "colour" if colorspace != "Gray" else "grey"


def _decode(decoder: Decoder, members: dict, size: int) -> dict[str, np.ndarray]:
    out = {name: np.empty((size, size, channels), np.uint8) for name, channels in CHANNELS.items()}
    decoder.decode_into(members, out)
    return out


def _todays_decode(members: dict, size: int) -> dict[str, np.ndarray]:
    """The decode before scaled decode, written out: whole JPEG, F.interpolate, threshold."""
    out = {}
    for name, space in COLORSPACES.items():
        image = simplejpeg.decode_jpeg(members[name], space)
        if image.shape[0] != size:
            chw = torch.from_numpy(image).permute(2, 0, 1)[None]
            mode = dict(mode="nearest-exact") if name == schema.MASK else dict(mode="bilinear", antialias=True)
            image = nn_functional.interpolate(chw, size=(size, size), **mode)[0].permute(1, 2, 0).numpy()
        out[name] = (image > MASK_THRESHOLD).astype(np.uint8) if name == schema.MASK else image
    return out


def test_scaled_shape_is_the_smallest_power_of_two_reduction_that_covers_the_size():
    assert scaled_shape(224, 224, (112, 112)) == (112, 112)
    assert scaled_shape(224, 224, (64, 64)) == (112, 112)
    assert scaled_shape(224, 224, (56, 56)) == (56, 56)
    assert scaled_shape(224, 224, (20, 20)) == (28, 28)
    assert scaled_shape(224, 224, (113, 113)) == (224, 224)
    assert scaled_shape(225, 300, (113, 38)) == (113, 150)  # libjpeg rounds a reduced side up
    assert scaled_shape(112, 112, (64, 64)) == (112, 112)


@pytest.mark.parametrize("size", SIZES)
def test_scaled_decode_is_within_jpeg_tolerance_of_full_decode_and_resize(samples, size):
    _, members = samples
    scaled, full = Decoder(size), Decoder(size, scaled=False)
    differences = {name: [] for name in (schema.BG, schema.BGFG, schema.DEPTH)}
    for sample in members.values():
        got, want = _decode(scaled, sample, size), _decode(full, sample, size)
        for name, found in differences.items():
            found.append(np.abs(got[name].astype(int) - want[name].astype(int)).ravel())
        # the mask is decoded whole either way: a reduced one moved thin parts (IoU 0.86-0.97)
        assert set(np.unique(got[schema.MASK])) == {0, 1}
        assert np.array_equal(got[schema.MASK], want[schema.MASK])
    for name, found in differences.items():
        found = np.concatenate(found)
        summary = f"{name} at {size}: mean {found.mean():.2f}, p99 {np.percentile(found, 99)}, max {found.max()}"
        assert found.mean() <= MEAN_TOLERANCE and np.percentile(found, 99) <= P99_TOLERANCE, summary
        assert found.max() <= MAX_TOLERANCE, summary
        assert found.mean() > 0, f"{summary}: scaled decode did not change anything"


@pytest.mark.parametrize("size", (64, 56))
def test_every_depth_kind_keeps_its_orientation_and_range(samples, size):
    _, members = samples
    scaled, full = Decoder(size), Decoder(size, scaled=False)
    kinds = set()
    for sample in members.values():
        kinds.add(_depth_kind(sample[schema.DEPTH]))
        got = _decode(scaled, sample, size)[schema.DEPTH][..., 0].astype(float)
        want = _decode(full, sample, size)[schema.DEPTH][..., 0].astype(float)
        # the synthetic depth grows down the image: the row means must rise the same way
        assert np.corrcoef(got.mean(axis=1), want.mean(axis=1))[0, 1] > 0.99
        assert np.sign(got[-8:].mean() - got[:8].mean()) == np.sign(want[-8:].mean() - want[:8].mean()) != 0
        assert abs(got.min() - want.min()) <= 8 and abs(got.max() - want.max()) <= 8
        assert abs(got.mean() - want.mean()) <= 1.0
    assert kinds == {"grey", "colour", "half"}


def test_the_same_bytes_give_the_same_pixels(samples):
    _, members = samples
    for size in SIZES:
        one, other = Decoder(size), Decoder(size)
        for sample in list(members.values())[:6]:
            first, again, fresh = _decode(one, sample, size), _decode(one, sample, size), _decode(other, sample, size)
            assert all(np.array_equal(first[n], again[n]) and np.array_equal(first[n], fresh[n]) for n in CHANNELS)


@pytest.mark.parametrize("size", (*SIZES, MEMBER))
def test_scaled_decode_off_gives_todays_bytes(samples, size):
    _, members = samples
    decoder = Decoder(size, scaled=False)
    for sample in members.values():
        got, want = _decode(decoder, sample, size), _todays_decode(sample, size)
        assert all(np.array_equal(got[name], want[name]) for name in CHANNELS), size


@pytest.mark.parametrize("scaled", (True, False))
def test_make_loader_decodes_as_its_scaled_decode_option_says(samples, scaled):
    url, members = samples
    batch = next(iter(make_loader(url, batch_size=24, workers=1, image_size=64, train=False, scaled_decode=scaled)))
    decoder = Decoder(64, scaled=scaled)
    for i, key in enumerate(batch["key"]):
        want = _decode(decoder, members[key], 64)
        for name in CHANNELS:
            assert np.array_equal(batch[FIELDS[name]][i].permute(1, 2, 0).numpy(), want[name]), (key, name)


def test_train_py_turns_scaled_decode_off_with_no_scaled_decode():
    assert build_parser().parse_args(["--shards", "x.tar"]).scaled_decode is True
    assert build_parser().parse_args(["--shards", "x.tar", "--no-scaled-decode"]).scaled_decode is False
