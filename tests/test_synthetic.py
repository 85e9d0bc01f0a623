"""seedzips.synthetic keeps the seed layout and its quirks in both styles, and makes images a
model can learn from; the photo style's depth is what its picture shows."""

import io
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from pipeline import schema
from seedzips import objects, scenes, synthetic, textures

from conftest import SEED_DATASET


@pytest.fixture(scope="module")
def photo_dataset(tmp_path_factory):
    """conftest's seed_dataset drawn in the photo style."""
    path = tmp_path_factory.mktemp("photo") / "dataset"
    return path, synthetic.generate(path, **{**SEED_DATASET, "style": "photo"})


@pytest.fixture(params=["simple", "photo"])
def any_dataset(request, seed_dataset, photo_dataset):
    """(dataset path, generate()'s summary, style) of each style's tiny faulty dataset."""
    return (*{"simple": seed_dataset, "photo": photo_dataset}[request.param], request.param)


def _zip(dataset, name):
    return zipfile.ZipFile(os.path.join(dataset, schema.ZIP_DIR, name))


def _decode(data: bytes, mode: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert(mode), np.int16)


def test_layout_names_and_labels(any_dataset):
    dataset, summary, _ = any_dataset
    bg_count = sum(len(z["bg_ids"]) for z in summary["zips"])
    assert sorted(os.listdir(os.path.join(dataset, schema.BG_DIR))) == sorted(
        schema.bg_name(i) for i in range(1, bg_count + 1))
    fg_count = len(os.listdir(os.path.join(dataset, schema.FG_DIR)))
    assert sorted(os.listdir(os.path.join(dataset, schema.FG_MASK_DIR))) == sorted(
        schema.fg_mask_name(j) for j in range(1, fg_count + 1))
    per_bg = len(summary["zips"][0]["keys"]) // len(summary["zips"][0]["bg_ids"])
    for batch, entry in enumerate(summary["zips"], 1):
        assert entry["name"] == schema.zip_name(batch)
        assert entry["bg_ids"] == list(range((batch - 1) * len(entry["bg_ids"]) + 1, batch * len(entry["bg_ids"]) + 1))
        assert entry["keys"] == [schema.seed_key(i, k) for i in entry["bg_ids"] for k in range(1, per_bg + 1)]
        with _zip(dataset, entry["name"]) as archive:
            names = archive.namelist()
            assert all(archive.getinfo(n).compress_type == zipfile.ZIP_DEFLATED for n in names if not n.endswith("/"))
            labels = archive.read(schema.LABELS).decode().split()
        for folder in schema.SEED_FOLDERS.values():
            assert folder + "/" in names
        composites = [os.path.basename(n) for n in names if n.startswith(schema.COMPOSITE_DIR + "/") and n[-1] != "/"]
        assert labels == sorted(composites)
        assert sorted(schema.key_of(n) for n in composites) == sorted(entry["keys"])


def test_members_are_interleaved_and_depth_comes_later_in_another_order(any_dataset):
    dataset, summary, _ = any_dataset
    for entry in summary["zips"]:
        with _zip(dataset, entry["name"]) as archive:
            names = [n for n in archive.namelist() if not n.endswith("/") and n != schema.LABELS]
        folders = [os.path.dirname(n) for n in names]
        depth_start = folders.index(schema.DEPTH_DIR)
        assert set(folders[depth_start:]) == {schema.DEPTH_DIR}
        pairs = [(os.path.dirname(a), os.path.dirname(b), a == b.replace(schema.COMPOSITE_DIR, schema.MASK_DIR, 1))
                 for a, b in zip(names[:depth_start:2], names[1:depth_start:2])]
        assert set(pairs) == {(schema.MASK_DIR, schema.COMPOSITE_DIR, True)}  # mask written before composite
        composite_order = [schema.key_of(n) for n in names[1:depth_start:2]]
        depth_order = [schema.key_of(n) for n in names[depth_start:]]
        assert depth_order != [k for k in composite_order if k in depth_order]


def test_faults_are_injected_and_reported(any_dataset):
    dataset, summary, _ = any_dataset
    faults = summary["faults"]
    assert all(len(keys) == 1 for keys in faults.values())
    assert len({keys[0] for keys in faults.values()}) == 3
    names, truncated = {}, []
    for entry in summary["zips"]:
        with _zip(dataset, entry["name"]) as archive:
            names.update((n, entry["name"]) for n in archive.namelist())
            truncated += [archive.read(name) for name in archive.namelist()
                          if schema.key_of(name) == faults["truncated"][0] and name.startswith(schema.COMPOSITE_DIR)]
    assert len(truncated) == 1  # the faulty sample's one composite
    with pytest.raises(OSError):
        Image.open(io.BytesIO(truncated[0])).load()
    missing = faults["missing_depth"][0]
    assert not any(schema.key_of(n) == missing and n.startswith(schema.DEPTH_DIR) for n in names)
    double = faults["double_ext"][0]
    for folder in schema.SEED_FOLDERS.values():
        assert f"{folder}/{double}.jpg.jpg" in names


