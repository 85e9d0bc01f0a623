"""The network's shapes and size limits, the loss terms and the metric accumulators."""

import importlib.util

import pytest
import torch

from helpers import ROOT
from model import LossWeights, SegDepthMetrics, UNet, UNetConfig, count_parameters, flip_averaged, to_input, total_loss
from model.losses import edge_bce, gradient_loss, lovasz_hinge, ssim_loss
from training.options import parse_args


def test_default_model_is_no_larger_than_the_original():
    assert count_parameters(UNet()) <= 12_400_000


@pytest.mark.parametrize("size", [(64, 64), (32, 96)])
def test_outputs_match_input_size_with_depth_in_unit_range(size):
    model = UNet(UNetConfig(width=4)).eval()
    logits, depth = model(torch.randn(2, 6, *size))
    assert logits.shape == depth.shape == (2, 1, *size)
    assert depth.min() >= 0 and depth.max() <= 1


def test_size_not_divisible_by_32_is_refused_by_name():
    with pytest.raises(ValueError, match="image size 70"):
        UNet(UNetConfig(width=4))(torch.randn(1, 6, 70, 64))


def test_to_input_normalises_both_images_into_six_channels():
    bgfg = torch.full((1, 3, 4, 4), 255, dtype=torch.uint8)
    bg = torch.zeros((1, 3, 4, 4), dtype=torch.uint8)
    x = to_input(bgfg, bg)
    assert x.shape == (1, 6, 4, 4)
    assert (x[:, :3] > 2).all() and (x[:, 3:] < -1.5).all()


def test_every_loss_term_is_zero_for_a_perfect_prediction_and_positive_otherwise():
    mask = (torch.rand(2, 1, 32, 32) > 0.5).float()
    depth = torch.rand(2, 1, 32, 32)
    _, perfect = total_loss(mask * 40 - 20, depth, mask, depth)
    _, wrong = total_loss(20 - mask * 40, 1 - depth, mask, depth)
    for name in ("bce", "dice", "l1", "ssim", "grad"):
        assert perfect[name] < 1e-3, name
        assert wrong[name] > 0.05, name


def test_loss_weights_scale_their_terms():
    mask = (torch.rand(1, 1, 32, 32) > 0.5).float()
    depth, pred = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)
    only_l1, terms = total_loss(torch.zeros_like(mask), pred, mask, depth,
                                LossWeights(bce=0, dice=0, l1=3, ssim=0, grad=0))
    assert torch.isclose(only_l1, 3 * terms["l1"])
    only_l2, terms = total_loss(torch.zeros_like(mask), pred, mask, depth,
                                LossWeights(bce=0, dice=0, l1=0, ssim=0, grad=0, l2=10))
    assert torch.isclose(terms["l2"], ((pred - depth) ** 2).mean()) and torch.isclose(only_l2, 10 * terms["l2"])
    assert "l2" not in total_loss(torch.zeros_like(mask), pred, mask, depth)[1]  # off by default


def test_ssim_and_gradient_see_structure_that_l1_misses():
    flat = torch.full((1, 1, 32, 32), 0.5)
    stripes = flat.clone()
    stripes[..., ::2] += 0.1
    stripes[..., 1::2] -= 0.1
    assert ssim_loss(flat, stripes) > 0.1
    assert gradient_loss(flat, stripes) > 0.1


def test_metrics_count_pixels_across_batches_and_skip_zero_depth_in_ratios():
    metrics = SegDepthMetrics()
    mask = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    logits = torch.tensor([[[[5.0, -5.0], [5.0, -5.0]]]])  # 1 hit, 1 miss, 1 false alarm
    depth = torch.tensor([[[[0.0, 0.5], [0.5, 1.0]]]])
    pred = torch.tensor([[[[0.3, 0.5], [1.0, 1.0]]]])  # true 0 must not divide
    metrics.update(logits, pred, mask, depth)
    metrics.update(mask * 10 - 5, depth, mask, depth)  # a perfect second batch
    result = metrics.compute()
    assert result["iou"] == pytest.approx(3 / 5)  # (1 + 2) / (3 + 2)
    assert result["dice"] == pytest.approx(2 * 3 / (2 + 2 + 2 + 2))
    assert result["rmse"] == pytest.approx(((0.09 + 0.25) / 8) ** 0.5)
    assert result["abs_rel"] == pytest.approx(1.0 / 6)  # only |1.0-0.5|/0.5 is off, of 6 valid pixels
    assert result["delta1"] == pytest.approx(5 / 6)


