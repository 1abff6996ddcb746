"""The CPU inference modes (engine/inference_modes.py): exact mode gives detectron2's built-in
model's results on the same weights (R50-FPN Mask R-CNN and Keypoint R-CNN), fast and quantized
fall back with one log line where the CPU lacks the units, and run where it has them (the CPU's
flags simulated through MRCNN_PLUGIN_CPUINFO)."""

import copy
import logging
import os

import pytest
import torch
from detectron2.modeling import build_model

from mrcnn_plugin.benchmark import benchmark_image, image_batch, inference_cfg, save_shared_weights
from mrcnn_plugin.engine.cpu_features import CPUINFO_ENV
from mrcnn_plugin.engine.inference_modes import (
    fold_frozen_batchnorm,
    prepare_for_inference,
    resolve_mode,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MASK_CONFIG = os.path.join(ROOT, "configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
KEYPOINT_CONFIG = os.path.join(ROOT, "configs/COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml")
SIZE = (160, 224)
SMALL = ["MODEL.RPN.PRE_NMS_TOPK_TEST", "300", "MODEL.RPN.POST_NMS_TOPK_TEST", "200",
         "TEST.DETECTIONS_PER_IMAGE", "50"]  # fmt: skip


def _cpuinfo(tmp_path, flags: str) -> str:
    path = tmp_path / f"cpuinfo_{flags.replace(' ', '_')}"
    path.write_text(f"processor\t: 0\nmodel name\t: test CPU\nflags\t\t: {flags}\n")
    return str(path)


def _models(config_file, tmp_path, builtin=True, size=SIZE):
    """(plugin model, built-in model) on one set of random weights, unit-scale activations."""
    weights = str(tmp_path / "weights.pth")
    save_shared_weights(config_file, SMALL, size, weights)
    state = torch.load(weights, weights_only=True)
    models = []
    for use_builtin in (False, True) if builtin else (False,):
        model = build_model(inference_cfg(config_file, SMALL, builtin=use_builtin)).eval()
        model.load_state_dict(state)
        models.append(model)
    return models


def _mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def _assert_same_detections(ours, theirs, box_px=1e-3):
    """Each detection has a counterpart of the same class, box within ``box_px`` and score
    within 1e-4 (random weights tie scores, which may swap the order), with mask IoU >= 0.99
    and keypoints within 0.5 px."""
    assert len(ours) == len(theirs) > 0
    used = set()
    for i in range(len(ours)):
        close = (
            (theirs.pred_classes == ours.pred_classes[i])
            & ((theirs.pred_boxes.tensor - ours.pred_boxes.tensor[i]).abs().amax(1) <= box_px)
            & ((theirs.scores - ours.scores[i]).abs() <= 1e-4)
        )
        candidates = [j for j in close.nonzero().flatten().tolist() if j not in used]
        assert candidates, f"detection {i} has no counterpart"
        j = candidates[0]
        used.add(j)
        if ours.has("pred_masks"):
            assert _mask_iou(ours.pred_masks[i], theirs.pred_masks[j]) >= 0.99
        if ours.has("pred_keypoints"):
            diff = (ours.pred_keypoints[i, :, :2] - theirs.pred_keypoints[j, :, :2]).abs()
            assert diff.max() <= 0.5


@pytest.mark.parametrize("config_file", [MASK_CONFIG, KEYPOINT_CONFIG], ids=["mask", "keypoint"])
def test_exact_mode_equals_builtin(config_file, tmp_path):
    plugin, builtin = _models(config_file, tmp_path)
    batch = image_batch(benchmark_image(*SIZE))
    with torch.no_grad():
        expected = builtin(batch)[0]["instances"]
        plain = plugin(batch)[0]["instances"]
    exact = prepare_for_inference(plugin, "exact")
    assert exact.mode == "exact" and not exact.bf16
    ours = exact(batch)[0]["instances"]
    _assert_same_detections(plain, expected)  # the plugin untouched is detectron2's model
    # Folded batch norms and channels-last convolutions round differently: through R50's 53
    # convs the box deltas move by up to 3e-3 px here (measured), 1e-5 of the image.
    _assert_same_detections(ours, expected, box_px=1e-2)


def test_fold_frozen_batchnorm_keeps_outputs():
    from detectron2.layers import Conv2d, FrozenBatchNorm2d

    torch.manual_seed(0)
    norm = FrozenBatchNorm2d(8)
    norm.weight.uniform_(0.5, 2)
    norm.bias.normal_()
    norm.running_mean.normal_()
    norm.running_var.uniform_(0.5, 2)
    conv = Conv2d(4, 8, 3, padding=1, bias=False, norm=norm, activation=torch.relu)
    x = torch.randn(2, 4, 9, 11)
    with torch.no_grad():
        before = conv(x)
        assert fold_frozen_batchnorm(conv) == 1 and conv.norm is None
        torch.testing.assert_close(conv(x), before, atol=1e-5, rtol=1e-5)


def test_fallbacks_are_one_log_line(tmp_path, caplog):
    avx2 = _cpuinfo(tmp_path, "sse2 avx2 fma")
    bf16_only = _cpuinfo(tmp_path, "avx2 avx512f avx512_bf16")
    everything = _cpuinfo(tmp_path, "avx2 amx_bf16 amx_int8 avx512_bf16 avx512_vnni")
    cases = [
        ("exact", avx2, "exact", 0),
        ("fast", avx2, "exact", 1),
        ("quantized", avx2, "exact", 1),
        ("quantized", bf16_only, "fast", 1),
        ("fast", bf16_only, "fast", 0),
        ("quantized", everything, "quantized", 0),
    ]
    for mode, cpuinfo, expected, lines in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mrcnn_plugin.engine.inference_modes"):
            assert resolve_mode(mode, "cpu", cpuinfo) == expected, (mode, cpuinfo)
        assert len(caplog.records) == lines, (mode, cpuinfo, caplog.text)
    assert resolve_mode("fast", "cuda", everything) == "exact"
    with pytest.raises(ValueError, match="INFERENCE_MODE must be one of"):
        resolve_mode("turbo")


def test_fast_and_quantized_run_where_the_cpu_has_the_units(tmp_path, monkeypatch):
    """On a CPU reporting AVX512-BF16 and VNNI, fast runs under bfloat16 autocast with float32
    outputs, and quantized runs the backbone, RPN conv and head towers int8; the detections stay
    near exact mode's (same weights) in count and score."""
    monkeypatch.setenv(CPUINFO_ENV, _cpuinfo(tmp_path, "avx2 avx512f avx512_bf16 avx512_vnni"))
    size = (96, 128)  # bfloat16 is emulated, slowly, where the CPU really lacks it
    batch = image_batch(benchmark_image(*size))
    (exact_model,) = _models(MASK_CONFIG, tmp_path, builtin=False, size=size)
    exact = prepare_for_inference(exact_model, "exact")(batch)[0]["instances"]
    for mode in ("fast", "quantized"):
        (model,) = _models(MASK_CONFIG, tmp_path, builtin=False, size=size)
        calibration = [image_batch(benchmark_image(*size, seed=s))[0] for s in (1, 2)]
        prepared = prepare_for_inference(model, mode, calibration=calibration)
        assert prepared.mode == mode and prepared.bf16
        out = prepared(batch)[0]["instances"]
        assert out.scores.dtype == torch.float32 and out.pred_boxes.tensor.dtype == torch.float32
        assert torch.isfinite(out.pred_boxes.tensor).all() and len(out) == len(exact)
        assert abs(out.scores.mean().item() - exact.scores.mean().item()) < 0.05
        if mode == "quantized":
            _assert_int8_units(model)


def _assert_int8_units(model):
    """The backbone, the RPN conv and each head's tower (not its predictor) run int8 kernels;
    a head tower takes an image's empty RoI batch."""
    from mrcnn_plugin.engine.int8_heads import QuantizedTower

    def int8(module):
        return any("quantized" in type(m).__module__ for m in module.modules())

    heads = model.roi_heads
    assert int8(model.backbone.bottom_up) and int8(model.proposal_generator.rpn_head.conv)
    head = getattr(heads, "mask_head", None) or heads.keypoint_head
    last = head.deconv if hasattr(head, "deconv") else head.score_lowres
    assert isinstance(next(iter(head)), QuantizedTower) and not int8(last)
    assert isinstance(next(iter(heads.box_head)), QuantizedTower)
    with torch.no_grad():
        assert head.layers(torch.zeros(0, 256, 14, 14)).shape[0] == 0
        assert heads.box_head(torch.zeros(0, 256, 7, 7)).shape == (0, 1024)


def test_quantized_keypoint_rcnn_runs_int8_heads(tmp_path, monkeypatch):
    """Keypoint R-CNN's 8-conv keypoint tower is quantized as one int8 unit; the keypoints stay
    float32 and the detections near exact mode's."""
    monkeypatch.setenv(CPUINFO_ENV, _cpuinfo(tmp_path, "avx2 avx512_vnni"))
    size = (96, 128)
    batch = image_batch(benchmark_image(*size))
    (model,) = _models(KEYPOINT_CONFIG, tmp_path, builtin=False, size=size)
    exact = prepare_for_inference(copy.deepcopy(model), "exact")(batch)[0]["instances"]
    calibration = [image_batch(benchmark_image(*size, seed=1))[0]]
    prepared = prepare_for_inference(model, "quantized", calibration=calibration)
    assert prepared.mode == "quantized" and not prepared.bf16
    out = prepared(batch)[0]["instances"]
    _assert_int8_units(model)
    assert out.pred_keypoints.dtype == torch.float32 and len(out) == len(exact)
    assert torch.isfinite(out.pred_keypoints).all()
    assert abs(out.scores.mean().item() - exact.scores.mean().item()) < 0.1


def test_quantized_c4_runs(tmp_path, monkeypatch):
    """A C4 model (RPN on res4, res5 box head, a mask head with no convs before its
    deconvolution) is quantized where it can be and runs."""
    from mrcnn_plugin.engine.int8_heads import QuantizedTower

    monkeypatch.setenv(CPUINFO_ENV, _cpuinfo(tmp_path, "avx2 avx512_vnni"))
    size = (96, 128)
    config = MASK_CONFIG.replace("mask_rcnn_R_50_FPN_1x", "mask_rcnn_R_50_C4_1x")
    (model,) = _models(config, tmp_path, builtin=False, size=size)
    calibration = [image_batch(benchmark_image(*size, seed=1))[0]]
    prepared = prepare_for_inference(model, "quantized", calibration=calibration)
    out = prepared(image_batch(benchmark_image(*size)))[0]["instances"]
    assert isinstance(model.proposal_generator.rpn_head.conv, QuantizedTower)
    assert not any(isinstance(m, QuantizedTower) for m in model.roi_heads.mask_head.modules())
    assert len(out) > 0 and out.pred_masks.shape[-2:] == size


def test_in_place_relus_become_fusable():
    """detectron2's in-place ReLUs are rewritten out of place (same values) where nothing else
    reads their input, so FX fuses them into the int8 convolutions and residual adds."""
    from detectron2.modeling.backbone.resnet import BottleneckBlock

    from mrcnn_plugin.engine.int8_convert import out_of_place_relus, plain_convs

    torch.manual_seed(0)
    block = plain_convs(BottleneckBlock(16, 32, bottleneck_channels=8, norm="")).eval()
    traced = out_of_place_relus(block)
    targets = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    assert torch.nn.functional.relu in targets
    assert torch.relu_ not in targets and torch.nn.functional.relu_ not in targets
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), block(x))


def test_in_place_head_relus_keep_outputs(tmp_path):
    """The heads' ReLUs made in place give the same outputs (each overwrites only the output
    of the layer before it)."""
    from mrcnn_plugin.engine.inference_modes import in_place_head_relus

    (model,) = _models(MASK_CONFIG, tmp_path, builtin=False)
    heads = model.roi_heads
    x = torch.randn(30, 256, 14, 14)
    with torch.no_grad():
        mask_before, box_before = heads.mask_head.layers(x), heads.box_head(x[:, :, :7, :7])
        # 4 mask convs + the deconv's ReLU, the box head's 2 fc ReLUs.
        assert in_place_head_relus(model) == 7
        assert heads.mask_head.deconv_relu.inplace
        torch.testing.assert_close(heads.mask_head.layers(x), mask_before)
        torch.testing.assert_close(heads.box_head(x[:, :, :7, :7]), box_before)
