"""The reproduction's thin-shapes data: what the generator promises (sizes, stroke widths, one
mask per painted object, no overlaps), determinism, and one generation when several processes
start on the same folder at once."""

import json
import multiprocessing
import os

import numpy as np
import pycocotools.mask as mask_util

from mrcnn_plugin.data.thin_shapes import (
    THIN_CLASSES,
    draw_thin_shape,
    generate_thin_shapes,
    render_thin_shapes_image,
)


def test_images_hold_small_thin_disjoint_objects():
    rng = np.random.default_rng(0)
    widths, counts = [], []
    for _ in range(40):
        image, annotations = render_thin_shapes_image(rng)
        assert image.shape == (128, 128, 3) and image.dtype == np.uint8
        assert 1 <= len(annotations) <= 4
        counts.append(len(annotations))
        union = np.zeros((128, 128), int)
        for ann in annotations:
            mask = mask_util.decode(ann["segmentation"]).astype(bool)
            union += mask
            x, y, w, h = ann["bbox"]
            assert 1 <= ann["category_id"] <= len(THIN_CLASSES)
            assert 10 <= max(w, h) <= 61, ann["bbox"]  # 2 x 25 px + a round cap of 10
            # The object's pixels share one colour up to finish_image's noise: the mask is what
            # was painted.
            assert image[mask].astype(float).std(0).max() < 10
            widths.append(mask.sum() / max(w, h))  # ~ stroke width for bars and rings
        assert union.max() == 1, "objects overlap"
    assert len(set(counts)) > 1
    assert 1.5 < np.median(widths) < 12


def test_stroke_width_follows_the_argument():
    for thickness in (2, 6):
        bar = draw_thin_shape("bar", (64, 64), 20, 0.0, thickness, 128)
        columns = bar.sum(0)
        assert columns[columns > 0].max() in (thickness, thickness + 1)


def test_same_seed_same_files_and_parallel_starts_generate_once(tmp_path):
    root = str(tmp_path / "thin")
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        paths = pool.starmap(generate_thin_shapes, [(root, 3, 6, 2), (root, 3, 6, 2)])
    assert paths[0] == paths[1]
    json_file = paths[0]["train"][0]
    with open(json_file) as f:
        first = json.load(f)
    assert len(first["images"]) == 6 and first["annotations"]
    mtime = os.path.getmtime(json_file)
    generate_thin_shapes(root, 3, 6, 2)  # matching manifest: reused, not rewritten
    assert os.path.getmtime(json_file) == mtime
    other = generate_thin_shapes(str(tmp_path / "again"), 3, 6, 2)
    with open(other["train"][0]) as f:
        assert json.load(f)["annotations"] == first["annotations"]


def test_a_read_only_copy_is_reused_without_a_lock(tmp_path, monkeypatch):
    """A root where the lock file cannot be created (read-only) is read as it is."""
    import builtins

    from mrcnn_plugin.data import common

    root = str(tmp_path / "thin")
    first = generate_thin_shapes(root, 3, 4, 2)
    os.remove(os.path.join(root, ".generate.lock"))

    def no_lock_file(path, *args, **kwargs):
        if str(path).endswith(".generate.lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(common, "open", no_lock_file, raising=False)
    assert generate_thin_shapes(root, 3, 4, 2) == first
    assert not os.path.exists(os.path.join(root, ".generate.lock"))
