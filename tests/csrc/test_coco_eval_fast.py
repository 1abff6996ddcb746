"""COCOeval fast path of detectron2._C (the stand-in, or a compiled build) against pycocotools.

A synthetic dataset (5 images, 3 categories, small/medium/large objects, crowd regions, an
image with more than 100 detections, categories with detections but no ground truth, equal
scores) is evaluated by pycocotools.COCOeval and by detectron2's COCOeval_opt, which runs
``_C.COCOevalEvaluateImages`` / ``_C.COCOevalAccumulate``. Summaries and tables must agree.
"""

import contextlib
import copy
import io
import pickle

import numpy as np
import pytest
from detectron2.evaluation.fast_eval_api import COCOeval_opt
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

IMAGE_SIZE = 160

try:  # the stand-in's functions (readable records), also where a compiled _C is loaded
    from mrcnn_plugin_csrc import coco_eval_fast as RECORDS
except ImportError:
    RECORDS = None
needs_records = pytest.mark.skipif(
    RECORDS is None, reason="compiled _C records expose no fields; no mrcnn_plugin_csrc"
)


def _rle(box):
    x, y, w, h = (int(round(v)) for v in box)
    m = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8, order="F")
    m[y : y + h, x : x + w] = 1
    m[y : y + max(h // 3, 1), x : x + max(w // 3, 1)] = 0  # not a plain rectangle
    rle = mask_utils.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _box(rng, side_range):
    w, h = rng.uniform(*side_range, size=2)
    x = rng.uniform(0, IMAGE_SIZE - w - 1)
    y = rng.uniform(0, IMAGE_SIZE - h - 1)
    return [float(x), float(y), float(w), float(h)]


def _dataset(seed=0):
    rng = np.random.default_rng(seed)
    images = [{"id": i, "width": IMAGE_SIZE, "height": IMAGE_SIZE} for i in (1, 2, 3, 5, 8)]
    categories = [{"id": c, "name": f"c{c}"} for c in (1, 2, 7)]
    annotations, detections = [], []
    sides = [(6, 25), (35, 80), (100, 140)]  # small, medium, large
    for image in images:
        for cat in (1, 2):  # category 7 never has ground truth
            for _ in range(rng.integers(0, 5)):
                box = _box(rng, sides[rng.integers(0, 3)])
                crowd = int(rng.random() < 0.15)
                annotations.append(
                    {"image_id": image["id"], "category_id": cat, "bbox": box, "iscrowd": crowd,
                     "area": box[2] * box[3] * 0.85, "segmentation": _rle(box)}
                )  # fmt: skip
    for ann in annotations:
        for _ in range(rng.integers(0, 3)):  # 0-2 jittered detections per object
            box = [v + rng.normal(0, 0.08 * max(ann["bbox"][2:])) for v in ann["bbox"]]
            box[2:] = [max(v, 2.0) for v in box[2:]]
            cat = ann["category_id"] if rng.random() < 0.9 else 7
            detections.append(_det(ann["image_id"], cat, box, rng))
    for image in images:
        count = 120 if image["id"] == 3 else 6  # image 3 exceeds maxDets=100
        for _ in range(count):
            box = _box(rng, sides[rng.integers(0, 3)])
            detections.append(_det(image["id"], int(rng.choice([1, 2, 7])), box, rng))
    for d in detections[::7]:
        d["score"] = 0.5  # ties must be broken the same (stable) way
    return {"images": images, "categories": categories, "annotations": annotations}, detections


def _det(image_id, cat, box, rng):
    return {"image_id": image_id, "category_id": cat, "bbox": box, "score": float(rng.random()),
            "segmentation": _rle(box)}  # fmt: skip


def _coco(dataset, detections):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(dataset)
        for i, ann in enumerate(gt.dataset["annotations"]):
            ann["id"] = i + 1
        gt.createIndex()
        dt = gt.loadRes(copy.deepcopy(detections))
    return gt, dt


def _run(cls, gt, dt, iou_type, use_cats=True):
    evaluator = cls(gt, dt, iou_type)
    evaluator.params.useCats = int(use_cats)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


@pytest.fixture(scope="module")
def coco_pair():
    dataset, detections = _dataset()
    assert sum(a["iscrowd"] for a in dataset["annotations"]) >= 2
    return _coco(dataset, detections)


@pytest.mark.parametrize(
    "iou_type,use_cats", [("bbox", True), ("segm", True), ("bbox", False)]
)  # fmt: skip
def test_fast_path_equals_pycocotools(coco_pair, iou_type, use_cats):
    gt, dt = coco_pair
    ref = _run(COCOeval, gt, dt, iou_type, use_cats)
    fast = _run(COCOeval_opt, gt, dt, iou_type, use_cats)
    assert ref.stats[0] > 0.05 and ref.stats[1] > ref.stats[0], "data should give real AP"
    if use_cats:  # category 7 has detections but no ground truth
        assert (ref.eval["precision"][:, :, 2] == -1).all()
    np.testing.assert_allclose(fast.stats, ref.stats, atol=1e-6, rtol=0)
    assert fast.eval["counts"] == list(ref.eval["precision"].shape)
    for key in ("precision", "recall", "scores"):
        assert fast.eval[key].shape == ref.eval[key].shape
        np.testing.assert_allclose(fast.eval[key], ref.eval[key], atol=1e-9, rtol=0)


def _instances(coco, image_id, cat_id, is_det):
    """_C.InstanceAnnotation list as detectron2's COCOeval_opt builds it (crowd => ignored)."""
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], catIds=[cat_id]))
    return [
        RECORDS.InstanceAnnotation(
            int(a["id"]), a.get("score", 0.0), a["area"], bool(a.get("iscrowd", 0)),
            bool(a.get("ignore", 0) or (not is_det and a.get("iscrowd", 0))),
        )
        for a in anns
    ]  # fmt: skip