def _placement(dataset, summary, key):
    """(bg, composite, mask, depth) arrays of one sample; depth made full-size grayscale."""
    entry = next(z for z in summary["zips"] if key in z["keys"])
    with _zip(dataset, entry["name"]) as archive:
        def member(folder):
            return next(archive.read(n) for n in archive.namelist()
                        if n.startswith(folder + "/") and schema.key_of(n) == key)
        composite, mask = _decode(member(schema.COMPOSITE_DIR), "RGB"), _decode(member(schema.MASK_DIR), "L") > 127
        depth_image = Image.open(io.BytesIO(member(schema.DEPTH_DIR)))
    depth = np.asarray(depth_image.convert("L").resize(mask.shape[::-1], Image.BILINEAR), np.int16)
    with open(os.path.join(dataset, schema.BG_DIR, schema.bg_name(schema.background_id(key))), "rb") as f:
        bg = _decode(f.read(), "RGB")
    return bg, composite, mask, depth, depth_image


def _ring(mask: np.ndarray, width: int) -> np.ndarray:
    grown = mask.copy()
    for axis in (0, 1):
        for shift in range(1, width + 1):
            grown |= np.roll(mask, shift, axis) | np.roll(mask, -shift, axis)
    return grown & ~mask


def _foreground(dataset, fg_id):
    """Mean colour of foreground fg_id inside its mask (away from its JPEG-blurred edge)."""
    with open(os.path.join(dataset, schema.FG_DIR, schema.fg_name(fg_id)), "rb") as f:
        image = _decode(f.read(), "RGB")
    with open(os.path.join(dataset, schema.FG_MASK_DIR, schema.fg_mask_name(fg_id)), "rb") as f:
        mask = _decode(f.read(), "L") > 127
    return image[mask & ~_ring(~mask, 1)].mean(axis=0)