def test_metrics_all_reduce_without_a_process_group_keeps_the_sums():
    metrics = SegDepthMetrics()
    mask = torch.ones(1, 1, 4, 4)
    metrics.update(mask * 5, mask * 0.5, mask, mask * 0.5)
    before = metrics.compute()
    metrics.all_reduce()
    assert metrics.compute() == before == {"iou": 1.0, "dice": 1.0, "rmse": 0.0, "abs_rel": 0.0, "delta1": 1.0,
                                           "ssi_rmse": 0.0}


def test_ssi_rmse_forgives_each_images_scale_and_shift_but_not_its_shape():
    torch.manual_seed(0)
    truth = torch.rand(3, 1, 16, 16)
    mask = torch.zeros_like(truth)
    affine = truth * torch.tensor([0.5, 2.0, -1.0]).view(3, 1, 1, 1) + torch.tensor([0.3, -0.2, 0.9]).view(3, 1, 1, 1)
    metrics = SegDepthMetrics()
    metrics.update(mask - 1, affine, mask, truth)
    result = metrics.compute()
    assert result["ssi_rmse"] < 1e-6 < 0.1 < result["rmse"]
    flat = SegDepthMetrics()  # a constant says nothing of the shape: it scores each image's spread
    flat.update(mask - 1, torch.full_like(truth, 0.7), mask, truth)
    spread = ((truth - truth.mean((1, 2, 3), keepdim=True)) ** 2).mean() ** 0.5
    assert flat.compute()["ssi_rmse"] == pytest.approx(spread.item(), rel=1e-6)
    noisy = SegDepthMetrics()
    noisy.update(mask - 1, 3 * truth + 0.1 * torch.randn_like(truth), mask, truth)
    assert 0.01 < noisy.compute()["ssi_rmse"] < 0.05  # noise of 0.1 / 3 on the truth's scale


def test_the_lovasz_hinge_of_unit_margin_logits_is_twice_each_images_jaccard_loss():
    # At logits of +-1 every hinge error is 0 (right) or 2 (wrong), and the Lovasz extension of
    # the Jaccard loss at an indicator of the wrong pixels is that prediction's Jaccard loss.
    generator = torch.Generator().manual_seed(0)
    target = (torch.rand(3, 1, 16, 16, generator=generator) > 0.6).float()
    found = (torch.rand(3, 1, 16, 16, generator=generator) > 0.5).float()
    inter, union = (found * target).sum((1, 2, 3)), ((found + target) > 0).float().sum((1, 2, 3))
    assert lovasz_hinge(found * 2 - 1, target) == pytest.approx(2 * (1 - inter / union).mean().item(), rel=1e-6)
    assert lovasz_hinge(target * 40 - 20, target) == 0.0  # right by a margin: nothing to pay


def test_the_lovasz_term_is_computed_only_when_it_has_a_weight():
    mask, depth = (torch.rand(1, 1, 32, 32) > 0.5).float(), torch.rand(1, 1, 32, 32)
    assert "lovasz" not in total_loss(torch.zeros_like(mask), depth, mask, depth)[1]
    total, terms = total_loss(torch.zeros_like(mask), depth, mask, depth, LossWeights(
        bce=0, dice=0, l1=0, ssim=0, grad=0, lovasz=2))
    assert torch.isclose(total, 2 * terms["lovasz"]) and terms["lovasz"] > 0


