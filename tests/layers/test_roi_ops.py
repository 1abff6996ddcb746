"""RoI ops: the paper's worked example, loop reference vs fast ops vs torchvision, gradients."""

import itertools

import pytest
import torch
import torchvision
from roi_reference import (
    reference_roi_align,
    reference_roi_pool,
    reference_roi_warp,
)

from mrcnn_plugin.layers import (
    ROI_OP_REGISTRY,
    RoIAlign,
    RoIPool,
    RoIWarp,
    quantize_rois,
    roi_align,
    roi_pool,
    roi_warp,
)

# The 6x6 stride-32 feature map of the paper's RoIAlign illustration (row by row).
PAPER_FEATURES = torch.tensor(
    [
        [-1.5256, -0.7502, -0.6540, -1.6095, -0.1002, -0.6092],
        [-0.9798, -1.6091, -0.7121, 0.3037, -0.7773, -0.2515],
        [-0.2223, 1.6871, 0.2284, 0.4676, -0.6970, -1.1608],
        [0.6995, 0.1991, 0.1991, 0.0457, 0.1530, -0.4757],
        [-1.8821, -0.7765, 2.0242, -0.0865, 2.3571, -1.0373],
        [1.5748, -0.6298, 2.4070, 0.2786, 0.2468, 1.1843],
    ]
)[None, None]
PAPER_ROI = torch.tensor([[0.0, 10.0, 10.0, 124.0, 124.0]])
PAPER_SCALE = 1.0 / 32