@needs_records
def test_evaluate_images_record_matches_pycocotools(coco_pair):
    gt, dt = coco_pair
    ref = _run(COCOeval, gt, dt, "bbox")
    p = ref.params
    records = RECORDS.COCOevalEvaluateImages(
        p.areaRng,
        p.maxDets[-1],
        p.iouThrs,
        [[ref.ious[i, c] for c in p.catIds] for i in p.imgIds],
        [[_instances(gt, i, c, False) for c in p.catIds] for i in p.imgIds],
        [[_instances(dt, i, c, True) for c in p.catIds] for i in p.imgIds],
    )
    assert len(records) == len(ref.evalImgs)
    compared = matched_ignored = 0
    for mine, theirs in zip(records, ref.evalImgs):
        if theirs is None:
            assert mine.detection_scores.size == 0 and mine.ground_truth_ignores.size == 0
            continue
        compared += 1
        matched_ignored += int(((theirs["dtMatches"] > 0) & theirs["dtIgnore"]).sum())
        np.testing.assert_array_equal(mine.detection_scores, theirs["dtScores"])
        np.testing.assert_array_equal(mine.detection_matches, theirs["dtMatches"])
        np.testing.assert_array_equal(mine.detection_ignores, theirs["dtIgnore"])
        np.testing.assert_array_equal(mine.ground_truth_ignores, theirs["gtIgnore"].astype(bool))
    assert compared > 20 and matched_ignored > 10, "crowd / out-of-range matches expected"
    restored = pickle.loads(pickle.dumps(records[0]))
    np.testing.assert_array_equal(restored.detection_scores, records[0].detection_scores)


@needs_records
def test_instance_annotation_fields():
    inst = RECORDS.InstanceAnnotation(7, 0.25, 30.0, True, False)
    assert (inst.id, inst.score, inst.area, inst.is_crowd, inst.ignore) == (
        7,
        0.25,
        30.0,
        True,
        False,
    )
