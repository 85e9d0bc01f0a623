"""seedzips.compose: a seed-layout dataset from photos and cut-outs, labelled by a tiny randomly
initialised transformers depth model saved with save_pretrained (the real loading code, nothing
downloaded); the dataset converts, trains and predicts."""

import io
import json
import os
import signal
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

import convert_zips
import predict
import train
from helpers import CPU, ROOT, read_manifest, tiny, wait_for
from pipeline import schema
from seedzips import compose, objects, placement, scenes
from seedzips.depthlabel import to_far

BGS, CUTOUTS, PLACEMENTS = 3, 2, 2
OPTIONS = dict(placements=PLACEMENTS, bgs_per_zip=2, device="cpu", batch_size=5, progress=False)


def _tree(root) -> dict:
    """{relative path: bytes} of every file under root."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Folders of backgrounds (a JPEG, a wide JPEG, a PNG) and cut-outs (a PNG with alpha, a JPEG
    with a mask of the same stem), made by the synthetic generator's photo style."""
    root = tmp_path_factory.mktemp("photos")
    for folder in ("bg", "fg", "masks"):
        (root / folder).mkdir()
    for i in range(BGS):
        image = Image.fromarray(scenes.make_background(0, i + 1, 160).image)
        if i == 1:
            image = image.crop((0, 20, 160, 110))  # wide: centre-cropped to a square
        image.save(root / "bg" / f"photo{i}.{'png' if i == 2 else 'jpg'}", quality=95)
    rgb, mask = objects.make_foreground(0, 1, 96)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(mask)
    rgba.save(root / "fg" / "a.png")
    rgb, mask = objects.make_foreground(0, 2, 96)
    rgb.save(root / "fg" / "b.jpg", quality=95)
    mask.save(root / "masks" / "b.png")
    return root


@pytest.fixture(scope="module")
def depth_model(tmp_path_factory):
    """A tiny Depth Anything (DINOv2 backbone) with random weights and its image processor."""
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    folder = tmp_path_factory.mktemp("depth-model")
    backbone = Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                            image_size=56, patch_size=14, out_indices=[1, 2], reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=16, neck_hidden_sizes=[8, 16],
                                 reassemble_factors=[2, 1], fusion_hidden_size=8, head_hidden_size=8)
    torch.manual_seed(0)
    DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14,
                      do_pad=False).save_pretrained(folder)
    return str(folder)


def _compose(photos, depth_model, out, **options):
    return compose.compose(photos / "bg", photos / "fg", out, fg_masks=photos / "masks", depth_model=depth_model,
                           **{**OPTIONS, "workers": 1, **options})


@pytest.fixture(scope="module")
def composed(photos, depth_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("composed") / "dataset"
    return out, _compose(photos, depth_model, out)


def _members(dataset, zip_name) -> dict:
    with zipfile.ZipFile(dataset / schema.ZIP_DIR / zip_name) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def _image(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_layout_and_counts(composed):
    dataset, record = composed
    fgs = 2 * CUTOUTS
    assert sorted(os.listdir(dataset / schema.BG_DIR)) == sorted(schema.bg_name(i) for i in range(1, BGS + 1))
    assert sorted(os.listdir(dataset / schema.FG_DIR)) == sorted(schema.fg_name(j) for j in range(1, fgs + 1))
    assert sorted(os.listdir(dataset / schema.FG_MASK_DIR)) == sorted(schema.fg_mask_name(j) for j in range(1, fgs + 1))
    assert sorted(os.listdir(dataset / schema.ZIP_DIR)) == ["batch_1.zip", "batch_2.zip"]
    assert record["complete"] is True and sorted(record["zips"]) == ["batch_1.zip", "batch_2.zip"]
    assert json.loads((dataset / compose.RECORD).read_text()) == record
    for zip_name, bg_ids in (("batch_1.zip", [1, 2]), ("batch_2.zip", [3])):
        members = _members(dataset, zip_name)
        keys = sorted(schema.seed_key(i, k) for i in bg_ids for k in range(1, fgs * PLACEMENTS + 1))
        names = [key + ".jpg" for key in keys]
        for folder in (schema.COMPOSITE_DIR, schema.MASK_DIR, schema.DEPTH_DIR):
            assert folder + "/" in members
            assert sorted(n.split("/", 1)[1] for n in members if n.startswith(folder + "/") and n[-1] != "/") == names
        assert members[schema.LABELS].decode().split() == sorted(names)
        for name in names:
            assert _image(members[f"{schema.COMPOSITE_DIR}/{name}"]).shape == (224, 224, 3)
            assert _image(members[f"{schema.MASK_DIR}/{name}"]).shape == (224, 224)
            depth = _image(members[f"{schema.DEPTH_DIR}/{name}"])
            assert depth.shape == (224, 224) and depth.min() < 10 and depth.max() > 245  # 0..255 per image


def _source_cutout(photos, name: str) -> np.ndarray:
    """The test's own reading of a cut-out: RGBA cropped to its alpha's box."""
    image = Image.open(photos / "fg" / name).convert("RGBA")
    if name.endswith(".jpg"):
        image.putalpha(Image.open(photos / "masks" / (name[:-4] + ".png")).convert("L"))
    return np.asarray(image.crop(image.getchannel("A").getbbox()))


def _source_background(photos, index: int) -> np.ndarray:
    name = sorted(os.listdir(photos / "bg"))[index]
    image = Image.open(photos / "bg" / name).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return np.asarray(image.crop((left, top, left + side, top + side)).resize((224, 224), Image.LANCZOS), np.float32)


def _blend(background, cutout, box) -> tuple[np.ndarray, np.ndarray]:
    """(the cut-out resized to the box and alpha-blended on the background, its alpha 0..255)."""
    x, y, w, h = box
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(cutout)).resize((w, h), Image.LANCZOS))
    alpha = np.zeros(background.shape[:2], np.uint8)
    alpha[y:y + h, x:x + w] = resized[..., 3]
    blended = background.copy()
    a = alpha[y:y + h, x:x + w, None].astype(np.float32) / 255
    blended[y:y + h, x:x + w] = background[y:y + h, x:x + w] * (1 - a) + resized[..., :3] * a
    return blended, alpha


