"""training.baselines: the trivial predictors are fitted on the training shards, scored on the
validation shards, and train.py reports them once beside the model."""

import json

import numpy as np
import pytest
import torch

import train
import helpers
from pipeline import make_loader
from training import baselines, bgsub

LOADER = dict(batch_size=4, workers=0, image_size=64)
CPU = torch.device("cpu")


def _depths(urls):
    return torch.cat([batch["depth"].double() / 255 for batch in make_loader(urls, train=False, **LOADER)])


def test_fit_is_the_mean_and_the_row_means_of_the_first_samples(shard_dir):
    urls = f"{shard_dir}/batch-{{1..2}}.tar"
    depths = _depths(urls)
    whole = baselines.fit(urls, LOADER, CPU, limit=10_000)
    assert whole.samples == depths.shape[0]
    assert whole.mean == pytest.approx(depths.mean().item(), abs=1e-6)
    torch.testing.assert_close(whole.row_mean, depths.mean((0, 1, 3)).float())
    first = baselines.fit(urls, LOADER, CPU, limit=5)  # a bounded subset: the first 5 in eval order
    assert first.samples == 5
    torch.testing.assert_close(first.row_mean, depths[:5].mean((0, 1, 3)).float())
    assert not torch.allclose(first.row_mean, whole.row_mean)


def test_scores_are_those_of_the_fitted_maps_and_the_row_prior_fits_its_own_data_better(shard_dir):
    urls = f"{shard_dir}/batch-{{1..2}}.tar"
    fitted = baselines.fit(urls, LOADER, CPU, limit=10_000)
    scores = baselines.score(fitted, make_loader(urls, train=False, **LOADER), CPU)  # on the samples it was fitted on
    depths = _depths(urls)
    assert scores["constant"]["rmse"] == pytest.approx(((depths - fitted.mean) ** 2).mean().sqrt().item(), rel=1e-5)
    assert scores["per-row"]["rmse"] < scores["constant"]["rmse"]  # a mean per row is the least-squares fit
    assert scores["constant"]["iou"] == scores["per-row"]["iou"] == 0.0  # "no object" finds none
    # The per-row scores on the validation shards, worked out in numpy from the images alone.
    val = make_loader(f"{shard_dir}/val-1.tar", train=False, **LOADER)
    true = np.concatenate([batch["depth"].numpy() for batch in val]).astype(np.float64) / 255
    row_mean = np.asarray(_depths(urls)).mean(axis=(0, 1, 3))  # each row's mean over the training samples
    pred = np.broadcast_to(row_mean.reshape(1, 1, -1, 1), true.shape)
    valid = true >= 1 / 255 - 1e-9
    clamped = np.maximum(pred, 1 / 255)[valid]
    ratio = np.maximum(clamped / true[valid], true[valid] / clamped)
    got = baselines.score(fitted, make_loader(f"{shard_dir}/val-1.tar", train=False, **LOADER), CPU)["per-row"]
    assert got["rmse"] == pytest.approx(np.sqrt(((pred - true) ** 2).mean()), rel=1e-5)
    assert got["abs_rel"] == pytest.approx((np.abs(clamped - true[valid]) / true[valid]).mean(), rel=1e-5)
    assert got["delta1"] == pytest.approx((ratio < 1.25).mean(), rel=1e-5)
    # A per-row map is one shape for every image: scale and shift fitted per image, what is left
    # is each image's residual from its own least-squares line in the row means.
    residuals = []
    for image in true.reshape(len(true), -1):
        design = np.stack([pred[0].reshape(-1), np.ones(image.size)], 1)
        residuals.append(image - design @ np.linalg.lstsq(design, image, rcond=None)[0])
    assert got["ssi_rmse"] == pytest.approx(np.sqrt(np.mean(np.square(residuals))), rel=1e-4)
    masks = np.concatenate([batch["mask"].numpy() for batch in make_loader(
        f"{shard_dir}/val-1.tar", train=False, **LOADER)])
    assert masks.any() and got["iou"] == got["dice"] == 0.0  # "no object" on images that hold one


def test_scores_of_a_tiny_case_worked_by_hand():
    # One 2x2 image, truth [[0.5, 0.5], [0.5, 0]] (the 0 is below the ratios' floor: left out of
    # abs_rel and delta1); per-row predicts 0.25 on the top row and 0.5 below, constant 0.5.
    fitted = baselines.Baselines(mean=0.5, row_mean=torch.tensor([0.25, 0.5]), samples=1, threshold=0)
    depth = torch.tensor([[[[0.5, 0.5], [0.5, 0.0]]]])
    scorer = baselines.Scorer(fitted, CPU)
    same = {"bg": torch.zeros(1, 3, 2, 2, dtype=torch.uint8), "bgfg": torch.zeros(1, 3, 2, 2, dtype=torch.uint8)}
    scorer.update(same, torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]]), depth)
    scores = scorer.compute()
    assert scores["constant"]["rmse"] == pytest.approx((0.5 ** 2 / 4) ** 0.5)
    assert scores["constant"]["abs_rel"] == 0.0 and scores["constant"]["delta1"] == 1.0
    assert scores["per-row"]["rmse"] == pytest.approx(((2 * 0.25 ** 2 + 0.5 ** 2) / 4) ** 0.5)
    assert scores["per-row"]["abs_rel"] == pytest.approx(1 / 3)  # (0.5 + 0.5 + 0) / 3 valid pixels
    assert scores["per-row"]["delta1"] == pytest.approx(1 / 3)  # the top row is off by 2x
    assert scores["per-row"]["iou"] == scores["per-row"]["dice"] == 0.0
    assert scores["bgsub"] == {"iou": 0.0, "dice": 0.0}  # no difference, so no object found


