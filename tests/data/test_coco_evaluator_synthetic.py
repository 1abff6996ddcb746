"""COCOEvaluator with its default settings (the fast path through detectron2._C) on the
synthetic validation set gives the same AP as pycocotools' own COCOeval, to 3 decimals."""

import json
import os

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, Instances
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mrcnn_plugin.data import register_shapes


def _imperfect_predictions(record, rng):
    """Ground truth with jittered boxes, shifted masks, random scores, some wrong classes and
    a false positive: an AP well inside (0, 100)."""
    h, w = record["height"], record["width"]
    boxes, masks, classes = [], [], []
    for ann in record["annotations"]:
        x, y, bw, bh = ann["bbox"]
        jitter = rng.normal(0, 2.0, 4)
        boxes.append([x + jitter[0], y + jitter[1], x + bw + jitter[2], y + bh + jitter[3]])
        mask = mask_util.decode(ann["segmentation"]).astype(bool)
        masks.append(np.roll(mask, int(rng.integers(-2, 3)), axis=int(rng.integers(2))))
        wrong = rng.uniform() < 0.2
        classes.append((ann["category_id"] + 1) % 3 if wrong else ann["category_id"])
    boxes.append([5.0, 5.0, 40.0, 40.0])
    fp_mask = np.zeros((h, w), bool)
    fp_mask[5:40, 5:40] = True
    masks.append(fp_mask)
    classes.append(0)
    instances = Instances((h, w))
    instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    instances.scores = torch.tensor(rng.uniform(0.05, 1.0, len(boxes)), dtype=torch.float32)
    instances.pred_classes = torch.tensor(classes)
    instances.pred_masks = torch.from_numpy(np.stack(masks))
    return instances


def test_default_coco_evaluator_equals_pycocotools(tmp_path):
    _, val = register_shapes(
        root=str(tmp_path / "shapes"), seed=3, num_train=2, num_val=30, prefix="mrcnn_shapes_eval"
    )
    evaluator = COCOEvaluator(val, output_dir=str(tmp_path / "eval"))  # default: fast path
    evaluator.reset()
    rng = np.random.default_rng(0)
    for record in DatasetCatalog.get(val):
        evaluator.process([record], [{"instances": _imperfect_predictions(record, rng)}])
    results = evaluator.evaluate()

    gt = COCO(MetadataCatalog.get(val).json_file)
    with open(os.path.join(tmp_path, "eval", "coco_instances_results.json")) as f:
        detections = gt.loadRes(json.load(f))
    for task in ("bbox", "segm"):
        reference = COCOeval(gt, detections, task)
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
        assert 5.0 < results[task]["AP"] < 95.0, results[task]
        assert round(results[task]["AP"], 3) == round(100 * reference.stats[0], 3)
        assert round(results[task]["AP75"], 3) == round(100 * reference.stats[2], 3)
