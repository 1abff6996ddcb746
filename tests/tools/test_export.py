"""TorchScript / ONNX export of tiny models (mrcnn_plugin.export, tools/export.py).

The models are untrained but their predictors are perturbed with a fixed seed, so the 64x64
test images get different numbers of detections (the tracing image included): a traced graph
that froze the tracing image's count fails here. Eager references run the unpatched plugin code.
"""

import json
import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from tool_helpers import ROOT, SHAPES_CONFIG, TINY_OPTS, run_tool

from mrcnn_plugin.config import build_cfg
from mrcnn_plugin.export import (
    REPORT_NAME,
    ExportAdapter,
    check_exportable,
    export_and_verify,
    export_onnx,
    export_torchscript,
    postprocess,
)

SIZE = 64
ATOL = 1e-4
# Threshold 0.0 would give TEST.DETECTIONS_PER_IMAGE detections on every image; 0.1 on the
# perturbed scores gives 16-23 detections, different per image.
OPTS = TINY_OPTS + ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.1", "TEST.DETECTIONS_PER_IMAGE", "100"]
KEYPOINT_CONFIG = os.path.join(
    ROOT, "configs", "Synthetic", "keypoint_mask_rcnn_R_18_FPN_persons.yaml"
)
KEYPOINT_OPTS = TINY_OPTS + [
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.02",
    "TEST.DETECTIONS_PER_IMAGE", "100",
    "MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS", "(32,)",
    "MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS", "4",
]  # fmt: skip


def _perturbed_model(config, opts):
    """The tiny model (seed 0) with class scores, box deltas and mask logits spread out."""
    torch.manual_seed(0)
    cfg = build_cfg(config, opts)
    cfg.freeze()
    model = build_model(cfg).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        predictor = model.roi_heads.box_predictor
        predictor.cls_score.weight.normal_(0, 1.0, generator=generator)
        predictor.bbox_pred.weight.normal_(0, 0.01, generator=generator)
        model.roi_heads.mask_head.predictor.weight.normal_(0, 0.1, generator=generator)
    return cfg, model


def _as_input(image):
    """(H, W, 3) uint8 BGR -> the model input (3, H, W) float32."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()


def _eager(adapter, image):
    with torch.no_grad():
        return list(adapter(_as_input(image)))


@pytest.fixture(scope="module")
def shapes_model():
    return _perturbed_model(SHAPES_CONFIG, OPTS)


@pytest.fixture(scope="module")
def images():
    """4 BGR images: noise with 1-4 white squares."""
    rng = np.random.default_rng(0)
    result = []
    for i in range(4):
        image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        for _ in range(i + 1):
            x, y = (int(v) for v in rng.integers(0, 40, 2))
            cv2.rectangle(image, (x, y), (x + 20, y + 20), (255, 255, 255), -1)
        result.append(image)
    return result


@pytest.fixture(scope="module")
def image_files(images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = [str(folder / f"sample{i}.png") for i in range(len(images))]
    for path, image in zip(paths, images):
        cv2.imwrite(path, image)
    return paths


@pytest.fixture(scope="module")
def traced(shapes_model, images, tmp_path_factory):
    """(adapter, the model traced on images[0], saved and loaded back)."""
    adapter = ExportAdapter(shapes_model[1])
    path = str(tmp_path_factory.mktemp("ts") / "model.ts")
    export_torchscript(adapter, _as_input(images[0])).save(path)
    return adapter, torch.jit.load(path)


def _assert_outputs_close(names, reference, exported, atol):
    assert len(reference) == len(exported) == len(names)
    assert reference[0].shape[0] == exported[0].shape[0], "number of detections"
    for name, ref, out in zip(names, reference, exported):
        assert ref.shape == out.shape, name
        if name == "pred_classes":
            assert torch.equal(ref, out.to(ref.dtype)), name
        else:
            assert torch.allclose(ref, out.to(ref.dtype), rtol=0, atol=atol), name


def test_traced_model_matches_eager_on_held_out_images(traced, images):
    adapter, module = traced
    assert adapter.output_names == ["pred_boxes", "scores", "pred_classes", "pred_masks"]
    counts = []
    for image in images:  # images[0] traced; the other three held out
        reference = _eager(adapter, image)
        with torch.no_grad():
            exported = list(module(_as_input(image)))
        _assert_outputs_close(adapter.output_names, reference, exported, ATOL)
        assert exported[3].shape[1:] == (1, 28, 28)
        counts.append(len(exported[0]))
    assert min(counts) > 0
    # The held-out images must exercise other detection counts than the tracing image's.
    assert any(count != counts[0] for count in counts[1:]), counts


def test_postprocess_of_traced_outputs_equals_eager_forward(traced, shapes_model, images):
    """Pasted masks and rescaled boxes from the flat outputs = the model's own forward."""
    adapter, module = traced
    height, width = 2 * SIZE, 3 * SIZE // 2  # an original image larger than the input
    x = _as_input(images[2])
    with torch.no_grad():
        outputs = dict(zip(adapter.output_names, module(x)))
        expected = shapes_model[1]([{"image": x, "height": height, "width": width}])[0]
    expected = expected["instances"]
    result = postprocess(outputs, (SIZE, SIZE), (height, width))
    assert len(result) == len(expected) > 0
    assert result.image_size == (height, width)
    assert torch.allclose(result.pred_boxes.tensor, expected.pred_boxes.tensor, atol=ATOL)
    assert torch.equal(result.scores, expected.scores)
    assert result.pred_masks.shape == (len(expected), height, width)
    assert result.pred_masks.dtype == torch.bool and result.pred_masks.any()
    assert torch.equal(result.pred_masks, expected.pred_masks)


