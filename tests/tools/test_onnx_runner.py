"""The torch-free post-processing of mrcnn_plugin/deploy/onnx_runner.py equals detectron2's.

Each numpy step is compared with the detectron2 function it stands for, on inputs chosen to hit
its edge cases; the runner as a whole (export CLI, then the runner in a process where torch and
detectron2 cannot be imported) is tested in test_export_onnx.py.
"""

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.layers.mask_ops import paste_masks_in_image
from detectron2.structures import heatmaps_to_keypoints as d2_heatmaps_to_keypoints

from mrcnn_plugin.deploy import onnx_runner


def test_paste_masks_equals_detectron2():
    rng = np.random.default_rng(0)
    masks = rng.uniform(0, 1, (7, 28, 28)).astype(np.float32)
    boxes = np.array([
        [10.3, 5.7, 60.2, 40.9],
        [-8.0, -3.5, 20.0, 25.0],  # partly outside, top left
        [70.0, 30.0, 130.0, 90.0],  # partly outside, bottom right
        [33.2, 33.9, 34.1, 34.4],  # under a pixel
        [0.0, 0.0, 96.0, 64.0],  # the whole image
        [50.5, 10.25, 52.75, 63.0],  # thin
        [5.0, 5.0, 5.0, 20.0],  # empty
    ], dtype=np.float32)  # fmt: skip
    expected = paste_masks_in_image(torch.from_numpy(masks), torch.from_numpy(boxes), (64, 96))
    result = onnx_runner.paste_masks(masks, boxes, 64, 96)
    assert result.dtype == bool and result.shape == (7, 64, 96)
    assert np.array_equal(result, expected.numpy()), (result != expected.numpy()).sum((1, 2))
    assert result[:6].any((1, 2))[[0, 1, 2, 4, 5]].all()


def test_keypoint_decoding_equals_detectron2():
    rng = np.random.default_rng(1)
    maps = rng.normal(0, 3, (6, 5, 56, 56)).astype(np.float32)
    boxes = np.array([
        [3.0, 4.0, 90.0, 70.0], [10.5, 20.25, 11.0, 21.0], [0.0, 0.0, 250.7, 180.3],
        [40.0, 40.0, 97.0, 41.9], [7.0, 9.0, 63.0, 65.0], [1.0, 2.0, 200.0, 3.0],
    ], dtype=np.float32)  # fmt: skip
    expected = d2_heatmaps_to_keypoints(torch.from_numpy(maps), torch.from_numpy(boxes))
    expected = expected[:, :, [0, 1, 3]].numpy()
    result = onnx_runner.heatmaps_to_keypoints(maps, boxes)
    assert result.shape == (6, 5, 3)
    assert np.abs(result[..., :2] - expected[..., :2]).max() < 1e-3
    assert np.allclose(result[..., 2], expected[..., 2], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("shape", [(60, 150), (200, 90), (64, 64), (31, 33), (500, 400)])
def test_resize_shortest_edge_equals_detectron2(shape):
    image = np.random.default_rng(2).integers(0, 256, (*shape, 3), dtype=np.uint8)
    expected = T.ResizeShortestEdge([128, 128], 200).get_transform(image).apply_image(image)
    assert np.array_equal(onnx_runner.resize_shortest_edge(image, 128, 200), expected)


def test_coco_rle_round_trips_through_pycocotools():
    rng = np.random.default_rng(3)
    for mask in [rng.uniform(size=(13, 17)) > 0.5, np.ones((5, 4), bool), np.zeros((3, 6), bool)]:
        rle = onnx_runner._rle(mask)
        decoded = mask_util.decode(mask_util.frPyObjects(rle, *rle["size"]))
        assert np.array_equal(decoded.astype(bool), mask)


def test_postprocess_of_zero_detections_is_empty():
    outputs = {
        "pred_boxes": np.zeros((0, 4), np.float32),
        "scores": np.zeros((0,), np.float32),
        "pred_classes": np.zeros((0,), np.int64),
        "pred_masks": np.zeros((0, 1, 28, 28), np.float32),
        "pred_keypoint_heatmaps": np.zeros((0, 17, 56, 56), np.float32),
    }
    results = onnx_runner.postprocess(outputs, (64, 80), (128, 160))
    assert results["boxes"].shape == (0, 4) and results["scores"].shape == (0,)
    assert results["masks"].shape == (0, 128, 160) and results["keypoints"].shape == (0, 17, 3)
    assert onnx_runner.to_coco(results, 1, {}) == []


def test_postprocess_rescales_clips_and_drops_empty_boxes():
    outputs = {
        "pred_boxes": np.array([[-5.0, 2.0, 30.0, 20.0], [70.0, 10.0, 90.0, 30.0]], np.float32),
        "scores": np.array([0.9, 0.8], np.float32),
        "pred_classes": np.array([2, 0]),
    }
    results = onnx_runner.postprocess(outputs, (40, 60), (80, 120))  # the second box is off
    assert np.array_equal(results["boxes"], np.array([[0.0, 4.0, 60.0, 40.0]], np.float32))
    assert results["classes"].tolist() == [2] and results["scores"].tolist() == [np.float32(0.9)]
