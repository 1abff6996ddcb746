"""Tests of the synthetic data sets (mrcnn_plugin.data): determinism, COCO validity through
pycocotools and detectron2, visible-part masks, keypoint flags, metadata, registration,
COCOEvaluator on the ground truth itself, and bad-input errors."""

import importlib
import json
import os
import re
from collections import Counter

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, BoxMode, Instances, pairwise_iou
from pycocotools.coco import COCO
from pycocotools.cocoeval import Params

import mrcnn_plugin.data as data_package
from mrcnn_plugin.data import (
    KEYPOINT_NAMES,
    generate_persons,
    generate_shapes,
    register_persons,
    register_shapes,
    register_synthetic,
)
from mrcnn_plugin.data import common as common_module
from mrcnn_plugin.data import persons as persons_module
from mrcnn_plugin.data import register as register_module
from mrcnn_plugin.data import shapes as shapes_module

SMALL = {"num_train": 6, "num_val": 20}


@pytest.fixture(scope="module")
def shapes_names(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return register_shapes(root=str(root), seed=3, prefix="test_mrcnn_shapes", **SMALL)


@pytest.fixture(scope="module")
def persons_names(tmp_path_factory):
    root = tmp_path_factory.mktemp("persons")
    return register_persons(root=str(root), seed=3, prefix="test_mrcnn_persons", **SMALL)


def _read_tree(root):
    """{relative path: bytes} of every file under root."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            files[os.path.relpath(path, root)] = open(path, "rb").read()
    return files


def _tight_box(mask):
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def _coco(name):
    return COCO(MetadataCatalog.get(name).json_file)


@pytest.mark.parametrize("generate", [generate_shapes, generate_persons])
def test_same_seed_gives_identical_files(tmp_path, generate):
    generate(str(tmp_path / "a"), seed=5, num_train=8, num_val=4)
    generate(str(tmp_path / "b"), seed=5, num_train=8, num_val=4)
    generate(str(tmp_path / "c"), seed=6, num_train=8, num_val=4)
    a, b, c = (_read_tree(tmp_path / x) for x in "abc")
    assert len(a) == 8 + 4 + 4  # images, two JSON files, manifest, the generation's lock file
    assert a[".generate.lock"] == b""
    assert a == b
    assert a["train.json"] != c["train.json"] and a["val.json"] != c["val.json"]
    assert a["train/000000.png"] != c["train/000000.png"]
    # One random stream per image: the val split does not depend on the train split's size.
    generate(str(tmp_path / "d"), seed=5, num_train=3, num_val=4)
    assert _read_tree(tmp_path / "d")["val.json"] == a["val.json"]
    assert a["train/000000.png"] != a["val/000000.png"]


@pytest.mark.parametrize("which", ["shapes", "persons"])
def test_records_masks_boxes_and_pixels(which, shapes_names, persons_names):
    names = shapes_names if which == "shapes" else persons_names
    for name, size in zip(names, (SMALL["num_train"], SMALL["num_val"])):
        coco = _coco(name)
        records = DatasetCatalog.get(name)
        assert len(records) == size == len(coco.getImgIds())
        num_classes = len(MetadataCatalog.get(name).thing_classes)
        for record in records:
            image = utils.read_image(record["file_name"], format="RGB")
            assert image.shape == (record["height"], record["width"], 3)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=record["image_id"]))
            assert 1 <= len(record["annotations"]) == len(anns) <= 5
            for obj, ann in zip(record["annotations"], anns):
                mask = mask_util.decode(obj["segmentation"]).astype(bool)
                assert mask.shape == image.shape[:2]
                assert mask.sum() == ann["area"] >= 40
                assert obj["bbox_mode"] == BoxMode.XYWH_ABS and obj["iscrowd"] == 0
                assert obj["bbox"] == _tight_box(mask)  # so the mask lies inside its box
                assert 0 <= obj["category_id"] < num_classes
                # The mask is exactly what was painted in the object's colour (+-4 noise).
                pixels = image[mask].astype(np.int64)
                close = (np.abs(pixels - np.median(pixels, 0)) <= 4).all(1).mean()
                assert close == 1.0 if which == "shapes" else close > 0.85


def test_shapes_visible_masks_are_disjoint_and_occlusion_happens(shapes_names):
    overlapping_boxes = 0
    for record in DatasetCatalog.get(shapes_names[0]) + DatasetCatalog.get(shapes_names[1]):
        masks = [mask_util.decode(a["segmentation"]).astype(int) for a in record["annotations"]]
        assert np.sum(masks, axis=0).max() <= 1
        boxes = torch.tensor([a["bbox"] for a in record["annotations"]], dtype=torch.float)
        boxes = Boxes(BoxMode.convert(boxes, BoxMode.XYWH_ABS, BoxMode.XYXY_ABS))
        overlapping_boxes += int((pairwise_iou(boxes, boxes) > 0).sum() - len(masks)) // 2
    assert overlapping_boxes >= 5


def test_persons_keypoints_flags_and_positions(persons_names):
    flags = Counter()
    for name in persons_names:
        coco = _coco(name)
        for img_id in coco.getImgIds():
            img = coco.loadImgs(img_id)[0]
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
            masks = [coco.annToMask(a).astype(bool) for a in anns]
            for i, ann in enumerate(anns):
                kp = np.array(ann["keypoints"]).reshape(17, 3)
                others = np.any([m for j, m in enumerate(masks) if j != i] or [masks[i] & False], 0)
                x0, y0, w, h = ann["bbox"]
                assert ann["num_keypoints"] == (kp[:, 2] > 0).sum() >= 12
                for x, y, v in kp:
                    flags[v] += 1
                    assert v in (0, 1, 2)
                    if v == 0:
                        assert x == y == 0
                        continue
                    assert 0 <= x < img["width"] and 0 <= y < img["height"]
                    if v == 2:  # on the figure's visible pixels, hence in its box
                        assert masks[i][y, x] and x0 <= x < x0 + w and y0 <= y < y0 + h
                    else:  # hidden under another figure
                        assert not masks[i][y, x] and others[y, x]
                # Figures face the camera: the person's left is on the image's right.
                for part in ("shoulder", "hip", "eye"):
                    left, right = (
                        kp[KEYPOINT_NAMES.index("left_" + part)],
                        kp[KEYPOINT_NAMES.index("right_" + part)],
                    )
                    if left[2] and right[2]:
                        assert left[0] > right[0]
    assert flags[2] > 0 and flags[1] > 0


def test_metadata_and_categories(shapes_names, persons_names):
    meta = MetadataCatalog.get(persons_names[0])
    assert meta.evaluator_type == "coco" and meta.thing_classes == ["person"]
    assert list(meta.keypoint_names) == [
        "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
        "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip",
        "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
    ]  # fmt: skip
    # The COCO sigmas, as pycocotools' COCOeval uses them by default.
    np.testing.assert_allclose(meta.keypoint_oks_sigmas, Params("keypoints").kpt_oks_sigmas)
    flip = dict(meta.keypoint_flip_map)
    assert len(flip) == 8 and all(b == "right_" + a[5:] for a, b in flip.items())
    assert set(flip) | set(flip.values()) | {"nose"} == set(meta.keypoint_names)
    for a, b, color in meta.keypoint_connection_rules:
        assert a in meta.keypoint_names and b in meta.keypoint_names and len(color) == 3
    category = _coco(persons_names[0]).loadCats(1)[0]
    assert category["keypoints"] == list(meta.keypoint_names)
    assert {i for pair in category["skeleton"] for i in pair} == set(range(1, 18))
    shapes_meta = MetadataCatalog.get(shapes_names[1])
    assert shapes_meta.thing_classes == ["circle", "square", "triangle"]
    assert shapes_meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2}
    assert shapes_meta.json_file.endswith("val.json") and os.path.isdir(shapes_meta.image_root)


def test_detectron2_mapper_with_flip_keeps_front_facing_convention(persons_names):
    name = persons_names[1]
    mapper = DatasetMapper(
        is_train=True,
        augmentations=[T.RandomFlip(prob=1.0)],
        image_format="BGR",
        use_instance_mask=True,
        instance_mask_format="bitmask",
        use_keypoint=True,
        keypoint_hflip_indices=utils.create_keypoint_hflip_indices([name]),
    )
    checked = 0
    for record in DatasetCatalog.get(name)[:5]:
        instances = mapper(record)["instances"]
        kp = instances.gt_keypoints.tensor
        assert kp.shape == (len(instances), 17, 3)
        assert instances.gt_masks.tensor.shape[1:] == (record["height"], record["width"])
        ls, rs = KEYPOINT_NAMES.index("left_shoulder"), KEYPOINT_NAMES.index("right_shoulder")
        both = (kp[:, ls, 2] > 0) & (kp[:, rs, 2] > 0)
        assert (kp[both, ls, 0] > kp[both, rs, 0]).all()
        checked += int(both.sum())
    assert checked > 0


def _gt_as_predictions(record, with_keypoints):
    """Instances holding the record's ground truth as detections with score 1."""
    anns = record["annotations"]
    boxes = BoxMode.convert(np.array([a["bbox"] for a in anns]), BoxMode.XYWH_ABS, BoxMode.XYXY_ABS)
    instances = Instances((record["height"], record["width"]))
    instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    instances.scores = torch.ones(len(anns))
    instances.pred_classes = torch.tensor([a["category_id"] for a in anns])
    masks = [mask_util.decode(a["segmentation"]) for a in anns]
    instances.pred_masks = torch.from_numpy(np.stack(masks)).bool()
    if with_keypoints:
        kp = torch.tensor([a["keypoints"] for a in anns], dtype=torch.float32).view(-1, 17, 3)
        instances.pred_keypoints = kp
    return instances


def _evaluate(name, tmp_path, with_keypoints, jitter=0.0):
    tasks = ("bbox", "segm", "keypoints") if with_keypoints else ("bbox", "segm")
    sigmas = MetadataCatalog.get(name).get("keypoint_oks_sigmas", ())
    # use_fast_impl=False: the official pycocotools path, independent of detectron2._C.
    evaluator = COCOEvaluator(name, tasks, distributed=False, output_dir=str(tmp_path),
                              use_fast_impl=False, kpt_oks_sigmas=sigmas)  # fmt: skip
    evaluator.reset()
    for record in DatasetCatalog.get(name):
        instances = _gt_as_predictions(record, with_keypoints)
        if jitter and with_keypoints:
            instances.pred_keypoints[:, :, :2] += jitter
        evaluator.process([{"image_id": record["image_id"]}], [{"instances": instances}])
    return evaluator.evaluate()


def test_coco_evaluator_gives_ap_100_on_ground_truth(shapes_names, persons_names, tmp_path):
    shapes = _evaluate(shapes_names[1], tmp_path / "s", with_keypoints=False)
    persons = _evaluate(persons_names[1], tmp_path / "p", with_keypoints=True)
    for task in ("bbox", "segm"):
        assert shapes[task]["AP"] == pytest.approx(100.0)
        assert persons[task]["AP"] == pytest.approx(100.0)
    assert set(shapes["bbox"]) >= {"AP-circle", "AP-square", "AP-triangle"}
    assert persons["keypoints"]["AP"] == pytest.approx(100.0)
    # Control: keypoints moved by 3 pixels no longer match at every OKS threshold.
    moved = _evaluate(persons_names[1], tmp_path / "m", with_keypoints=True, jitter=3.0)
    assert moved["keypoints"]["AP"] < 90.0


def test_registration_is_explicit_and_idempotent(tmp_path, monkeypatch):
    # Importing registers nothing: module top levels re-run against emptied catalogs.
    with monkeypatch.context() as patch:
        patch.setattr(DatasetCatalog, "data", {})
        patch.setattr(MetadataCatalog, "data", {})
        for module in (common_module, shapes_module, persons_module, register_module):
            importlib.reload(module)
        importlib.reload(data_package)
        assert DatasetCatalog.list() == [] and MetadataCatalog.list() == []

    root = str(tmp_path / "shapes")
    names = register_synthetic("shapes", root, seed=1, num_train=3, num_val=2, prefix="t_idem")
    assert names == ("t_idem_train", "t_idem_val")
    json_file = MetadataCatalog.get(names[0]).json_file
    stamp = os.stat(json_file).st_mtime_ns
    assert register_shapes(root, seed=1, num_train=3, num_val=2, prefix="t_idem") == names
    assert os.stat(json_file).st_mtime_ns == stamp  # files reused, not rewritten
    first = json.load(open(json_file))
    # Other parameters under the same names: files regenerated, registration replaced.
    register_shapes(root, seed=2, num_train=3, num_val=2, prefix="t_idem")
    assert MetadataCatalog.get(names[0]).mrcnn_synthetic_params["seed"] == 2
    assert json.load(open(json_file)) != first
    assert len(DatasetCatalog.get(names[0])) == 3
    persons = register_synthetic("persons", str(tmp_path / "p"), num_train=1, prefix="t_idem_p")
    assert persons == ("t_idem_p_train", "t_idem_p_val")
    assert MetadataCatalog.get(persons[1]).keypoint_names == tuple(KEYPOINT_NAMES)


def test_interrupted_generation_is_never_trusted(tmp_path, monkeypatch):
    root = str(tmp_path / "shapes")
    generate_shapes(root, seed=0, num_train=4, num_val=2)
    reference = _read_tree(root)
    render = shapes_module.render_shapes_image
    calls = []

    def failing_render(rng, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("interrupted")
        return render(rng, **kwargs)

    monkeypatch.setattr(shapes_module, "render_shapes_image", failing_render)
    with pytest.raises(RuntimeError, match="interrupted"):
        generate_shapes(root, seed=9, num_train=4, num_val=2)
    assert not os.path.exists(os.path.join(root, "manifest.json"))
    assert not [p for p in _read_tree(root) if ".tmp" in p]
    monkeypatch.setattr(shapes_module, "render_shapes_image", render)
    generate_shapes(root, seed=0, num_train=4, num_val=2)
    assert _read_tree(root) == reference


def test_bad_input_errors_name_the_file_and_field(tmp_path):
    root = str(tmp_path / "shapes")
    generate_shapes(root, seed=0, num_train=2, num_val=1)
    manifest = os.path.join(root, "manifest.json")
    good_manifest = open(manifest).read()
    with open(manifest, "w") as f:
        f.write(good_manifest[:20])
    with pytest.raises(ValueError, match=f"{re.escape(manifest)}.*corrupted manifest"):
        generate_shapes(root, seed=0, num_train=2, num_val=1)
    with open(manifest, "w") as f:
        json.dump({"generator": "shapes"}, f)
    with pytest.raises(ValueError, match=f"{re.escape(manifest)}.*'params'"):
        register_shapes(root, seed=0, num_train=2, num_val=1, prefix="t_bad")
    with pytest.raises(ValueError, match=f"{re.escape(manifest)}.*'generator' is 'shapes'"):
        generate_persons(root, seed=0, num_train=2, num_val=1)

    with open(manifest, "w") as f:
        f.write(good_manifest)
    val_json = os.path.join(root, "val.json")
    coco = json.load(open(val_json))
    del coco["annotations"][0]["bbox"]
    with open(val_json, "w") as f:
        json.dump(coco, f)
    with pytest.raises(ValueError, match=f"{re.escape(val_json)}.*'annotations\\[0\\].bbox'"):
        generate_shapes(root, seed=0, num_train=2, num_val=1)
    with open(val_json, "w") as f:
        f.write("{")
    with pytest.raises(ValueError, match=f"{re.escape(val_json)}.*corrupted COCO annotation file"):
        generate_shapes(root, seed=0, num_train=2, num_val=1)

    with pytest.raises(ValueError, match="'num_train'"):
        generate_shapes(str(tmp_path / "x"), num_train=-1)
    with pytest.raises(ValueError, match="'num_classes'"):
        register_shapes(str(tmp_path / "x"), num_classes=9)
    with pytest.raises(ValueError, match="unknown synthetic data set"):
        register_synthetic("cats", str(tmp_path / "x"))