def test_keypoint_mask_model_traced(images):
    """Keypoints come out of the graph: detectron2's heatmaps_to_keypoints, scripted when
    tracing, decodes any number of detections."""
    cfg, model = _perturbed_model(KEYPOINT_CONFIG, KEYPOINT_OPTS)
    adapter = ExportAdapter(model)
    names = adapter.output_names
    assert names[-3:] == ["pred_masks", "pred_keypoints", "pred_keypoint_heatmaps"]
    module = export_torchscript(adapter, _as_input(images[0]))
    counts = [len(_eager(adapter, images[0])[0])]
    for image in images[1:]:
        x = _as_input(image)
        with torch.no_grad():
            exported = list(module(x))
            expected = model([{"image": x, "height": SIZE, "width": SIZE}])[0]["instances"]
        _assert_outputs_close(names, _eager(adapter, image), exported, ATOL)
        assert exported[4].shape[1:] == (4, 3)
        assert exported[5].shape[1:] == (4, 56, 56)  # 14x14 RoIs, deconv x2, upsampling x2
        outputs = dict(zip(names, exported))
        before = outputs["pred_keypoints"].clone()
        result = postprocess(outputs, (SIZE, SIZE))
        assert torch.equal(outputs["pred_keypoints"], before)  # the outputs are not modified
        assert torch.allclose(result.pred_keypoints, expected.pred_keypoints, atol=ATOL)
        assert torch.equal(result.pred_keypoint_heatmaps, expected.pred_keypoint_heatmaps)
        counts.append(len(result))
    assert min(counts) > 0 and any(count != counts[0] for count in counts[1:]), counts


def test_check_exportable_refuses_adaptive_max_pooling():
    cfg = build_cfg(SHAPES_CONFIG, OPTS)
    check_exportable(cfg)  # the default RoIAlign (avg) traces
    cfg.MODEL.MRCNN.ROI_OP.AGGREGATION = "max"
    with pytest.raises(ValueError, match="POOLER_SAMPLING_RATIO"):
        check_exportable(cfg)
    cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO = 2
    cfg.MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO = 2
    check_exportable(cfg)
    # A "max" op chosen for the mask branch alone is refused too.
    cfg = build_cfg(SHAPES_CONFIG, OPTS)
    cfg.MODEL.MRCNN.ROI_OP.MASK.AGGREGATION = "max"
    with pytest.raises(ValueError, match="ROI_MASK_HEAD"):
        check_exportable(cfg)


def test_export_refuses_sample_images_of_another_size(shapes_model, image_files, tmp_path):
    other = str(tmp_path / "wide.png")
    cv2.imwrite(other, np.zeros((SIZE, 2 * SIZE, 3), np.uint8))  # resizes to 64 x 128
    cfg, model = shapes_model
    with pytest.raises(ValueError, match="fixed input size"):
        export_and_verify(model, cfg, "torchscript", str(tmp_path), [image_files[0], other])


def test_cli_torchscript_end_to_end(tmp_path, shapes_model, traced, image_files, images):
    cfg, model = shapes_model
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("perturbed")
    out = tmp_path / "export"
    proc = run_tool([
        "tools/export.py",
        "--config-file", SHAPES_CONFIG,
        "--format", "torchscript",
        "--output", str(out),
        "--sample-image", *image_files,
        "--atol", str(ATOL),
        "--opts", *OPTS, "MODEL.WEIGHTS", str(tmp_path / "perturbed.pth"),
    ])  # fmt: skip
    assert "MISMATCH" not in proc.stdout

    with open(out / REPORT_NAME) as f:
        report = json.load(f)
    assert report["ok"] is True and report["detection_counts_vary"] is True
    assert report["input"]["shape"] == [3, SIZE, SIZE]
    assert [e["image"] for e in report["images"]] == image_files
    for entry in report["images"]:
        eager, exported = entry["num_detections"]
        assert eager == exported > 0
        assert set(entry["max_abs_diff"]) == {"pred_boxes", "scores", "pred_classes", "pred_masks"}
        assert max(entry["max_abs_diff"].values()) <= ATOL
    # The written file holds the checkpoint's weights: it matches the in-process eager model.
    module = torch.jit.load(str(out / "model.ts"))
    with torch.no_grad():
        exported = list(module(_as_input(images[3])))
    _assert_outputs_close(traced[0].output_names, _eager(traced[0], images[3]), exported, ATOL)


def test_onnx_export_matches_eager(shapes_model, image_files, tmp_path):
    pytest.importorskip("onnx", reason="ONNX export needs the onnx package (not installed)")
    pytest.importorskip("onnxruntime", reason="running the ONNX file needs onnxruntime")
    cfg, model = shapes_model
    report = export_and_verify(model, cfg, "onnx", str(tmp_path), image_files, atol=1e-3)
    assert os.path.isfile(tmp_path / "model.onnx")
    for entry in report["images"]:
        eager, exported = entry["num_detections"]
        assert eager == exported > 0, entry
    assert report["ok"] is True, report["images"]
    assert report["detection_counts_vary"] is True


def test_onnx_export_without_onnx_says_so(shapes_model, images, tmp_path):
    try:
        import onnx  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("onnx is installed: test_onnx_export_matches_eager covers the export")
    with pytest.raises(ImportError, match="onnx"):
        export_onnx(ExportAdapter(shapes_model[1]), _as_input(images[0]), str(tmp_path / "m.onnx"))
