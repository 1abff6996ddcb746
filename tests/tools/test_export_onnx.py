"""ONNX export (mrcnn_plugin.export, export_verify) checked against eager in ONNX Runtime.

Every model is traced on one input size and checked at 4 others (different aspect ratios, and
rescaled to larger original images) through the numpy post-processing of
mrcnn_plugin/deploy/onnx_runner.py: the same detections and classes, boxes within 1e-3 px,
scores within 1e-4, mask IoU >= 0.99 per instance, keypoints within 0.5 px. Random weights
(perturbed, many detections per image) for Mask R-CNN FPN and C4, Keypoint R-CNN and
keypoint + mask; briefly trained weights for many and zero detections, in ONNX and TorchScript.
"""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from export_helpers import (
    C4_CONFIG,
    C4_OPTS,
    KEYPOINT_CONFIG,
    KEYPOINT_MASK_CONFIG,
    KEYPOINT_OPTS,
    SHAPES_OPTS,
    TRAINED_OPTS,
    as_input,
    noise_input,
    perturbed_model,
    shapes_sample,
    trained_shapes_model,
)
from tool_helpers import ROOT, SHAPES_CONFIG, run_tool

from mrcnn_plugin.export import (
    ExportAdapter,
    export_onnx,
    export_torchscript,
    load_image,
    nonstandard_onnx_ops,
    save_torchscript,
)
from mrcnn_plugin.export_verify import (
    REPORT_NAME,
    compare_results,
    eager_results,
    verify_exported,
)

# The traced size, then model inputs (H, W) of other sizes and the original sizes they map to.
TRACE_SIZE = (64, 64)
OTHER_SIZES = [((48, 96), (96, 192)), ((96, 40), (96, 40)), ((72, 72), (144, 144)),
               ((33, 57), (99, 171))]  # fmt: skip
MODELS = {
    "mask_fpn": (SHAPES_CONFIG, SHAPES_OPTS),
    "mask_c4": (C4_CONFIG, C4_OPTS),
    "keypoint_fpn": (KEYPOINT_CONFIG, KEYPOINT_OPTS),
    "keypoint_mask_fpn": (KEYPOINT_MASK_CONFIG, KEYPOINT_OPTS),
}


def _export(model, fmt, trace_input, path):
    adapter = ExportAdapter(model, keypoints_in_graph=fmt != "onnx")
    if fmt == "onnx":
        export_onnx(adapter, trace_input, path)
    else:
        save_torchscript(export_torchscript(adapter, trace_input), path)
    return adapter.output_names


@pytest.mark.parametrize("name", sorted(MODELS))
def test_onnx_any_input_size_matches_eager(name, tmp_path):
    cfg, model = perturbed_model(*MODELS[name])
    path = str(tmp_path / "model.onnx")
    names = _export(model, "onnx", noise_input(0, *TRACE_SIZE), path)
    assert nonstandard_onnx_ops(path) == []
    if cfg.MODEL.KEYPOINT_ON:
        assert "pred_keypoints" not in names and names[-1] == "pred_keypoint_heatmaps"
    inputs = [(f"{h}x{w}", noise_input(i + 1, h, w), size)
              for i, ((h, w), size) in enumerate(OTHER_SIZES)]  # fmt: skip
    entries = verify_exported(model, path, names, inputs)
    for entry in entries:
        assert entry["ok"], entry
        assert entry["num_detections"][0] > 0, entry
        assert ("mask_iou_min" in entry) == cfg.MODEL.MASK_ON
        assert ("keypoints_max_abs_px" in entry) == cfg.MODEL.KEYPOINT_ON
    assert len({e["num_detections"][0] for e in entries}) > 1, entries
    if name == "mask_c4":  # the traced split by proposal count must not hold the graph back
        counts = [_num_proposals(model, image) for _, image, _ in inputs]
        assert min(counts) < _num_proposals(model, noise_input(0, *TRACE_SIZE)), counts


def _num_proposals(model, image):
    with torch.no_grad():
        images = model.preprocess_image([{"image": image}])
        proposals, _ = model.proposal_generator(images, model.backbone(images.tensor), None)
    return len(proposals[0])


@pytest.fixture(scope="module")
def trained():
    return trained_shapes_model()


@pytest.fixture(scope="module")
def trained_inputs():
    """Shapes images resized to 5 sizes and aspect ratios, and a plain grey image."""
    rng = np.random.default_rng(5)
    inputs = []
    for h, w in [(64, 64), (48, 96), (80, 60), (64, 100), (56, 56)]:
        image = cv2.resize(shapes_sample(rng, 64)[0], (w, h))
        inputs.append((f"shapes {h}x{w}", as_input(image), (2 * h, 2 * w)))
    inputs.append(("grey 64x80", torch.full((3, 64, 80), 128.0), (64, 80)))
    return inputs


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_trained_weights_many_and_zero_detections(fmt, trained, trained_inputs, tmp_path):
    _, model = trained
    path = str(tmp_path / f"model.{fmt}")
    names = _export(model, fmt, trained_inputs[0][1], path)  # traced on the 64 x 64 image
    entries = verify_exported(model, path, names, trained_inputs[1:])
    for entry in entries:
        assert entry["ok"], entry
    counts = [e["num_detections"][0] for e in entries]
    assert max(counts[:-1]) >= 5 and len(set(counts)) > 2, counts
    # Zero detections on trained weights, independent of how training came out on this CPU:
    # a score threshold above 1 leaves nothing; the file must return empty outputs.
    predictor = model.roi_heads.box_predictor
    kept, predictor.test_score_thresh = predictor.test_score_thresh, 1.01
    try:
        names = _export(model, fmt, trained_inputs[0][1], path)
        entries = verify_exported(model, path, names, trained_inputs[-1:])
    finally:
        predictor.test_score_thresh = kept
    assert entries[0]["ok"] and entries[0]["num_detections"][0] == 0, entries