def _random_case(dtype=torch.float64, seed=0, num_rois=12):
    """Two non-square maps and RoIs of varied sizes, some partly or fully off the map."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(2, 3, 9, 11, generator=g, dtype=dtype)
    scale = 0.25  # image is 36 x 44
    xy0 = torch.rand(num_rois, 2, generator=g, dtype=dtype) * torch.tensor([52.0, 44.0]) - 8
    wh = torch.rand(num_rois, 2, generator=g, dtype=dtype) * 30 + 0.3
    batch = torch.randint(0, 2, (num_rois, 1), generator=g).to(dtype)
    rois = torch.cat([batch, xy0, xy0 + wh], dim=1)
    rois[0] = torch.tensor([1.0, -30.0, -30.0, -12.0, -10.0])  # every sample off the map
    rois[1] = torch.tensor([0.0, 2.0, 3.0, 2.6, 3.2])  # smaller than one feature pixel
    return feats, rois, scale


def test_paper_example_roi_align_first_bin_by_hand():
    # Bin (0, 0): one sample at x = y = 10/32 + (114/32) / 2 / 2 = 1.203125, between
    # f[1,1], f[1,2], f[2,1], f[2,2].
    t = 1.203125 - 1
    f = PAPER_FEATURES[0, 0]
    by_hand = (1 - t) * ((1 - t) * f[1, 1] + t * f[1, 2]) + t * ((1 - t) * f[2, 1] + t * f[2, 2])
    out = roi_align(PAPER_FEATURES, PAPER_ROI, 2, PAPER_SCALE, 1, aligned=False)
    assert out[0, 0, 0, 0].item() == pytest.approx(by_hand.item(), abs=1e-6)


@pytest.mark.parametrize("aggregation", ["avg", "max"])
def test_paper_example_roi_align(aggregation):
    expected = torch.tensor([[-0.8546, 0.3236], [0.2177, 0.0546]])
    args = (PAPER_FEATURES, PAPER_ROI, (2, 2), PAPER_SCALE, 1, False, aggregation)
    # With one sample per bin max and average coincide.
    fast = roi_align(*args)
    ref = reference_roi_align(*args)
    module = RoIAlign(2, PAPER_SCALE, sampling_ratio=1, aligned=False, aggregation=aggregation)
    for out in (fast, ref, module(PAPER_FEATURES, PAPER_ROI)):
        assert out.shape == (1, 1, 2, 2)
        torch.testing.assert_close(out[0, 0], expected, atol=5e-5, rtol=0)


def test_paper_example_roi_pool():
    # round(10/32) = 0 and round(124/32) = 4: cells 0..4, 2 bins of 2.5 cells each, so bins
    # span cells [floor(0), ceil(2.5)) = 0..2 and [floor(2.5), ceil(5)) = 2..4 (they overlap).
    f = PAPER_FEATURES[0, 0]
    expected = torch.tensor([[1.6871, 0.4676], [2.0242, 2.3571]])
    by_slicing = torch.tensor(
        [
            [f[0:3, 0:3].max(), f[0:3, 2:5].max()],
            [f[2:5, 0:3].max(), f[2:5, 2:5].max()],
        ]
    )
    torch.testing.assert_close(by_slicing, expected, atol=0, rtol=0)
    for out in (
        roi_pool(PAPER_FEATURES, PAPER_ROI, 2, PAPER_SCALE),
        reference_roi_pool(PAPER_FEATURES, PAPER_ROI, 2, PAPER_SCALE),
        RoIPool(2, PAPER_SCALE)(PAPER_FEATURES, PAPER_ROI),
    ):
        torch.testing.assert_close(out[0, 0], expected, atol=0, rtol=0)


@pytest.mark.parametrize("aggregation", ["avg", "max"])
def test_paper_example_roi_warp(aggregation):
    # Quantized box [0, 4] x [0, 4]: two bins of 2, one sample each at their centres 1 and 3,
    # which fall exactly on feature cells.
    f = PAPER_FEATURES[0, 0]
    expected = torch.stack([torch.stack([f[1, 1], f[1, 3]]), torch.stack([f[3, 1], f[3, 3]])])
    args = (PAPER_FEATURES, PAPER_ROI, 2, PAPER_SCALE, 1, aggregation)
    for out in (roi_warp(*args), reference_roi_warp(*args)):
        torch.testing.assert_close(out[0, 0], expected, atol=1e-6, rtol=0)


def test_quantize_rois_rounds_half_away_from_zero():
    rois = torch.tensor([[3.0, 2.0, 6.0, -2.0, -6.0], [0.0, 1.9, 2.1, 4.2, 5.8]])
    q = quantize_rois(rois, 0.25)  # 0.5 -> 1, 1.5 -> 2, -0.5 -> -1, -1.5 -> -2
    expected = torch.tensor([[3.0, 1.0, 2.0, -1.0, -2.0], [0.0, 0.0, 1.0, 1.0, 1.0]])
    torch.testing.assert_close(q, expected, atol=0, rtol=0)


ALIGN_CASES = list(itertools.product(["avg", "max"], [True, False], [2, 1, 0, -1]))


@pytest.mark.parametrize("aggregation,aligned,sampling_ratio", ALIGN_CASES)
def test_roi_align_matches_reference(aggregation, aligned, sampling_ratio):
    feats, rois, scale = _random_case()
    args = (feats, rois, (3, 4), scale, sampling_ratio, aligned, aggregation)
    out = roi_align(*args)
    assert out.shape == (rois.shape[0], 3, 3, 4)
    torch.testing.assert_close(out, reference_roi_align(*args), atol=1e-10, rtol=0)
    assert out[0].abs().max() == 0  # samples beyond one pixel off the map read 0


@pytest.mark.parametrize("aligned,sampling_ratio", [(True, 0), (False, 0), (False, 2)])
def test_reference_avg_matches_torchvision(aligned, sampling_ratio):
    feats, rois, scale = _random_case(seed=1)
    expected = torchvision.ops.roi_align(feats, rois, (3, 4), scale, sampling_ratio, aligned)
    ref = reference_roi_align(feats, rois, (3, 4), scale, sampling_ratio, aligned, "avg")
    torch.testing.assert_close(ref, expected, atol=1e-10, rtol=0)


def test_max_with_one_sample_equals_torchvision_average_float32():
    feats, rois, scale = _random_case(dtype=torch.float32, seed=2)
    for aligned in (True, False):
        expected = torchvision.ops.roi_align(feats, rois, 5, scale, 1, aligned)
        out = roi_align(feats, rois, 5, scale, 1, aligned, aggregation="max")
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_max_is_at_least_average():
    feats, rois, scale = _random_case(seed=3)
    avg = roi_align(feats, rois, 4, scale, 0, True, "avg")
    mx = roi_align(feats, rois, 4, scale, 0, True, "max")
    assert (mx >= avg - 1e-12).all()
    assert (mx > avg + 1e-3).any()


def test_roi_pool_matches_reference_and_torchvision():
    feats, rois, scale = _random_case(seed=4)
    out = roi_pool(feats, rois, (3, 4), scale)
    torch.testing.assert_close(out, reference_roi_pool(feats, rois, (3, 4), scale))
    torch.testing.assert_close(out, torchvision.ops.roi_pool(feats, rois, (3, 4), scale))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_roi_pool_half_precision_on_cpu_equals_float32(dtype):
    # torchvision has no CPU kernel for these dtypes; the op pools in float32, which is exact.
    feats, rois, scale = _random_case(dtype=torch.float32, seed=5)
    half = feats.to(dtype).requires_grad_()
    out = roi_pool(half, rois, (3, 4), scale)
    assert out.dtype == dtype
    expected = torchvision.ops.roi_pool(half.detach().float(), rois, (3, 4), scale).to(dtype)
    assert torch.equal(out, expected)
    out.float().sum().backward()
    assert half.grad is not None and half.grad.dtype == dtype and half.grad.abs().sum() > 0


def test_roi_pool_module_under_cpu_bf16_autocast():
    feats, rois, scale = _random_case(dtype=torch.float32, seed=6)
    conv = torch.nn.Conv2d(3, 3, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = RoIPool((2, 2), scale)(conv(feats), rois)
    assert out.shape == (rois.shape[0], 3, 2, 2) and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("aggregation,sampling_ratio", itertools.product(["avg", "max"], [2, 0]))
def test_roi_warp_matches_reference(aggregation, sampling_ratio):
    feats, rois, scale = _random_case(seed=5)
    args = (feats, rois, (3, 4), scale, sampling_ratio, aggregation)
    torch.testing.assert_close(roi_warp(*args), reference_roi_warp(*args), atol=1e-10, rtol=0)


def test_roi_warp_equals_unaligned_roi_align_on_grid_aligned_rois():
    feats, rois, scale = _random_case(seed=6)
    on_grid = torch.cat([rois[:, :1], torch.round(rois[:, 1:] * scale) / scale], dim=1)
    warped = roi_warp(feats, on_grid, 4, scale, 2, "avg")
    aligned = roi_align(feats, on_grid, 4, scale, 2, aligned=False)
    torch.testing.assert_close(warped, aligned, atol=1e-12, rtol=0)
    # Off the grid the two differ: RoIWarp really quantizes.
    assert not torch.allclose(
        roi_warp(feats, rois, 4, scale, 2), roi_align(feats, rois, 4, scale, 2, False)
    )


def _tiny_case():
    g = torch.Generator().manual_seed(7)
    feats = torch.randn(2, 1, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor(
        [[0.0, 1.3, 2.2, 17.1, 13.4], [1.0, 4.6, 0.7, 11.9, 19.3]], dtype=torch.float64
    )
    return feats, rois


@pytest.mark.parametrize(
    "fn",
    [
        lambda f, r: roi_align(f, r, 2, 0.25, 2, True, "avg"),
        lambda f, r: roi_align(f, r, 2, 0.25, 0, False, "avg"),
        lambda f, r: roi_align(f, r, 2, 0.25, 2, True, "max"),
        lambda f, r: roi_align(f, r, (2, 3), 0.25, 0, False, "max"),
        lambda f, r: roi_pool(f, r, 2, 0.25),
        lambda f, r: roi_warp(f, r, 2, 0.25, 2, "avg"),
        lambda f, r: roi_warp(f, r, 2, 0.25, 0, "max"),
    ],
    ids=["align-avg", "align-avg-adaptive", "align-max", "align-max-adaptive", "pool"]
    + ["warp-avg", "warp-max"],
)
def test_gradcheck(fn):
    feats, rois = _tiny_case()
    assert torch.autograd.gradcheck(lambda f: fn(f, rois), (feats,), eps=1e-6, atol=1e-5)


OPS = [
    lambda f, r, agg, sr: roi_align(f, r, (2, 3), 0.5, sr, True, agg),
    lambda f, r, agg, sr: roi_align(f, r, (2, 3), 0.5, sr, False, agg),
    lambda f, r, agg, sr: roi_warp(f, r, (2, 3), 0.5, sr, agg),
    lambda f, r, agg, sr: roi_pool(f, r, (2, 3), 0.5),
]


@pytest.mark.parametrize("op", range(len(OPS)))
@pytest.mark.parametrize("aggregation,sampling_ratio", itertools.product(["avg", "max"], [2, 0]))
def test_empty_and_zero_area_rois(op, aggregation, sampling_ratio):
    feats = torch.randn(2, 4, 6, 7, requires_grad=True)
    empty = OPS[op](feats, torch.zeros(0, 5), aggregation, sampling_ratio)
    assert empty.shape == (0, 4, 2, 3)
    empty.sum().backward()  # no RoIs: still a valid graph

    degenerate = torch.tensor([[0, 3.0, 2.0, 3.0, 8.0], [1, 1.0, 4.0, 9.0, 4.0], [0, 5, 5, 5, 5]])
    out = OPS[op](feats, degenerate, aggregation, sampling_ratio)
    assert out.shape == (3, 4, 2, 3)
    assert torch.isfinite(out).all()
    ref_kwargs = dict(aggregation=aggregation) if op < 3 else {}
    if op < 2:
        ref = reference_roi_align(
            feats, degenerate, (2, 3), 0.5, sampling_ratio, op == 0, **ref_kwargs
        )
    elif op == 2:
        ref = reference_roi_warp(feats, degenerate, (2, 3), 0.5, sampling_ratio, **ref_kwargs)
    else:
        ref = reference_roi_pool(feats, degenerate, (2, 3), 0.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_registry_and_modules():
    for name in ("MRCNNRoIAlign", "MRCNNRoIPool", "MRCNNRoIWarp"):
        assert name in ROI_OP_REGISTRY
    feats, rois, scale = _random_case(dtype=torch.float32, seed=8)
    align = ROI_OP_REGISTRY.get("MRCNNRoIAlign")(
        7, scale, sampling_ratio=0, aligned=True, aggregation="max"
    )
    torch.testing.assert_close(align(feats, rois), roi_align(feats, rois, 7, scale, 0, True, "max"))
    assert "aggregation='max'" in repr(align) and "aligned=True" in repr(align)

    pool = ROI_OP_REGISTRY.get("MRCNNRoIPool")(
        7, scale, sampling_ratio=3, aligned=False, aggregation="max"
    )
    torch.testing.assert_close(pool(feats, rois), roi_pool(feats, rois, 7, scale))
    with pytest.raises(ValueError, match="aggregation='max'"):
        ROI_OP_REGISTRY.get("MRCNNRoIPool")(7, scale, 0, aligned=False, aggregation="avg")
    with pytest.raises(ValueError, match="aligned=False"):
        ROI_OP_REGISTRY.get("MRCNNRoIPool")(7, scale, 0, aligned=True, aggregation="max")

    warp = ROI_OP_REGISTRY.get("MRCNNRoIWarp")(7, scale, 2, aligned=False, aggregation="max")
    torch.testing.assert_close(warp(feats, rois), roi_warp(feats, rois, 7, scale, 2, "max"))
    with pytest.raises(ValueError, match="aligned=False"):
        ROI_OP_REGISTRY.get("MRCNNRoIWarp")(7, scale, 2, aligned=True, aggregation="avg")
    with pytest.raises(ValueError, match="aggregation"):
        RoIWarp(7, scale, 2, aggregation="sum")
    with pytest.raises(ValueError, match="aggregation"):
        roi_align(feats, rois, 7, scale, 2, aggregation="median")
    assert "spatial_scale=0.25" in repr(RoIPool(7, scale))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("sampling_ratio", [2, 0])
def test_max_on_cuda_matches_cpu(sampling_ratio):
    feats, rois, scale = _random_case(dtype=torch.float32, seed=9)
    cpu = roi_align(feats, rois, 7, scale, sampling_ratio, True, "max")
    gpu = roi_align(feats.cuda(), rois.cuda(), 7, scale, sampling_ratio, True, "max")
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=1e-5)
