"""training.baselines: the trivial predictors are fitted on the training shards, scored on the
validation shards, and train.py reports them once beside the model."""

import json

import pytest
import torch

import train
from model import SegDepthMetrics
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
    reference = SegDepthMetrics()
    for batch in make_loader(f"{shard_dir}/val-1.tar", train=False, **LOADER):
        depth, mask = batch["depth"].float() / 255, batch["mask"].float()
        reference.update(torch.full_like(mask, -1.0), fitted.predict(depth)["per-row"], mask, depth)
    val = make_loader(f"{shard_dir}/val-1.tar", train=False, **LOADER)
    assert baselines.score(fitted, val, CPU)["per-row"] == reference.compute()


def test_train_logs_the_baselines_once_beside_the_model(shard_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--shards", f"{shard_dir}/batch-{{1..2}}.tar", "--out", str(out), "--image-size", "64",
                       "--width", "4", "--batch-size", "4", "--workers", "0", "--steps", "2", "--val-every", "1"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if r["kind"] == "baseline"]
    assert len(logged) == 1 and [r["step"] for r in records if r["kind"] == "val"] == [1, 2]
    assert set(baselines.NAMES) <= logged[0].keys() and logged[0]["fit_samples"] > 0
    assert all("ssi_rmse" in r for r in records if r["kind"] == "val")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("baselines fitted on")]
    assert len(lines) == 1 and f"{logged[0]['per-row']['rmse']:.4g} per-row" in lines[0]