def _jpeg_round_trip(image: np.ndarray) -> np.ndarray:
    data = io.BytesIO()
    Image.fromarray(np.rint(image).astype(np.uint8)).save(data, "JPEG", quality=60)
    return _image(data.getvalue()).astype(np.float32)


def test_masks_are_the_placed_alpha_and_composites_its_blend(composed, photos):
    dataset, _ = composed
    mirrored_seen = set()
    for zip_name in ("batch_1.zip", "batch_2.zip"):
        members = _members(dataset, zip_name)
        placed = json.loads(members[compose.PLACEMENTS_NAME])
        assert len(placed) == len(members[schema.LABELS].split())
        for key, where in placed.items():
            cutout = _source_cutout(photos, where["source"])
            if where["mirrored"]:
                cutout = cutout[:, ::-1]
            x, y, w, h = where["box"]
            assert 0 <= x and x + w <= 224 and 0 <= y and y + h <= 224  # fully inside the frame
            assert max(w, h) >= 0.25 * 224 - 1 and max(w, h) <= 0.75 * 224 + 1
            background = _source_background(photos, where["bg"] - 1)
            expected, alpha = _blend(background, cutout, where["box"])
            mask = _image(members[f"{schema.MASK_DIR}/{key}.jpg"])
            np.testing.assert_array_equal(mask > schema.MASK_THRESHOLD, alpha > schema.MASK_THRESHOLD)
            composite = _image(members[f"{schema.COMPOSITE_DIR}/{key}.jpg"]).astype(np.float32)
            inside = alpha > schema.MASK_THRESHOLD
            error = np.abs(composite - _jpeg_round_trip(expected))[inside].mean()
            assert error < 1, key  # the blend, as JPEG q60 stores it
            assert np.abs(composite - _jpeg_round_trip(background))[inside].mean() > 10, key  # the object is there
            if where["mirrored"]:
                unmirrored = _blend(background, cutout[:, ::-1], where["box"])[0]
                assert np.abs(composite - _jpeg_round_trip(unmirrored))[inside].mean() > 5 * error + 1, key
            mirrored_seen.add((where["source"], where["mirrored"]))
    assert mirrored_seen == {(name, m) for name in ("a.png", "b.jpg") for m in (False, True)}


def test_fg_folder_holds_each_cutout_and_its_mirror_image(composed):
    dataset, _ = composed
    for j in range(1, CUTOUTS + 1):
        for folder, name in ((schema.FG_DIR, schema.fg_name), (schema.FG_MASK_DIR, schema.fg_mask_name)):
            original = np.asarray(Image.open(dataset / folder / name(j)), np.float32)
            mirror = np.asarray(Image.open(dataset / folder / name(j + CUTOUTS)), np.float32)
            assert np.abs(original[:, ::-1] - mirror).mean() < 3
            if folder == schema.FG_DIR:  # the textures are not symmetric (some masks are)
                assert np.abs(original - mirror).mean() > 10


def test_the_same_inputs_give_the_same_bytes_with_any_worker_count(composed, photos, depth_model, tmp_path):
    _compose(photos, depth_model, tmp_path / "again", workers=2)
    assert _tree(tmp_path / "again") == _tree(composed[0])


def test_a_killed_run_resumes_to_the_uninterrupted_result(photos, depth_model, tmp_path):
    options = {"placements": 4, "bgs_per_zip": 1}
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "seedzips.compose", "--bg", str(photos / "bg"), "--fg", str(photos / "fg"),
            "--fg-masks", str(photos / "masks"), "--out", str(out), "--depth-model", depth_model, "--device", "cpu",
            "--batch-size", "5", "--workers", "1", "--placements", "4", "--bgs-per-zip", "1"]
    child = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # The second zip being written: the first is finished, the third not begun.
        wait_for(lambda: (out / schema.ZIP_DIR / ("batch_2.zip" + schema.TEMPORARY)).exists(), "the second zip")
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    record = json.loads((out / compose.RECORD).read_text())
    assert record["complete"] is False and list(record["zips"]) == ["batch_1.zip"]
    assert not (out / schema.ZIP_DIR / "batch_3.zip").exists()
    inode = os.stat(out / schema.ZIP_DIR / "batch_1.zip").st_ino
    _compose(photos, depth_model, out, **options)
    assert os.stat(out / schema.ZIP_DIR / "batch_1.zip").st_ino == inode  # kept, not made again
    _compose(photos, depth_model, tmp_path / "whole", **options)
    assert _tree(out) == _tree(tmp_path / "whole")


