"""The plugin's components mix with detectron2's and a third-party project's, both ways.

Each mixed model builds from a config (the YAML snippets are those of the README's "Mixing"
section), trains a few steps on tiny synthetic persons images and runs inference:
PointRend's mask head (POOLER_TYPE "": it samples the feature maps itself) under the
plugin's ROI heads and backbone; detectron2's CascadeROIHeads with the plugin's mask head and
backbone; the plugin's heads on detectron2's backbone; a per-branch choice of RoI op.
"""

import os

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data.detection_utils import annotations_to_instances
from detectron2.modeling import build_model
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads import CascadeROIHeads
from detectron2.projects import point_rend
from detectron2.structures import BoxMode
from detectron2.utils.events import EventStorage

from mrcnn_plugin.config import add_mrcnn_config
from mrcnn_plugin.data.persons import render_persons_image
from mrcnn_plugin.layers import MRCNNRoIAlign, MRCNNRoIPool
from mrcnn_plugin.modeling.poolers import MultiLevelRoIPooler
from mrcnn_plugin.modeling.roi_heads import (
    MRCNNKeypointHead,
    MRCNNMaskHead,
    MRCNNStandardROIHeads,
)

CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(__file__)), "configs", "Synthetic",
    "keypoint_mask_rcnn_R_18_FPN_persons.yaml",
)  # fmt: skip
SIZE = 64
# Test-only sizes of the R18-FPN persons model (GroupNorm(32) needs multiples of 32).
TINY = [
    "MODEL.FPN.OUT_CHANNELS", "32",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "32",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "32",
    "MODEL.ROI_MASK_HEAD.CONV_DIM", "32",
    "MODEL.ROI_MASK_HEAD.NUM_CONV", "1",
    "MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS", "(32,)",
    "TEST.DETECTIONS_PER_IMAGE", "8",
]  # fmt: skip

POINTREND_YAML = """
MODEL:
  ROI_MASK_HEAD:
    NAME: "PointRendMaskHead"
    POOLER_TYPE: ""  # no pooler: the head samples the feature maps itself
    IN_FEATURES: ["p2"]
    POINT_HEAD_ON: True
  POINT_HEAD:
    IN_FEATURES: ["p2"]  # NUM_CLASSES must equal ROI_HEADS.NUM_CLASSES (both 80 by default)
INPUT:
  MASK_FORMAT: "bitmask"  # PointRend samples bitmasks
"""
POINTREND_TINY = [
    "MODEL.KEYPOINT_ON", "False",
    "MODEL.POINT_HEAD.NUM_CLASSES", "1",  # persons
    "MODEL.ROI_MASK_HEAD.FC_DIM", "32",
    "MODEL.ROI_MASK_HEAD.NUM_FC", "1",
    "MODEL.POINT_HEAD.FC_DIM", "32",
    "MODEL.POINT_HEAD.TRAIN_NUM_POINTS", "49",
    "MODEL.POINT_HEAD.SUBDIVISION_STEPS", "2",
    "MODEL.POINT_HEAD.SUBDIVISION_NUM_POINTS", "196",
]  # fmt: skip

CASCADE_YAML = """
MODEL:
  ROI_HEADS:
    NAME: "CascadeROIHeads"  # detectron2's, with its ROIPooler
  ROI_BOX_HEAD:
    CLS_AGNOSTIC_BBOX_REG: True  # required by CascadeROIHeads
  ROI_MASK_HEAD:
    NAME: "MRCNNMaskHead"  # the plugin's
"""

PER_BRANCH_YAML = """
MODEL:
  MRCNN:
    ROI_OP:
      NAME: "MRCNNRoIAlign"  # every branch, unless overridden
      MASK: {NAME: "MRCNNRoIPool", ALIGNED: False, AGGREGATION: "max"}
      KEYPOINT: {NAME: "MRCNNRoIPool", ALIGNED: False, AGGREGATION: "max"}
"""


def _cfg(yaml_text, opts, tmp_path, pointrend=False):
    """The persons config, then ``yaml_text`` (if any, as a file), then ``opts``."""
    cfg = add_mrcnn_config(get_cfg())
    if pointrend:
        point_rend.add_pointrend_config(cfg)
    cfg.merge_from_file(CONFIG)
    if yaml_text:
        path = tmp_path / "mix.yaml"
        path.write_text(yaml_text)
        cfg.merge_from_file(str(path))
    cfg.merge_from_list(TINY + opts)
    return cfg