def test_edge_bce_counts_only_the_pixels_near_the_outline():
    target = torch.zeros(1, 1, 16, 16)
    target[..., 4:12, 4:12] = 1
    logits = target * 8 - 4  # right everywhere, by a margin of 4
    right = edge_bce(logits, target, radius=1)
    far = logits.clone()
    far[..., 0, 0] = far[..., 8, 8] = 4.0  # wrong, but more than a pixel from the outline
    assert edge_bce(far, target, radius=1) == pytest.approx(right.item())
    near = logits.clone()
    near[..., 3, 8] = 4.0  # wrong, just outside the outline: 1 of the band's 10x10 - 6x6 = 64 pixels
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = right + (bce(torch.tensor(4.0), torch.tensor(0.0)) - bce(torch.tensor(-4.0), torch.tensor(0.0))) / 64
    assert edge_bce(near, target, radius=1) == pytest.approx(expected.item(), rel=1e-5)
    assert edge_bce(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)) == 0.0  # no outline, nothing to pay
    assert "edge" not in total_loss(logits, target, target, target)[1]
    total, terms = total_loss(logits, target, target, target, LossWeights(bce=0, dice=0, l1=0, ssim=0, grad=0, edge=3))
    assert torch.isclose(total, 3 * terms["edge"])


def test_difference_input_gives_the_stem_the_absolute_difference_of_the_halves():
    model = UNet(UNetConfig(width=4, difference_input=True)).eval()
    assert model.stem[0].in_channels == 9
    bgfg, bg = torch.randint(0, 256, (2, 2, 3, 32, 32), dtype=torch.uint8)
    seen = []
    model.stem.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    x = to_input(bgfg, bg)
    model(x)
    torch.testing.assert_close(seen[0][:, 6:], (x[:, :3] - x[:, 3:]).abs())
    torch.testing.assert_close(seen[0][:, :6], x)


def test_task_heads_give_each_head_features_the_other_does_not_train():
    model = UNet(UNetConfig(width=4, task_heads=True))
    mask_logits, depth = model(torch.randn(2, 6, 32, 32))
    mask_logits.sum().backward()
    assert all(p.grad is None for p in model.depth_features.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.mask_features.parameters())
    assert depth.shape == mask_logits.shape == (2, 1, 32, 32)


def test_without_task_heads_the_weights_have_the_names_older_checkpoints_have():
    names = set(UNet(UNetConfig(width=4)).state_dict())
    assert {"mask_head.weight", "mask_head.bias", "depth_head.weight", "depth_head.bias"} <= names
    assert not any(name.startswith(("mask_features", "depth_features")) for name in names)
    assert UNetConfig.from_dict({"width": 4}) == UNetConfig(width=4, task_heads=False)


def test_flip_averaging_is_the_mean_of_the_two_mirrored_predictions_and_mirrors_with_its_input():
    torch.manual_seed(0)
    model = UNet(UNetConfig(width=4)).eval()
    x = torch.randn(1, 6, 32, 32)
    with torch.no_grad():
        logits, depth = flip_averaged(model, x)
        mirrored_logits, mirrored_depth = flip_averaged(model, x.flip(-1))
        plain_logits, _ = model(x)
        flipped_logits, _ = model(x.flip(-1))
    torch.testing.assert_close(mirrored_logits, logits.flip(-1))
    torch.testing.assert_close(mirrored_depth, depth.flip(-1))
    torch.testing.assert_close(logits, (plain_logits + flipped_logits.flip(-1)) / 2)
    assert not torch.allclose(logits, plain_logits)  # a random network is not symmetric by itself


def test_every_option_of_bench_qualitys_recipe_is_one_train_py_takes_and_changes_its_default():
    spec = importlib.util.spec_from_file_location("quality", ROOT / "bench" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    plain = vars(parse_args(["--shards", "s"]))
    recipe = vars(parse_args(["--shards", "s", *quality.RECIPE]))
    changed = {name for name in plain if recipe[name] != plain[name]}
    assert len(changed) == sum(token.startswith("--") for token in quality.RECIPE)  # none unknown, none a no-op
