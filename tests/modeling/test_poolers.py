"""MultiLevelRoIPooler: detectron2's ROIPooler with the plugin's ops gives ROIPooler's outputs,
keeps box counts dynamic under tracing, and is built per branch from the config."""

import functools
import warnings

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads import StandardROIHeads
from detectron2.structures import Boxes, ImageList, Instances

from mrcnn_plugin.config import add_mrcnn_config
from mrcnn_plugin.layers import MRCNNRoIAlign, MRCNNRoIPool, MRCNNRoIWarp
from mrcnn_plugin.modeling.poolers import (
    MultiLevelRoIPooler,
    build_pooler_from_config,
    roi_op_from_config,
    roi_op_of_head,
)

STRIDES = (4, 8, 16, 32)
SCALES = [1.0 / s for s in STRIDES]
IMAGE_HW = (128, 160)


def _features(num_images=3, channels=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = IMAGE_HW
    return [torch.randn(num_images, channels, h // s, w // s, generator=g) for s in STRIDES]


def _random_boxes(n, seed, max_side=900.0, min_side=8.0):
    """Boxes with log-uniform sqrt(area) in [min_side, max_side] and aspect ratios in about
    [1/2, 2], so they spread over the levels (and beyond the image); the first is degenerate."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = torch.log(torch.tensor([min_side, max_side]))
    side = torch.exp(lo + torch.rand(n, 1, generator=g) * (hi - lo))
    sqrt_aspect = torch.exp(torch.rand(n, 1, generator=g) * 0.7 - 0.35)
    sides = torch.cat([side * sqrt_aspect, side / sqrt_aspect], dim=1)
    xy0 = torch.rand(n, 2, generator=g) * torch.tensor([IMAGE_HW[1], IMAGE_HW[0]]) - 10
    boxes = torch.cat([xy0, xy0 + sides], dim=1)
    boxes[0, 2] = boxes[0, 0]  # zero area
    return Boxes(boxes)


def _box_lists():
    # The middle image has no boxes.
    return [_random_boxes(40, seed=1), Boxes(torch.zeros(0, 4)), _random_boxes(25, seed=2)]


PARITY_CASES = [
    ("ROIAlignV2", 0, MRCNNRoIAlign, {"aligned": True}),
    ("ROIAlign", 2, MRCNNRoIAlign, {"aligned": False}),
    ("ROIPool", 0, MRCNNRoIPool, {}),
]


@pytest.mark.parametrize("pooler_type,sampling_ratio,op_class,kwargs", PARITY_CASES)
@pytest.mark.parametrize("output_size", [7, 14])
def test_identical_to_detectron2_roi_pooler(
    pooler_type, sampling_ratio, op_class, kwargs, output_size
):
    feats, box_lists = _features(), _box_lists()
    d2 = ROIPooler(output_size, SCALES, sampling_ratio, pooler_type)
    roi_op = functools.partial(op_class, sampling_ratio=sampling_ratio, **kwargs)
    ours = MultiLevelRoIPooler(output_size, SCALES, roi_op)
    assert isinstance(ours, ROIPooler)
    assert all(type(op) is op_class for op in ours.level_poolers)
    out = ours(feats, box_lists)
    assert out.shape == (65, 4, output_size, output_size)
    assert torch.equal(out, d2(feats, box_lists))
    # The test boxes reach every level, so every level's op is compared.
    sizes = torch.cat([b.area() for b in box_lists]).sqrt()
    assert sizes.min() < 112 / 2 and sizes.max() > 448


def test_zero_boxes_and_zero_images():
    feats = _features(num_images=2)
    pooler = MultiLevelRoIPooler(7, SCALES, functools.partial(MRCNNRoIAlign, sampling_ratio=0))
    empty = [Boxes(torch.zeros(0, 4)), Boxes(torch.zeros(0, 4))]
    assert pooler(feats, empty).shape == (0, 4, 7, 7)
    assert pooler([f[:0] for f in feats], []).shape == (0, 4, 7, 7)


def test_single_level_matches_detectron2_and_backprops():
    feat = torch.randn(2, 3, 10, 12, requires_grad=True)
    box_lists = [_random_boxes(9, seed=4), _random_boxes(4, seed=5)]
    ours = MultiLevelRoIPooler(7, [1.0 / 16], functools.partial(MRCNNRoIAlign, sampling_ratio=0))
    out = ours([feat], box_lists)
    assert torch.equal(out, ROIPooler(7, [1.0 / 16], 0, "ROIAlignV2")([feat], box_lists))
    out.square().sum().backward()
    assert feat.grad is not None and feat.grad.abs().sum() > 0


def test_multilevel_backprop_reaches_every_used_level():
    feats = [f.requires_grad_() for f in _features()]
    pooler = MultiLevelRoIPooler(7, SCALES, functools.partial(MRCNNRoIAlign, aggregation="max"))
    pooler(feats, _box_lists()).sum().backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)


@pytest.mark.parametrize("scales", [SCALES, SCALES[2:3]])
def test_traced_pooler_keeps_box_counts_dynamic(scales):
    feats = [f for f, s in zip(_features(num_images=2), SCALES) if s in scales]
    pooler = MultiLevelRoIPooler(7, scales, functools.partial(MRCNNRoIWarp, sampling_ratio=2))

    def pool(boxes0, boxes1):
        return pooler(feats, [Boxes(boxes0), Boxes(boxes1)])

    boxes = [_random_boxes(n, seed=n).tensor for n in (12, 7, 3, 20)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(pool, (boxes[0], boxes[1]), check_trace=False)
    for a, b in [(boxes[2], boxes[3]), (boxes[3], boxes[2][:0]), (boxes[1], boxes[0])]:
        out = traced(a, b)
        assert out.shape[0] == len(a) + len(b)
        assert torch.equal(out, pool(a, b))


def _cfg():
    cfg = add_mrcnn_config(get_cfg())
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO = 0
    cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION = 14
    cfg.MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO = 2
    return cfg


def _input_shape(channels=4):
    return {f"p{i + 2}": ShapeSpec(channels=channels, stride=s) for i, s in enumerate(STRIDES)}


def test_roi_op_from_config():
    cfg = _cfg()
    op = roi_op_from_config(cfg, "ROI_MASK_HEAD")(7, 0.25)
    assert isinstance(op, MRCNNRoIAlign)
    assert (op.sampling_ratio, op.aligned, op.aggregation) == (2, True, "avg")
    assert op.output_size == (7, 7) and op.spatial_scale == 0.25

    cfg.MODEL.MRCNN.ROI_OP.NAME = "MRCNNRoIWarp"
    cfg.MODEL.MRCNN.ROI_OP.ALIGNED = False
    cfg.MODEL.MRCNN.ROI_OP.AGGREGATION = "max"
    op = roi_op_from_config(cfg, "ROI_BOX_HEAD")(7, 0.25)
    assert isinstance(op, MRCNNRoIWarp) and op.aggregation == "max" and op.sampling_ratio == 0

    cfg.MODEL.MRCNN.ROI_OP.NAME = "MRCNNRoIPool"
    cfg.MODEL.MRCNN.ROI_OP.AGGREGATION = "avg"
    with pytest.raises(ValueError, match="MRCNNRoIPool"):
        roi_op_from_config(cfg, "ROI_BOX_HEAD")
    cfg.MODEL.MRCNN.ROI_OP.NAME = "NoSuchOp"
    with pytest.raises(KeyError):
        roi_op_from_config(cfg, "ROI_BOX_HEAD")


def test_per_branch_overrides():
    cfg = _cfg()
    cfg.merge_from_list(
        ["MODEL.MRCNN.ROI_OP.KEYPOINT.NAME", "MRCNNRoIPool",
         "MODEL.MRCNN.ROI_OP.KEYPOINT.ALIGNED", "False",
         "MODEL.MRCNN.ROI_OP.KEYPOINT.AGGREGATION", "max",
         "MODEL.MRCNN.ROI_OP.MASK.AGGREGATION", "max"]
    )  # fmt: skip
    got = {h: dict(roi_op_of_head(cfg, h)) for h in ("ROI_BOX_HEAD", "ROI_MASK_HEAD")}
    assert got == {
        "ROI_BOX_HEAD": {"NAME": "MRCNNRoIAlign", "ALIGNED": True, "AGGREGATION": "avg"},
        "ROI_MASK_HEAD": {"NAME": "MRCNNRoIAlign", "ALIGNED": True, "AGGREGATION": "max"},
    }
    assert isinstance(roi_op_from_config(cfg, "ROI_KEYPOINT_HEAD")(7, 0.25), MRCNNRoIPool)
    assert roi_op_from_config(cfg, "ROI_MASK_HEAD")(7, 0.25).aggregation == "max"
    assert roi_op_from_config(cfg, "ROI_BOX_HEAD")(7, 0.25).aggregation == "avg"


@pytest.mark.parametrize(
    "head_key,aligned,pooler_type",
    [("ROI_BOX_HEAD", True, "ROIAlignV2"), ("ROI_MASK_HEAD", False, "ROIAlign")],
)
def test_build_pooler_from_config_matches_detectron2(head_key, aligned, pooler_type):
    cfg = _cfg()
    cfg.MODEL.MRCNN.ROI_OP.ALIGNED = aligned
    cfg.MODEL.MRCNN.ROI_OP.CANONICAL_BOX_SIZE = 160
    cfg.MODEL.MRCNN.ROI_OP.CANONICAL_LEVEL = 3
    pooler = build_pooler_from_config(cfg, head_key, _input_shape(), ["p2", "p3", "p4", "p5"])
    head = cfg.MODEL[head_key]
    assert pooler.output_size == (head.POOLER_RESOLUTION,) * 2
    assert (pooler.canonical_box_size, pooler.canonical_level) == (160, 3)
    assert [p.spatial_scale for p in pooler.level_poolers] == SCALES
    assert all(p.sampling_ratio == head.POOLER_SAMPLING_RATIO for p in pooler.level_poolers)
    d2 = ROIPooler(head.POOLER_RESOLUTION, SCALES, head.POOLER_SAMPLING_RATIO, pooler_type, 160, 3)
    feats, box_lists = _features(), _box_lists()
    assert torch.equal(pooler(feats, box_lists), d2(feats, box_lists))


def test_drop_in_replacement_inside_standard_roi_heads():
    torch.manual_seed(0)
    cfg = _cfg()
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 1
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 16
    cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE = "ROIAlignV2"
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 1
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 4
    cfg.MODEL.ROI_MASK_HEAD.POOLER_TYPE = "ROIAlign"  # our cfg: the MASK override, unaligned
    cfg.MODEL.MRCNN.ROI_OP.MASK.ALIGNED = False
    heads = StandardROIHeads(cfg, _input_shape()).eval()

    features = dict(zip(cfg.MODEL.ROI_HEADS.IN_FEATURES, _features(num_images=2)))
    images = ImageList(torch.zeros(2, 3, *IMAGE_HW), [IMAGE_HW, IMAGE_HW])
    proposals = []
    for seed in (6, 7):
        inst = Instances(IMAGE_HW)
        inst.proposal_boxes = _random_boxes(30, seed=seed, max_side=150.0)
        inst.proposal_boxes.clip(IMAGE_HW)
        inst.objectness_logits = torch.zeros(30)
        proposals.append(inst)

    with torch.no_grad():
        expected, _ = heads(images, features, proposals)
        in_features = cfg.MODEL.ROI_HEADS.IN_FEATURES
        for branch, head_key in [("box", "ROI_BOX_HEAD"), ("mask", "ROI_MASK_HEAD")]:
            pooler = build_pooler_from_config(cfg, head_key, _input_shape(), in_features)
            setattr(heads, f"{branch}_pooler", pooler)
        got, _ = heads(images, features, proposals)
    assert sum(len(x) for x in expected) > 0
    for a, b in zip(expected, got):
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(a.pred_masks, b.pred_masks)
        assert torch.equal(a.scores, b.scores)
