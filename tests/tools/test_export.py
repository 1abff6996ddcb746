"""TorchScript export of tiny models (mrcnn_plugin.export, tools/export.py); the ONNX tests
are in test_export_onnx.py.

The models are untrained but their predictors are perturbed with a fixed seed, so the 64x64
test images get different numbers of detections (the tracing image included): a traced graph
that froze the tracing image's count fails here. Eager references run the unpatched plugin code.
"""

import json

import cv2
import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from export_helpers import (
    C4_CONFIG,
    C4_OPTS,
    KEYPOINT_MASK_CONFIG,
    KEYPOINT_OPTS,
    SHAPES_OPTS,
    noise_input,
    perturbed_model,
)
from tool_helpers import SHAPES_CONFIG, run_tool

from mrcnn_plugin.config import build_cfg
from mrcnn_plugin.export import (
    ExportAdapter,
    check_exportable,
    export_torchscript,
    postprocess,
    save_torchscript,
)
from mrcnn_plugin.export_verify import REPORT_NAME, verify_exported

SIZE = 64
ATOL = 1e-4
OPTS = SHAPES_OPTS
# Model inputs (H, W) other than the traced 64x64, and the original image sizes they rescale to.
OTHER_SIZES = [
    ((48, 96), (96, 192)),
    ((96, 40), (96, 40)),
    ((72, 72), (144, 144)),
    ((33, 57), (99, 171)),
]


def _perturbed_model(config, opts):
    return perturbed_model(config, opts)


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
    cfg, model = _perturbed_model(KEYPOINT_MASK_CONFIG, KEYPOINT_OPTS)
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


@pytest.mark.parametrize("config", ["mask", "keypoint_mask", "mask_c4"])
def test_torchscript_any_input_size(config, tmp_path):
    """The traced file, saved and loaded, matches eager at 4 other input sizes and aspect
    ratios than the traced one, through the numpy post-processing (pasted masks, rescaled
    boxes and keypoints): boxes 1e-3 px, scores 1e-4, classes, mask IoU 0.99, keypoints 0.5 px."""
    if config == "mask":
        cfg, model = _perturbed_model(SHAPES_CONFIG, OPTS)
    elif config == "mask_c4":  # one input keeps fewer proposals than the traced one
        cfg, model = _perturbed_model(C4_CONFIG, C4_OPTS)
    else:
        cfg, model = _perturbed_model(KEYPOINT_MASK_CONFIG, KEYPOINT_OPTS)
    adapter = ExportAdapter(model)
    path = str(tmp_path / "model.ts")
    save_torchscript(export_torchscript(adapter, noise_input(0, SIZE, SIZE)), path)
    inputs = [(f"{h}x{w}", noise_input(i + 1, h, w), size)
              for i, ((h, w), size) in enumerate(OTHER_SIZES)]  # fmt: skip
    entries = verify_exported(model, path, adapter.output_names, inputs)
    for entry in entries:
        assert entry["ok"], entry
        assert entry["num_detections"][0] > 0
    assert len({e["num_detections"][0] for e in entries}) > 1


def test_cli_torchscript_end_to_end(tmp_path, shapes_model, traced, image_files, images):
    cfg, model = shapes_model
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("perturbed")
    wide = str(tmp_path / "wide.png")  # 60 x 150: resized to 26 x 64, another input size
    cv2.imwrite(wide, cv2.resize(images[1], (150, 60)))
    out = tmp_path / "export"
    proc = run_tool([
        "tools/export.py",
        "--config-file", SHAPES_CONFIG,
        "--format", "torchscript",
        "--output", str(out),
        "--sample-image", *image_files[1:], wide,
        "--trace-image", image_files[0],
        "--opts", *OPTS, "MODEL.WEIGHTS", str(tmp_path / "perturbed.pth"),
    ])  # fmt: skip
    assert "MISMATCH" not in proc.stdout

    with open(out / REPORT_NAME) as f:
        report = json.load(f)
    assert report["ok"] is True and report["detection_counts_vary"] is True
    assert report["traced_input_shape"] == [3, SIZE, SIZE]
    assert report["verified_sizes_other_than_traced"] == 1
    assert [e["image"] for e in report["images"]] == image_files[1:] + [wide]
    assert report["images"][-1]["input_shape"] == [3, 26, 64]
    assert report["images"][-1]["output_size"] == [60, 150]
    for entry in report["images"]:
        eager, exported = entry["num_detections"]
        assert eager == exported > 0
        assert entry["classes_equal"] and entry["mask_iou_min"] >= 0.99
        assert entry["boxes_max_abs_px"] <= 1e-3 and entry["scores_max_abs"] <= 1e-4
    # The written file holds the checkpoint's weights: it matches the in-process eager model.
    module = torch.jit.load(str(out / "model.ts"))
    with torch.no_grad():
        exported = list(module(_as_input(images[3])))
    _assert_outputs_close(traced[0].output_names, _eager(traced[0], images[3]), exported, ATOL)
