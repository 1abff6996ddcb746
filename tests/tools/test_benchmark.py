"""The benchmark measures the plugin model and detectron2's built-in model on the same
weights, and reports ratios."""

import json

import torch
from tool_helpers import SHAPES_CONFIG, TINY_OPTS, run_tool

from mrcnn_plugin.benchmark import load_cfg, make_batch, use_builtin_components
from mrcnn_plugin.cli.benchmark import format_table
from mrcnn_plugin.config import build_cfg


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
    assert a[0]["image"].shape == (3, 64, 80)
    assert len(a[0]["instances"].gt_boxes) == 5


def test_benchmark_cli_reports_both_models(tmp_path):
    out = tmp_path / "rows.json"
    args = ["tools/benchmark.py", "--config-file", SHAPES_CONFIG, "--image-size", "64", "64",
            "--warmup", "0", "--repeats", "1", "--json-output", str(out), *TINY_OPTS]  # fmt: skip
    result = run_tool(args)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(out.read_text())
    assert {(r["model"], r["mode"]) for r in rows} == {
        (m, mode) for m in ("plugin", "detectron2") for mode in ("inference", "train")
    }
    for r in rows:
        assert r["median_s"] > 0 and r["peak_mib"] > 0
    assert "ratio" in result.stdout and "plugin" in result.stdout


def test_format_table_ratios():
    rows = [
        {"model": "detectron2", "mode": "inference", "median_s": 2.0, "peak_mib": 100.0},
        {"model": "plugin", "mode": "inference", "median_s": 1.0, "peak_mib": 50.0},
    ]
    for r in rows:
        r.update(iters_per_s=1 / r["median_s"], images_per_s=1 / r["median_s"])
    assert "0.500x, 0.500x" in format_table(rows)
