"""training.baselines: the trivial predictors are fitted on the training shards, scored on the
validation shards, and train.py reports them once beside the model."""

import json

import numpy as np
import pytest
import torch

import train
import helpers
from pipeline import make_loader
from training import baselines

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
    fitted = baselines.Baselines(mean=0.5, row_mean=torch.tensor([0.25, 0.5]), samples=1)
    depth = torch.tensor([[[[0.5, 0.5], [0.5, 0.0]]]])
    scorer = baselines.Scorer(fitted, CPU)
    scorer.update(torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]]), depth)
    scores = scorer.compute()
    assert scores["constant"]["rmse"] == pytest.approx((0.5 ** 2 / 4) ** 0.5)
    assert scores["constant"]["abs_rel"] == 0.0 and scores["constant"]["delta1"] == 1.0
    assert scores["per-row"]["rmse"] == pytest.approx(((2 * 0.25 ** 2 + 0.5 ** 2) / 4) ** 0.5)
    assert scores["per-row"]["abs_rel"] == pytest.approx(1 / 3)  # (0.5 + 0.5 + 0) / 3 valid pixels
    assert scores["per-row"]["delta1"] == pytest.approx(1 / 3)  # the top row is off by 2x
    assert scores["per-row"]["iou"] == scores["per-row"]["dice"] == 0.0

def test_train_logs_the_baselines_once_beside_the_model(shard_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--shards", f"{shard_dir}/batch-{{1..2}}.tar", "--out", str(out), "--image-size", "64",
                       "--width", "4", "--batch-size", "4", "--workers", "0", "--steps", "2", "--val-every", "1", *helpers.CPU]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if r["kind"] == "baseline"]
    assert len(logged) == 1 and [r["step"] for r in records if r["kind"] == "val"] == [1, 2]
    assert set(baselines.NAMES) <= logged[0].keys() and logged[0]["fit_samples"] > 0
    assert all("ssi_rmse" in r for r in records if r["kind"] == "val")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("baselines fitted on")]
    assert len(lines) == 1 and f"{logged[0]['per-row']['rmse']:.4g} per-row" in lines[0]