def test_composite_is_the_foreground_pasted_at_the_mask_and_nearer_than_what_it_covers(any_dataset):
    dataset, summary, style = any_dataset
    make_background = synthetic.STYLES[style][0]
    faulty = {key for keys in summary["faults"].values() for key in keys}
    fg_count = len(os.listdir(os.path.join(dataset, schema.FG_DIR)))
    placements = len(summary["zips"][0]["keys"]) // len(summary["zips"][0]["bg_ids"]) // fg_count
    kinds = set()
    for key in (k for z in summary["zips"] for k in z["keys"] if k not in faulty):
        bg, composite, mask, depth, depth_image = _placement(dataset, summary, key)
        kinds.add((depth_image.mode, depth_image.size == mask.shape[::-1]))
        assert 20 < mask.sum() < mask.size / 2
        outside = ~mask & ~_ring(mask, 3)  # away from the edge JPEG smears across
        assert np.abs(composite - bg)[outside].mean() < 6
        assert np.abs(composite - bg)[mask].mean() > 3 * np.abs(composite - bg)[outside].mean()
        k = int(key.rsplit("_bg_", 1)[1].split("_")[0])  # key = seed_key(bg, (fg - 1) * placements + p)
        pasted = composite[mask & ~_ring(~mask, 1)].mean(axis=0)
        assert np.abs(pasted - _foreground(dataset, (k - 1) // placements + 1)).max() < 20, key
        inner = mask & ~_ring(~mask, 1)
        covered = make_background(SEED_DATASET["seed"], schema.background_id(key), mask.shape[0]).depth[inner]
        assert np.median(depth[inner]) + (15 if style == "simple" else 1) < np.median(covered), key
        assert np.percentile(covered - depth[inner], 5) > -4, key  # nothing it covers is nearer (JPEG aside)
    assert kinds == {("L", True), ("RGB", True), ("L", False)}  # "mixed": gray, colour, half size


def test_colour_depth_is_monotonic_in_luma():
    lut = np.array(synthetic._COLORMAP, np.float64).reshape(3, 256)
    luma = 0.299 * lut[0] + 0.587 * lut[1] + 0.114 * lut[2]
    assert np.all(np.diff(luma) > 0) and np.abs(luma - np.arange(256)).max() <= 1
    assert np.abs(lut[0] - lut[2]).max() > 20  # really coloured, not gray


@pytest.mark.parametrize("style", ["simple", "photo"])
def test_same_arguments_give_identical_files_with_any_workers(tmp_path, style):
    options = dict(zips=2, bgs_per_zip=1, fg=2, placements=1, seed=3, image_size=32, depth="color", faults=True,
                   style=style)
    one = synthetic.generate(tmp_path / "a", workers=1, **options)
    two = synthetic.generate(tmp_path / "b", workers=2, **options)
    assert one["faults"] == two["faults"]
    for root, _, files in os.walk(tmp_path / "a"):
        for name in files:
            with open(os.path.join(root, name), "rb") as a, \
                    open(os.path.join(tmp_path / "b", os.path.relpath(root, tmp_path / "a"), name), "rb") as b:
                assert a.read() == b.read(), name


def test_cli_writes_a_dataset_and_rejects_bad_arguments(tmp_path, capsys):
    out = tmp_path / "d"
    assert synthetic.main(["--out", str(out), "--zips", "1", "--bgs-per-zip", "1", "--fg", "1",
                           "--placements", "2", "--image-size", "32", "--depth", "half", "--workers", "1"]) == 0
    with _zip(out, schema.zip_name(1)) as archive:
        depth = [n for n in archive.namelist() if n.startswith(schema.DEPTH_DIR + "/") and n[-1] != "/"]
        assert len(depth) == 2 and Image.open(io.BytesIO(archive.read(depth[0]))).size == (16, 16)
    capsys.readouterr()  # the successful run's progress bar
    assert synthetic.main(["--out", str(tmp_path / "e"), "--zips", "0"]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def _scenes(count=6, size=64):
    return [scenes.make_background(0, bg_id, size) for bg_id in range(1, count + 1)]


def test_photo_depth_matches_the_ground_plane_and_nothing_below_the_horizon_is_behind_it():
    for scene in _scenes():
        cam, depth = scene.camera, scene.depth_exact
        rows = np.arange(depth.shape[0])
        below = rows[rows > cam.horizon + 2]  # rows whose pixels lie fully below the horizon
        ground = np.array([scene.ground_depth(row + 0.5) for row in below])
        assert np.all(np.diff(ground) < 0)  # the ground is nearer lower down the picture
        # The ground hides whatever lies beyond it, so no pixel below the horizon is farther...
        assert np.all(depth[below] <= ground[:, None] + 1.5)
        # ...and most of it is the ground itself, at the depth its row says.
        assert np.mean(np.abs(depth[below] - ground[:, None]) < 1.5) > 0.4
        sky_rows = np.nonzero(scene.depth == 255)[0]
        assert sky_rows.size and sky_rows.max() < cam.horizon + 1  # sky (farthest) only above the horizon
        assert scene.depth.min() < 100 and np.ptp(scene.image.astype(int), axis=(0, 1)).min() > 40


def test_ground_texture_shrinks_and_fades_toward_the_horizon():
    u = np.linspace(0, 8, 4000)
    near = textures.pattern(textures.rng(0), "checker", u, u * 0.37, np.full(3, 120.0), 0.01)
    far = textures.pattern(textures.rng(0), "checker", u, u * 0.37, np.full(3, 120.0), 0.6)
    # A pixel wider than half a period shows the mean colour: no aliasing near the horizon.
    assert near.std(0).max() > 3 and far.std(0).max() < 0.01 * near.std(0).max()
    contrast = []
    for scene in _scenes(size=96):
        top, bottom = int(scene.camera.horizon) + 3, scene.image.shape[0]
        band = (bottom - top) // 3
        gray = scene.image.astype(float).mean(2)
        detail = np.abs(np.diff(gray, axis=1))
        contrast.append((detail[bottom - band:].mean(), detail[top:top + band].mean()))
    near_detail, far_detail = np.array(contrast).T
    assert np.median(near_detail / np.maximum(far_detail, 1e-6)) > 1  # fine patterns far away average out


def test_objects_stand_on_the_ground_nearer_than_what_they_cover():
    foregrounds = [objects.make_foreground(0, fg_id, 64) for fg_id in range(1, 11)]
    for fg_image, fg_mask in foregrounds:
        assert np.asarray(fg_mask).max() == 255 and np.asarray(fg_mask)[-1].any()  # base on the bottom row
        assert set(np.unique(np.asarray(fg_mask))) <= {0, 255}
    generator = textures.rng(0, 99)
    for scene in _scenes():
        for fg_image, fg_mask in foregrounds:
            x, y, image, mask, value = scene.place(generator, fg_image, fg_mask)
            bottom = y + mask.height
            assert image.size == mask.size and 0 <= x <= 64 - mask.width and y >= 0 and bottom <= 64
            assert bottom > scene.camera.horizon and value == round(scene.ground_depth(bottom))
            stature = mask.height / (bottom - scene.camera.horizon)  # height over the camera's
            assert 0.3 < stature < 1.4  # the farther (higher up), the smaller
            covered = scene.depth_exact[y:bottom, x:x + mask.width][np.asarray(mask) > 0]
            assert value <= covered.min() + 0.5


def test_a_scene_with_no_free_ground_still_places_every_object_nearer_than_it_covers():
    scene = scenes.make_background(0, 1, 64)
    scene.depth_exact = np.full_like(scene.depth_exact, 30.0)  # as if a wall stood right before the camera
    generator = textures.rng(0, 98)
    wide = Image.new("RGB", (400, 10), "red"), Image.new("L", (400, 10), 255)  # fits no drawn spot
    for fg_image, fg_mask in [objects.make_foreground(0, fg_id, 64) for fg_id in range(1, 6)] + [wide]:
        x, y, image, mask, value = scene.place(generator, fg_image, fg_mask)
        assert image.size == mask.size and 0 <= x <= 64 - mask.width and 0 <= y <= 64 - mask.height
        assert value <= 20  # nearer than everything it covers, though its base row says farther
