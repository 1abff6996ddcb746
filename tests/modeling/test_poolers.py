"""MultiLevelRoIPooler: parity with detectron2's ROIPooler, level assignment, config builders."""

import functools

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.poolers import assign_boxes_to_levels as d2_assign_boxes_to_levels
from detectron2.modeling.roi_heads import StandardROIHeads
from detectron2.structures import Boxes, ImageList, Instances

from mrcnn_plugin.config import add_mrcnn_config
from mrcnn_plugin.layers import MRCNNRoIAlign, RoIAlign, RoIPool, roi_align
from mrcnn_plugin.modeling.poolers import (
    MultiLevelRoIPooler,
    assign_boxes_to_levels,
    build_pooler_from_config,
    roi_op_from_config,
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
    return [
        _random_boxes(40, seed=1),
        Boxes(torch.zeros(0, 4)),
        _random_boxes(25, seed=2),
    ]


PARITY_CASES = [
    ("ROIAlignV2", 0, functools.partial(RoIAlign, sampling_ratio=0, aligned=True)),
    ("ROIAlign", 2, functools.partial(RoIAlign, sampling_ratio=2, aligned=False)),
    ("ROIPool", 0, RoIPool),
]


@pytest.mark.parametrize("pooler_type,sampling_ratio,roi_op", PARITY_CASES)
@pytest.mark.parametrize("output_size", [7, 14])
def test_identical_to_detectron2_roi_pooler(pooler_type, sampling_ratio, roi_op, output_size):
    feats, box_lists = _features(), _box_lists()
    d2 = ROIPooler(output_size, SCALES, sampling_ratio, pooler_type)
    ours = MultiLevelRoIPooler(output_size, SCALES, roi_op)
    expected = d2(feats, box_lists)
    out = ours(feats, box_lists)
    assert out.shape == (65, 4, output_size, output_size)
    assert torch.equal(out, expected)
    assert (ours.min_level, ours.max_level) == (d2.min_level, d2.max_level) == (2, 5)
    assert ours.output_size == d2.output_size


def test_rows_follow_box_order_and_assigned_level():
    feats, box_lists = _features(), _box_lists()
    pooler = MultiLevelRoIPooler(7, SCALES, functools.partial(RoIAlign, sampling_ratio=2))
    out = pooler(feats, box_lists)
    levels = assign_boxes_to_levels(box_lists, 2, 5, 224, 4)
    assert set(levels.tolist()) == {0, 1, 2, 3}  # the test boxes cover every level
    row = 0
    for image, boxes in enumerate(box_lists):
        for box in boxes.tensor:
            roi = torch.cat([torch.tensor([float(image)]), box])[None]
            lvl = int(levels[row])
            expected = roi_align(feats[lvl], roi, 7, SCALES[lvl], 2, aligned=True)
            torch.testing.assert_close(out[row : row + 1], expected, atol=0, rtol=0)
            row += 1
    assert row == out.shape[0]


def test_level_assignment_matches_detectron2():
    # Include exact canonical sizes (224 -> level 4, 112 -> 3, 448 -> 5) and degenerate boxes.
    exact = Boxes(
        torch.tensor(
            [
                [0, 0, 224, 224],
                [10, 10, 122, 122],
                [0, 0, 448, 448],
                [5, 5, 5, 5],
                [0, 0, 1000, 2],
                [3, 3, 3000, 3000],
                [0, 0, 223.99, 224],
            ],
            dtype=torch.float32,
        )
    )
    box_lists = [exact, _random_boxes(200, seed=3, max_side=2000.0, min_side=1.0)]
    for min_level, max_level, size, level in [(2, 5, 224, 4), (2, 6, 224, 4), (3, 5, 160, 3)]:
        ours = assign_boxes_to_levels(box_lists, min_level, max_level, size, level)
        theirs = d2_assign_boxes_to_levels(box_lists, min_level, max_level, size, level)
        assert ours.dtype == torch.int64
        assert torch.equal(ours, theirs)
    first = assign_boxes_to_levels([exact], 2, 5, 224, 4)[:3] + 2
    assert first.tolist() == [4, 3, 5]


def test_zero_boxes_and_zero_images():
    feats = _features(num_images=2)
    pooler = MultiLevelRoIPooler((7, 5), SCALES, functools.partial(RoIAlign, sampling_ratio=0))
    empty = [Boxes(torch.zeros(0, 4)), Boxes(torch.zeros(0, 4))]
    assert pooler(feats, empty).shape == (0, 4, 7, 5)
    no_images = [f[:0] for f in feats]
    assert pooler(no_images, []).shape == (0, 4, 7, 5)


def test_single_level_matches_detectron2_and_backprops():
    feat = torch.randn(2, 3, 10, 12, requires_grad=True)
    box_lists = [_random_boxes(9, seed=4), _random_boxes(4, seed=5)]
    ours = MultiLevelRoIPooler(7, [1.0 / 16], functools.partial(RoIAlign, sampling_ratio=0))
    theirs = ROIPooler(7, [1.0 / 16], 0, "ROIAlignV2")
    out = ours([feat], box_lists)
    assert torch.equal(out, theirs([feat], box_lists))
    out.square().sum().backward()
    assert feat.grad is not None and feat.grad.abs().sum() > 0


def test_multilevel_backprop_reaches_every_used_level():
    feats = [f.requires_grad_() for f in _features()]
    pooler = MultiLevelRoIPooler(7, SCALES, functools.partial(RoIAlign, aggregation="max"))
    pooler(feats, _box_lists()).sum().backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)