def _batch(num_images=2, seed=0):
    """Synthetic persons images (SIZE x SIZE) with masks and keypoints."""
    rng = np.random.default_rng(seed)
    batch = []
    for _ in range(num_images):
        image, annotations = render_persons_image(rng, SIZE)
        for a in annotations:
            a.update(bbox_mode=BoxMode.XYWH_ABS, category_id=0)
            a["keypoints"] = np.asarray(a["keypoints"], dtype=np.float32).reshape(-1, 3)
        instances = annotations_to_instances(annotations, (SIZE, SIZE), mask_format="bitmask")
        tensor = torch.as_tensor(np.ascontiguousarray(image[:, :, ::-1].transpose(2, 0, 1)))
        batch.append({"image": tensor, "instances": instances, "height": SIZE, "width": SIZE})
    return batch


def _train_and_infer(cfg, expected_losses, steps=3):
    """Trains ``steps`` SGD steps (finite losses, backbone gradients, parameters move), then
    returns the model's inference outputs on a new batch."""
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    before = [p.detach().clone() for p in model.backbone.parameters()]
    model.train()
    with EventStorage(0) as storage:
        for step in range(steps):
            storage.iter = step
            losses = model(_batch(seed=step))
            assert set(losses) == expected_losses
            assert all(torch.isfinite(v) for v in losses.values()), losses
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.backbone.parameters()))
    model.eval()
    inputs = [{k: v for k, v in d.items() if k != "instances"} for d in _batch(seed=10)]
    with torch.no_grad():
        outputs = [o["instances"] for o in model(inputs)]
    for instances in outputs:
        assert len(instances) > 0 and instances.image_size == (SIZE, SIZE)
        if cfg.MODEL.MASK_ON:
            assert instances.pred_masks.shape == (len(instances), SIZE, SIZE)
        if cfg.MODEL.KEYPOINT_ON:
            assert instances.pred_keypoints.shape == (len(instances), 17, 3)
    return model, outputs


BASE_LOSSES = {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"}


def test_pointrend_mask_head_under_plugin_heads_and_backbone(tmp_path):
    cfg = _cfg(POINTREND_YAML, POINTREND_TINY, tmp_path, pointrend=True)
    assert cfg.MODEL.BACKBONE.NAME == "MRCNNResNetFPN"
    losses = BASE_LOSSES | {"loss_mask", "loss_mask_point"}
    model, _ = _train_and_infer(cfg, losses)
    heads = model.roi_heads
    assert type(heads) is MRCNNStandardROIHeads
    assert type(model.backbone).__name__ == "MRCNNResNetFPN"
    assert isinstance(heads.mask_head, point_rend.PointRendMaskHead)
    assert heads.mask_pooler is None  # detectron2's contract for POOLER_TYPE ""
    assert hasattr(heads.mask_head, "point_head")
    assert isinstance(heads.box_pooler, MultiLevelRoIPooler)


def test_cascade_roi_heads_with_plugin_mask_head_and_backbone(tmp_path):
    cfg = _cfg(CASCADE_YAML, ["MODEL.KEYPOINT_ON", "False"], tmp_path)
    stages = {f"loss_{n}_stage{i}" for n in ("cls", "box_reg") for i in range(3)}
    losses = {"loss_rpn_cls", "loss_rpn_loc", "loss_mask"} | stages
    model, _ = _train_and_infer(cfg, losses)
    heads = model.roi_heads
    assert type(heads) is CascadeROIHeads and heads.num_cascade_stages == 3
    assert type(model.backbone).__name__ == "MRCNNResNetFPN"
    assert isinstance(heads.mask_head, MRCNNMaskHead)
    assert type(heads.mask_pooler) is ROIPooler  # detectron2's heads keep detectron2's pooler


@pytest.mark.parametrize("per_branch_ops", [False, True])
def test_plugin_heads_on_detectron2_backbone(per_branch_ops, tmp_path):
    opts = ["MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone"]
    cfg = _cfg(PER_BRANCH_YAML if per_branch_ops else "", opts, tmp_path)
    model, _ = _train_and_infer(cfg, BASE_LOSSES | {"loss_mask", "loss_keypoint"})
    heads = model.roi_heads
    assert type(model.backbone).__name__ == "FPN"  # detectron2's
    assert type(heads) is MRCNNStandardROIHeads
    assert isinstance(heads.mask_head, MRCNNMaskHead)
    assert isinstance(heads.keypoint_head, MRCNNKeypointHead)
    ops = {
        branch: {type(op) for op in getattr(heads, f"{branch}_pooler").level_poolers}
        for branch in ("box", "mask", "keypoint")
    }
    fine_op = MRCNNRoIPool if per_branch_ops else MRCNNRoIAlign
    assert ops == {"box": {MRCNNRoIAlign}, "mask": {fine_op}, "keypoint": {fine_op}}