def test_compare_results_fails_on_each_tolerance():
    """The comparison is not vacuous: each field past its tolerance fails the check."""
    mask = np.zeros((1, 20, 20), bool)
    mask[0, 2:12, 2:12] = True
    reference = {"boxes": np.array([[2.0, 2.0, 12.0, 12.0]], np.float32),
                 "scores": np.array([0.9], np.float32), "classes": np.array([1]),
                 "masks": mask, "keypoints": np.array([[[5.0, 5.0, 0.3]]], np.float32)}  # fmt: skip
    assert compare_results(reference, reference)["ok"]
    changes = {
        "boxes": reference["boxes"] + np.float32(2e-3),
        "scores": reference["scores"] - np.float32(2e-4),
        "classes": np.array([2]),
        "masks": np.roll(mask, 1, axis=2),  # IoU 90/110
        "keypoints": reference["keypoints"] + np.array([0.6, 0.0, 0.0], np.float32),
    }
    for name, value in changes.items():
        assert not compare_results(reference, dict(reference, **{name: value}))["ok"], name
    fewer = {k: v[:0] for k, v in reference.items()}
    assert compare_results(reference, fewer)["num_detections"] == [1, 0]
    assert not compare_results(reference, fewer)["ok"]


BLOCKER = '''
import sys

class _Blocked:
    """Refuses torch, torchvision, detectron2 and the project's package: a deployment host."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "detectron2", "mrcnn_plugin"):
            raise ImportError(f"{name} is not installed on this deployment host")
        return None

sys.meta_path.insert(0, _Blocked())
'''


def test_cli_onnx_export_and_torch_free_runner(trained, tmp_path):
    """mrcnn-export --format onnx on images of 5 sizes (one plain grey), then the runner in a
    process that cannot import torch or detectron2: its COCO JSON matches the eager model on the
    original images (resize, graph and post-processing all in numpy). How many detections the
    briefly trained model finds on the grey image depends on this CPU's numerics, so only the
    match is checked; empty outputs are covered by the zero-detection tests."""
    cfg, model = trained
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("trained")
    rng = np.random.default_rng(7)
    paths = []
    for i, (h, w) in enumerate([(64, 64), (96, 48), (60, 150), (128, 100)]):
        paths.append(str(tmp_path / f"shapes{i}.png"))
        cv2.imwrite(paths[-1], cv2.resize(shapes_sample(rng, 64)[0], (w, h)))
    paths.append(str(tmp_path / "grey.png"))
    cv2.imwrite(paths[-1], np.full((70, 90, 3), 128, np.uint8))
    out = tmp_path / "export"
    proc = run_tool([
        "tools/export.py", "--config-file", SHAPES_CONFIG, "--format", "onnx",
        "--output", str(out), "--sample-image", *paths[1:], "--trace-image", paths[0],
        "--opts", *TRAINED_OPTS, "MODEL.WEIGHTS", str(tmp_path / "trained.pth"),
    ])  # fmt: skip
    assert "MISMATCH" not in proc.stdout
    with open(out / REPORT_NAME) as f:
        report = json.load(f)
    assert report["ok"] is True and report["nonstandard_ops"] == []
    assert report["verified_sizes_other_than_traced"] == 4
    grey = report["images"][-1]["num_detections"]
    assert grey[0] == grey[1], grey

    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=str(blocker), PYTHONWARNINGS="ignore")
    check = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True)
    assert check.returncode != 0 and b"not installed on this deployment host" in check.stderr
    runner = os.path.join(ROOT, "mrcnn_plugin", "deploy", "onnx_runner.py")
    pred = tmp_path / "pred"
    subprocess.run(
        [sys.executable, runner, "--model", str(out / "model.onnx"), "--input", *paths,
         "--output", str(pred), "--threads", "1"],
        env=env, cwd=str(tmp_path), check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    with open(pred / "predictions.json") as f:
        coco = json.load(f)
    assert [image["file_name"] for image in coco["images"]] == paths
    for image_id, path in enumerate(paths, start=1):
        assert os.path.isfile(pred / (os.path.splitext(os.path.basename(path))[0] + ".png"))
        image, size = load_image(cfg, path)
        expected = eager_results(model, image, size)
        found = [a for a in coco["annotations"] if a["image_id"] == image_id]
        assert len(found) == len(expected["scores"])
        for k, entry in enumerate(found):
            x0, y0, w, h = entry["bbox"]
            assert np.abs(np.array([x0, y0, x0 + w, y0 + h]) - expected["boxes"][k]).max() <= 1e-3
            assert abs(entry["score"] - expected["scores"][k]) <= 1e-4
            assert entry["category_id"] == expected["classes"][k] + 1
            mask = mask_util.decode(mask_util.frPyObjects(entry["segmentation"], *size)) > 0
            reference = expected["masks"][k]
            assert (mask & reference).sum() >= 0.99 * (mask | reference).sum()
    assert len(coco["annotations"]) >= 5