def test_invalid_scales_and_inputs():
    op = functools.partial(RoIAlign, sampling_ratio=0)
    with pytest.raises(ValueError, match="power of 2"):
        MultiLevelRoIPooler(7, [1.0 / 3], op)
    with pytest.raises(ValueError, match="pyramid"):
        MultiLevelRoIPooler(7, [1.0 / 4, 1.0 / 16], op)
    pooler = MultiLevelRoIPooler(7, SCALES, op)
    with pytest.raises(ValueError, match="feature maps"):
        pooler(_features()[:3], _box_lists())
    with pytest.raises(ValueError, match="box lists"):
        pooler(_features(), _box_lists()[:2])


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
    factory = roi_op_from_config(cfg, 3)
    op = factory(7, 0.25)
    assert isinstance(op, MRCNNRoIAlign)
    assert (op.sampling_ratio, op.aligned, op.aggregation) == (3, True, "avg")
    assert op.output_size == (7, 7) and op.spatial_scale == 0.25

    cfg.MODEL.MRCNN.ROI_OP.NAME = "MRCNNRoIWarp"
    cfg.MODEL.MRCNN.ROI_OP.ALIGNED = False
    cfg.MODEL.MRCNN.ROI_OP.AGGREGATION = "max"
    op = roi_op_from_config(cfg, 2)(7, 0.25)
    assert type(op).__name__ == "MRCNNRoIWarp" and op.aggregation == "max"

    cfg.MODEL.MRCNN.ROI_OP.NAME = "MRCNNRoIPool"
    cfg.MODEL.MRCNN.ROI_OP.AGGREGATION = "avg"
    with pytest.raises(ValueError, match="MRCNNRoIPool"):
        roi_op_from_config(cfg, 0)
    cfg.MODEL.MRCNN.ROI_OP.NAME = "NoSuchOp"
    with pytest.raises(KeyError):
        roi_op_from_config(cfg, 0)


@pytest.mark.parametrize(
    "head_key,aligned,pooler_type",
    [("ROI_BOX_HEAD", True, "ROIAlignV2"), ("ROI_MASK_HEAD", False, "ROIAlign")],
)
def test_build_pooler_from_config_matches_detectron2(head_key, aligned, pooler_type):
    cfg = _cfg()
    cfg.MODEL.MRCNN.ROI_OP.ALIGNED = aligned
    cfg.MODEL.MRCNN.ROI_OP.CANONICAL_BOX_SIZE = 160
    cfg.MODEL.MRCNN.ROI_OP.CANONICAL_LEVEL = 3
    in_features = ["p2", "p3", "p4", "p5"]
    pooler = build_pooler_from_config(cfg, head_key, _input_shape(), in_features)
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
    cfg.MODEL.ROI_MASK_HEAD.POOLER_TYPE = "ROIAlign"  # our cfg: aligned=False, sampling 2
    heads = StandardROIHeads(cfg, _input_shape()).eval()

    feats = _features(num_images=2)
    features = dict(zip(cfg.MODEL.ROI_HEADS.IN_FEATURES, feats))
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
        heads.box_pooler = build_pooler_from_config(
            cfg, "ROI_BOX_HEAD", _input_shape(), in_features
        )
        cfg.MODEL.MRCNN.ROI_OP.ALIGNED = False
        heads.mask_pooler = build_pooler_from_config(
            cfg, "ROI_MASK_HEAD", _input_shape(), in_features
        )
        got, _ = heads(images, features, proposals)
    assert sum(len(x) for x in expected) > 0
    for a, b in zip(expected, got):
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(a.pred_masks, b.pred_masks)
        assert torch.equal(a.scores, b.scores)
