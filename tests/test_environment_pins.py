"""Each pin that keeps detectron2 v0.6 working with today's libraries, exercised on the code
path it protects. Lifting a pin makes the matching test fail (on detectron2 v0.6)."""

import importlib.metadata

import numpy as np
import pytest


def test_pillow_pin_extent_transform_uses_image_linear():
    # v0.6's ExtentTransform defaults to Image.LINEAR, removed in Pillow 10: the module fails
    # at import there. Exercise the transform end to end.
    from detectron2.data import transforms as T

    image = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
    out = T.ExtentTransform(src_rect=(0, 0, 30, 20), output_size=(10, 15)).apply_image(image)
    assert out.shape == (10, 15, 3)


def test_numpy_pin_polygon_masks_use_np_bool():
    # structures/masks.py converts decoded polygons with np.bool, removed in numpy 1.24.
    from detectron2.structures import PolygonMasks, polygons_to_bitmask

    square = [np.array([2.0, 2.0, 8.0, 2.0, 8.0, 8.0, 2.0, 8.0])]
    bitmask = polygons_to_bitmask(square, 10, 10)
    assert bitmask.dtype == bool and 30 <= bitmask.sum() <= 49
    assert polygons_to_bitmask([], 10, 10).sum() == 0
    assert PolygonMasks([square, [np.array([0.0, 0.0, 1.0, 0.0, 0.0, 1.0])]]).nonempty().all()


def test_setuptools_pin_model_zoo_uses_pkg_resources():
    # model_zoo/model_zoo.py imports pkg_resources, which setuptools 81 removed.
    from detectron2 import model_zoo

    path = model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml")
    assert path.endswith("mask_rcnn_R_50_FPN_3x.yaml")
    cfg = model_zoo.get_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml")
    assert cfg.MODEL.MASK_ON


def test_detectron2_is_a_pip_distribution_with_model_zoo_configs():
    version = importlib.metadata.version("detectron2")
    files = importlib.metadata.files("detectron2")
    if files is None:
        pytest.skip("detectron2 is installed without a file list (not through pip)")
    names = {str(f) for f in files}
    assert "detectron2/model_zoo/configs/Base-RCNN-FPN.yaml" in names, version
    assert any(n.startswith("detectron2/modeling/roi_heads/") for n in names)
