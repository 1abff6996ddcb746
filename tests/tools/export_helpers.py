"""Tiny models and images for the export tests (imported as ``export_helpers``).

Random-weight models have their predictors spread out with a fixed seed so that images get
different numbers of detections; :func:`trained_shapes_model` trains the tiny shapes model for
a few dozen iterations on synthetic shapes images made in memory, so that it finds the shapes
and nothing on a blank image.
"""

import os

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from tool_helpers import ROOT, SHAPES_CONFIG, TINY_OPTS

from mrcnn_plugin.config import build_cfg
from mrcnn_plugin.data.shapes import render_shapes_image

# Threshold 0.1 on the perturbed scores gives ~15-30 detections, different per image.
SHAPES_OPTS = TINY_OPTS + [
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.1", "TEST.DETECTIONS_PER_IMAGE", "100",
]  # fmt: skip
# After 40 steps the scores are near 0.2: 0.175 keeps a few to ten shapes per image. What the
# model finds on a plain grey image varies with the CPU's numerics (0 on some, 13 on others).
TRAINED_OPTS = TINY_OPTS + [
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.175", "TEST.DETECTIONS_PER_IMAGE", "30",
]  # fmt: skip
KEYPOINT_MASK_CONFIG = os.path.join(
    ROOT, "configs", "Synthetic", "keypoint_mask_rcnn_R_18_FPN_persons.yaml"
)
KEYPOINT_CONFIG = os.path.join(ROOT, "configs", "Synthetic", "keypoint_rcnn_R_18_FPN_persons.yaml")
KEYPOINT_OPTS = TINY_OPTS + [
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.02",
    "TEST.DETECTIONS_PER_IMAGE", "100",
    "MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS", "(32,)",
    "MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS", "4",
]  # fmt: skip
C4_CONFIG = os.path.join(ROOT, "configs", "Base-MRCNN-C4.yaml")
C4_OPTS = [
    "MODEL.WEIGHTS", "",
    "MODEL.DEVICE", "cpu",
    "MODEL.RESNETS.DEPTH", "18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",  # BasicBlock ResNets
    "MODEL.RESNETS.NORM", "GN",
    "MODEL.ROI_HEADS.NUM_CLASSES", "3",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.1",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "100",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "20",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "64",
    "DATASETS.TEST", "()",
]  # fmt: skip


def perturbed_model(config, opts):
    """(cfg, the tiny model (seed 0) in eval mode with class scores, box deltas and mask
    logits spread out)."""
    torch.manual_seed(0)
    cfg = build_cfg(config, opts)
    cfg.freeze()
    model = build_model(cfg).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        predictor = model.roi_heads.box_predictor
        predictor.cls_score.weight.normal_(0, 1.0, generator=generator)
        predictor.bbox_pred.weight.normal_(0, 0.01, generator=generator)
        if cfg.MODEL.MASK_ON:
            model.roi_heads.mask_head.predictor.weight.normal_(0, 0.1, generator=generator)
    return cfg, model


def as_input(image):
    """(H, W, 3) uint8 -> the model input (3, H, W) float32."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()


def noise_input(seed, height, width):
    """A (3, height, width) model input of uniform noise."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(3, height, width, generator=generator) * 255


def shapes_sample(rng, size):
    """(BGR image, Instances of its shapes) of a synthetic shapes image, size x size."""
    image, annotations = render_shapes_image(rng, size)
    masks = np.stack([mask_util.decode(a["segmentation"]) for a in annotations]).astype(bool)
    boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in annotations)]
    instances = Instances((size, size))
    instances.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    instances.gt_classes = torch.tensor([a["category_id"] - 1 for a in annotations])
    instances.gt_masks = BitMasks(torch.from_numpy(masks))
    return np.ascontiguousarray(image[:, :, ::-1]), instances


def trained_shapes_model(iterations=40, size=64, seed=0):
    """(cfg, the tiny shapes model after ``iterations`` SGD steps on 2-image batches)."""
    torch.manual_seed(seed)
    cfg = build_cfg(SHAPES_CONFIG, TRAINED_OPTS)
    cfg.freeze()
    model = build_model(cfg).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    samples = [shapes_sample(rng, size) for _ in range(16)]
    with EventStorage():  # the RPN logs to it
        for step in range(iterations):
            batch = [samples[(2 * step + k) % len(samples)] for k in range(2)]
            inputs = [{"image": as_input(img), "instances": inst} for img, inst in batch]
            losses = model(inputs)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
    return cfg, model.eval()