def test_other_options_start_over(composed, photos, depth_model, tmp_path, capfd):
    out = tmp_path / "dataset"
    _compose(photos, depth_model, out, placements=1, bgs_per_zip=3)
    _compose(photos, depth_model, out)
    assert "starting over" in capfd.readouterr().err
    assert _tree(out) == _tree(composed[0])


def _bad_inputs(photos, depth_model, tmp_path) -> dict:
    """{case: (argv, what the one error line names)}."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "opaque").mkdir()
    Image.open(photos / "fg" / "b.jpg").save(tmp_path / "opaque" / "b.jpg")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.jpg").write_bytes(b"\xff\xd8 not a JPEG")
    (tmp_path / "no-model").mkdir()
    (tmp_path / "bad-config").mkdir()
    (tmp_path / "bad-config" / "config.json").write_text('{"model_type": "no-such-model"}')
    bg, fg = str(photos / "bg"), str(photos / "fg")
    good = ["--bg", bg, "--fg", fg, "--fg-masks", str(photos / "masks")]
    model = ["--depth-model", depth_model]
    return {"empty folder": ([*good, *model, "--bg", str(tmp_path / "empty")], "no JPEG or PNG"),
            "missing folder": ([*good, *model, "--fg", str(tmp_path / "nowhere")], "not a folder"),
            "no alpha, no mask": (["--bg", bg, "--fg", str(tmp_path / "opaque"), *model],
                                  "no alpha channel and no mask"),
            "unreadable image": ([*good, *model, "--bg", str(tmp_path / "broken")], "unreadable image"),
            "model folder without a model": ([*good, "--depth-model", str(tmp_path / "no-model")],
                                             "cannot load depth model"),
            "model of an unknown type": ([*good, "--depth-model", str(tmp_path / "bad-config")], "no-such-model"),
            "bad option": ([*good, *model, "--scale", "0.5", "0.2"], "--scale")}


def test_each_bad_input_is_one_line(photos, depth_model, tmp_path, capfd):
    for case, (argv, said) in _bad_inputs(photos, depth_model, tmp_path).items():
        out = tmp_path / case.replace(" ", "-")
        assert compose.main([*argv, "--out", str(out), "--device", "cpu", "--workers", "1"]) == 2, case
        captured = capfd.readouterr()
        lines = captured.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and said in lines[0], (case, captured.err)
        assert not out.exists(), case  # nothing written


def test_a_folder_of_other_zips_is_refused(composed, photos, depth_model, tmp_path):
    out = tmp_path / "theirs"
    (out / schema.ZIP_DIR).mkdir(parents=True)
    (out / schema.ZIP_DIR / "batch_1.zip").write_bytes(b"someone else's")
    with pytest.raises(compose.ConvertError, match="not a dataset compose made"):
        _compose(photos, depth_model, out)
    assert (out / schema.ZIP_DIR / "batch_1.zip").read_bytes() == b"someone else's"


def test_depth_conversion_makes_nearest_0_and_farthest_255():
    disparity = np.array([[4.0, 2.0], [1.0, 1.0]])
    np.testing.assert_array_equal(to_far(disparity, inverse=True), [[0, 170], [255, 255]])
    np.testing.assert_array_equal(to_far(disparity, inverse=False), [[255, 85], [0, 0]])
    assert not to_far(np.full((2, 2), 3.0), inverse=True).any()


def test_composing_needs_no_torch_until_depth_labels():
    code = "import sys, seedzips.compose, seedzips.synthetic; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_the_composed_dataset_converts_trains_and_predicts(composed, tmp_path):
    dataset, _ = composed
    shards = tmp_path / "shards"
    convert_zips.convert(dataset, shards, val_fraction=0.34, workers=1, progress=False)
    manifest = read_manifest(shards)
    assert manifest["totals"]["samples"] == BGS * 2 * CUTOUTS * PLACEMENTS and manifest["skipped"] == []
    assert manifest["totals"]["val_samples"] == 2 * CUTOUTS * PLACEMENTS  # one background held out
    run = tmp_path / "run"
    assert train.main(["--shards", str(shards / "batch-{1..2}.tar"), "--out", str(run), *tiny(), "--steps", "20",
                       "--val-every", "20", "--save-every", "20"]) == 0
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()][-1] == 20
    assert predict.main(["--checkpoint", str(run / "best.pt"), "--shard", str(shards / "val-1.tar"), "--limit", "2",
                         "--out", str(tmp_path / "predicted"), *CPU]) == 0
    assert len(os.listdir(tmp_path / "predicted")) == 2
