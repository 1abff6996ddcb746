"""The environment serves detectron2's code paths, on v0.6 (installed by tools/install_env.sh)
and on an existing install such as detectron2 main (editable or not).

Each v0.6 pin (tools/detectron2_dist/setup.py) is exercised on the code path it protects:
lifting a pin makes the matching test fail on v0.6. A pin test skips where the installed
detectron2 no longer has that code (main fixed it). What both versions need always runs."""

import importlib.metadata
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest


def _detectron2_source(relpath):
    """Text of one file of the installed detectron2 package, read without importing it."""
    spec = importlib.util.find_spec("detectron2")
    return (Path(spec.submodule_search_locations[0]) / relpath).read_text()


def _skip_unless_uses(relpath, name, pin):
    # The pin exists for this construct of v0.6; newer detectron2 dropped it.
    if not re.search(rf"\b{re.escape(name)}\b", _detectron2_source(relpath)):
        pytest.skip(
            f"installed detectron2 is not v0.6: {relpath} no longer uses {name}, "
            f"so v0.6's {pin} pin does not apply"
        )


def test_pillow_pin_extent_transform_uses_image_linear():
    # v0.6's ExtentTransform defaults to Image.LINEAR, removed in Pillow 10: the module fails
    # at import there. Exercise the transform end to end.
    _skip_unless_uses("data/transforms/transform.py", "Image.LINEAR", "Pillow<10")
    from detectron2.data import transforms as T

    image = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
    out = T.ExtentTransform(src_rect=(0, 0, 30, 20), output_size=(10, 15)).apply_image(image)
    assert out.shape == (10, 15, 3)


def test_numpy_pin_polygon_masks_use_np_bool():
    # structures/masks.py converts decoded polygons with np.bool, removed in numpy 1.24.
    _skip_unless_uses("structures/masks.py", "np.bool", "numpy<1.24")
    from detectron2.structures import PolygonMasks, polygons_to_bitmask

    square = [np.array([2.0, 2.0, 8.0, 2.0, 8.0, 8.0, 2.0, 8.0])]
    bitmask = polygons_to_bitmask(square, 10, 10)
    assert bitmask.dtype == bool and 30 <= bitmask.sum() <= 49
    assert polygons_to_bitmask([], 10, 10).sum() == 0
    assert PolygonMasks([square, [np.array([0.0, 0.0, 1.0, 0.0, 0.0, 1.0])]]).nonempty().all()


def test_model_zoo_finds_configs_through_pkg_resources():
    # model_zoo/model_zoo.py imports pkg_resources on v0.6 and on main; setuptools 82 removed
    # it, so install_env.sh keeps a setuptools<81 in any environment it serves.
    from detectron2 import model_zoo

    path = model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml")
    assert path.endswith("mask_rcnn_R_50_FPN_3x.yaml") and Path(path).is_file()
    cfg = model_zoo.get_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml")
    assert cfg.MODEL.MASK_ON


@pytest.mark.parametrize(
    "project, entry", [("point_rend", "add_pointrend_config"), ("deeplab", "add_deeplab_config")]
)
def test_detectron2_projects_import(project, entry):
    # tests/test_mixing.py builds PointRend heads from detectron2.projects.
    module = importlib.import_module(f"detectron2.projects.{project}")
    assert callable(getattr(module, entry))


def test_panoptic_deeplab_project_is_located():
    # Importing it needs panopticapi (not on the registry); its location is what we map.
    spec = importlib.util.find_spec("detectron2.projects.panoptic_deeplab")
    assert spec is not None and spec.origin.endswith("panoptic_deeplab/__init__.py")


def test_detectron2_is_a_pip_distribution_with_model_zoo_configs():
    version = importlib.metadata.version("detectron2")
    dist = importlib.metadata.distribution("detectron2")
    direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    if direct_url.get("dir_info", {}).get("editable"):
        pytest.skip(
            f"detectron2 {version} is an editable install of {direct_url['url']}: "
            "its configs are served from the checkout, not listed by pip"
        )
    files = dist.files
    if files is None:
        pytest.skip("detectron2 is installed without a file list (not through pip)")
    names = {str(f) for f in files}
    assert "detectron2/model_zoo/configs/Base-RCNN-FPN.yaml" in names, version
    assert any(n.startswith("detectron2/modeling/roi_heads/") for n in names)