def test_train_logs_the_baselines_once_beside_the_model(shard_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--shards", f"{shard_dir}/batch-{{1..2}}.tar", "--out", str(out), "--image-size", "64",
                       "--width", "4", "--batch-size", "4", "--workers", "0", "--steps", "2", "--val-every", "1", *helpers.CPU]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if r["kind"] == "baseline"]
    assert len(logged) == 1 and [r["step"] for r in records if r["kind"] == "val"] == [1, 2]
    assert set(baselines.NAMES) <= logged[0].keys() and logged[0]["fit_samples"] > 0
    assert all("ssi_rmse" in r for r in records if r["kind"] == "val")
    assert set(logged[0]["bgsub"]) == {"iou", "dice"} and 0 <= logged[0]["bgsub_threshold"] <= 254
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("baselines fitted on")]
    assert len(lines) == 1 and f"{logged[0]['per-row']['rmse']:.4g} per-row" in lines[0]
    assert f"mask iou {logged[0]['bgsub']['iou']:.4g} background subtraction" in lines[0]


# --- background subtraction ------------------------------------------------------------------
def _median_numpy(binary: np.ndarray, window: int = 5) -> np.ndarray:
    """The median filter written out: each pixel the median of its window, edges repeated."""
    half = window // 2
    padded = np.pad(binary, [(0, 0), (half, half), (half, half)], mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (window, window), axis=(1, 2))
    return np.median(windows.reshape(*binary.shape, -1), axis=-1) > 0.5


def _scene(rng, count=4, size=32):
    """Pairs with a known answer: the object (a square, in the mask) differs from the background
    by 50 in one channel, a shadow block (not in the mask) by 30 in another, and isolated salt
    pixels by 120. Thresholds 30..49 take the object alone; below 30 the shadow comes too."""
    bg = rng.integers(60, 190, size=(count, 3, size, size), dtype=np.uint8)
    bgfg, mask = bg.copy(), np.zeros((count, 1, size, size), dtype=bool)
    for i in range(count):
        top, left = rng.integers(6, 12, size=2)
        mask[i, 0, top:top + 14, left:left + 12] = True
        bgfg[i, 1][mask[i, 0]] += 50
        bgfg[i, 0, :7, 25:] -= 30  # the shadow: a darker patch of background
        for y, x in rng.integers(0, size, size=(6, 2)):
            if not mask[i, 0, max(y - 2, 0):y + 3, max(x - 2, 0):x + 3].any() and not (y < 9 and x > 22):
                bgfg[i, 2, y, x] = np.uint8((int(bg[i, 2, y, x]) + 120) % 256)
    return bg, bgfg, mask


def test_the_bgsub_threshold_is_the_best_one_by_an_independent_search():
    bg, bgfg, mask = _scene(np.random.default_rng(0))
    diff = np.abs(bgfg.astype(np.int16) - bg.astype(np.int16)).max(1)
    ious = []
    for threshold in range(255):  # every level, the filter written out in numpy
        found = _median_numpy(diff > threshold)
        union = (found | mask[:, 0]).sum()
        ious.append((found & mask[:, 0]).sum() / union)
    best = int(np.argmax(ious))  # the lowest of equals
    assert 30 <= best < 50 and ious[best] > ious[29] and ious[best] > ious[50] == 0.0
    fitted = bgsub.fit_threshold(bgsub.difference(torch.from_numpy(bg), torch.from_numpy(bgfg)),
                                 torch.from_numpy(mask).float())
    assert fitted == best
    found = bgsub.predict(torch.from_numpy(diff.astype(np.uint8)), fitted)[:, 0].numpy()
    np.testing.assert_array_equal(found, _median_numpy(diff > fitted))  # salt gone, corners rounded as in numpy


def test_train_shards_fit_a_bgsub_that_finds_the_objects_of_the_validation_shards(shard_dir):
    urls = f"{shard_dir}/batch-{{1..2}}.tar"
    fitted = baselines.fit(urls, LOADER, CPU, limit=10_000, bgsub_limit=20)
    val = list(make_loader(f"{shard_dir}/val-1.tar", train=False, **LOADER))
    got = baselines.score(fitted, val, CPU)["bgsub"]
    bg, bgfg, mask = (np.concatenate([batch[name].numpy() for batch in val]) for name in ("bg", "bgfg", "mask"))
    found = _median_numpy(np.abs(bgfg.astype(np.int16) - bg.astype(np.int16)).max(1) > fitted.threshold)
    true = mask[:, 0] > 0
    assert got["iou"] == pytest.approx((found & true).sum() / (found | true).sum(), rel=1e-9)
    assert got["dice"] == pytest.approx(2 * (found & true).sum() / (found.sum() + true.sum()), rel=1e-9)
    assert got["iou"] > 0.5  # the pasted objects differ from their backgrounds
