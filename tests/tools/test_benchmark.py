"""The benchmark's pieces: built-in counterparts on the same weights, the interleaved table, and
the inference-mode transforms it measures."""

import torch
from tool_helpers import SHAPES_CONFIG, TINY_OPTS

from mrcnn_plugin.benchmark import load_cfg, make_batch, use_builtin_components
from mrcnn_plugin.cli.benchmark import format_table
from mrcnn_plugin.config import build_cfg
from mrcnn_plugin.engine.prefix_nms import prefix_batched_nms
from mrcnn_plugin.layers.roi_ops import roi_align_nhwc


def test_builtin_counterpart_has_the_same_state_dict_names():
    from detectron2.modeling import build_model

    plugin = build_model(load_cfg(SHAPES_CONFIG, TINY_OPTS, builtin=False))
    builtin_cfg = load_cfg(SHAPES_CONFIG, TINY_OPTS, builtin=True)
    assert builtin_cfg.MODEL.ROI_HEADS.NAME == "StandardROIHeads"
    assert builtin_cfg.MODEL.ROI_MASK_HEAD.POOLER_TYPE == "ROIAlignV2"
    builtin = build_model(builtin_cfg)
    incompatible = builtin.load_state_dict(plugin.state_dict(), strict=True)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys


def test_roipool_maps_to_detectron2s_pooler_type():
    cfg = build_cfg(SHAPES_CONFIG, ["MODEL.MRCNN.ROI_OP.NAME", "MRCNNRoIPool"])
    assert use_builtin_components(cfg).MODEL.ROI_BOX_HEAD.POOLER_TYPE == "ROIPool"


def test_make_batch_is_deterministic_and_has_ground_truth():
    cfg = load_cfg(SHAPES_CONFIG, TINY_OPTS, builtin=False)
    a, b = make_batch(cfg, 2, 64, 80), make_batch(cfg, 2, 64, 80)
    assert torch.equal(a[1]["image"], b[1]["image"])
    assert len(a[0]["instances"].gt_boxes) == 5


def test_nhwc_roi_align_matches_torchvision():
    import torchvision

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 20, 30, generator=g)
    xy = torch.rand(40, 2, generator=g) * 100 - 10
    rois = torch.cat([torch.randint(0, 2, (40, 1), generator=g).float(), xy,
                      xy + torch.rand(40, 2, generator=g) * 60], 1)  # fmt: skip
    for aligned, ratio in ((True, 0), (False, 2)):
        ref = torchvision.ops.roi_align(x, rois, (7, 7), 0.25, ratio, aligned)
        got = roi_align_nhwc(x.contiguous(memory_format=torch.channels_last), rois, (7, 7), 0.25,
                             ratio, aligned)  # fmt: skip
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_prefix_nms_equals_full_nms():
    from detectron2.layers import batched_nms

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(5000, 2, generator=g) * 500
    boxes = torch.cat([xy, xy + 20 + torch.rand(5000, 2, generator=g) * 80], 1)
    scores = torch.rand(5000, generator=g)
    classes = torch.randint(0, 5, (5000,), generator=g)
    full = batched_nms(boxes, scores, classes, 0.5)[:100]
    assert torch.equal(prefix_batched_nms(boxes, scores, classes, 0.5, 100), full)


def test_format_table_ratios():
    rows = [
        {"contender": "detectron2", "mode": "fp32", "median_s": 2.0, "peak_mib": 100.0,
         "detections": 100},
        {"contender": "plugin fast", "mode": "fast", "median_s": 0.5, "peak_mib": 50.0,
         "detections": 100},
    ]  # fmt: skip
    result = {"config": "x.yaml", "rows": rows, "gflop": {"total": 100.0},
              "rates": {"fp32": 100.0, "bf16": 400.0}}  # fmt: skip
    table = format_table(result, "cpu")
    assert "0.250x" in table and "2.00 (bf16)" in table


def test_benchmark_reports_onnxruntime_beside_eager(tmp_path, capsys):
    """mrcnn-benchmark end to end on a tiny model: the ONNX Runtime row (exported from the same
    weights, same image and threads) sits beside the eager contenders and finds the same
    detections as the plugin's eager float32 model."""
    import json

    from mrcnn_plugin.cli import benchmark

    out = tmp_path / "rows.json"
    benchmark.main(["--config-file", SHAPES_CONFIG, "--mode", "exact", "--no-torchvision",
                    "--image-size", "64", "96", "--threads", "1", "--warmup", "1",
                    "--repeats", "2", "--json-output", str(out), *TINY_OPTS])  # fmt: skip
    table = capsys.readouterr().out
    rows = {r["contender"]: r for r in json.loads(out.read_text())["inference"][0]["rows"]}
    assert set(rows) == {"detectron2", "plugin exact", "onnxruntime"}
    onnx, eager = rows["onnxruntime"], rows["plugin exact"]
    assert onnx["mode"] == "fp32" and len(onnx["runs_s"]) == 2 and onnx["median_s"] > 0
    assert onnx["detections"] == eager["detections"] == rows["detectron2"]["detections"] > 0
    assert any(line.startswith("onnxruntime ") for line in table.splitlines())
