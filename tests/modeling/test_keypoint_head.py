"""Keypoint head, loss and inference against naive references and detectron2."""

import copy
import math

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as d2_utils
from detectron2.data import transforms as T
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads.keypoint_head import (
    KRCNNConvDeconvUpsampleHead,
    build_keypoint_head,
    keypoint_rcnn_inference,
)
from detectron2.structures import Boxes, Instances, Keypoints
from detectron2.utils.events import EventStorage

from mrcnn_plugin.config import add_mrcnn_config
from mrcnn_plugin.modeling.roi_heads.keypoint_head import MRCNNKeypointHead, keypoint_inference

K = 5  # keypoints in the small unit tests


def _cfg(conv_dims=(16, 16, 16), num_keypoints=K, visible=True):
    cfg = add_mrcnn_config(get_cfg())
    cfg.MODEL.ROI_KEYPOINT_HEAD.NAME = "MRCNNKeypointHead"
    cfg.MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS = conv_dims
    cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS = num_keypoints
    cfg.MODEL.ROI_KEYPOINT_HEAD.NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS = visible
    return cfg


def _random_instances(gen, num_boxes, num_keypoints=K, size=40.0):
    """Proposals with gt keypoints: some invisible, some outside, some on the box's far edge."""
    xy0 = torch.rand(num_boxes, 2, generator=gen) * size
    wh = torch.rand(num_boxes, 2, generator=gen) * size + 3.0
    boxes = torch.cat([xy0, xy0 + wh], dim=1)
    # Keypoints spread over 1.4x the box so that some fall outside it.
    rel = torch.rand(num_boxes, num_keypoints, 2, generator=gen) * 1.4 - 0.2
    xy = xy0[:, None] + rel * wh[:, None]
    if num_boxes:
        xy[0, 0] = boxes[0, 2:]  # exactly on the right/bottom edge: the last heatmap cell
    vis = torch.randint(0, 3, (num_boxes, num_keypoints), generator=gen).float()
    inst = Instances((100, 100))
    inst.proposal_boxes = Boxes(boxes)
    inst.gt_keypoints = Keypoints(torch.cat([xy, vis[..., None]], dim=2))
    return inst


def _naive_loss(logits, instances):
    """Sum of -log softmax at the target cell over visible in-box keypoints, and their count."""
    side = logits.shape[-1]
    total, count, row = 0.0, 0, 0
    for inst in instances:
        for box, kpts in zip(inst.proposal_boxes.tensor.tolist(), inst.gt_keypoints.tensor):
            x0, y0, x1, y1 = box
            for k, (x, y, v) in enumerate(kpts.tolist()):
                cx = side - 1 if x == x1 else math.floor((x - x0) * side / (x1 - x0))
                cy = side - 1 if y == y1 else math.floor((y - y0) * side / (y1 - y0))
                if v > 0 and 0 <= cx < side and 0 <= cy < side:
                    log_probs = torch.log_softmax(logits[row, k].double().flatten(), dim=0)
                    total -= log_probs[cy * side + cx].item()
                    count += 1
            row += 1
    return total, count


def test_head_shapes_and_state_dict_names():
    cfg = _cfg(conv_dims=(8,) * 8, num_keypoints=17)
    head = MRCNNKeypointHead(cfg, ShapeSpec(channels=4, height=14, width=14))
    out = head.layers(torch.randn(3, 4, 14, 14))
    assert out.shape == (3, 17, 56, 56)
    expected = {f"conv_fcn{i}.{p}" for i in range(1, 9) for p in ("weight", "bias")}
    expected |= {"score_lowres.weight", "score_lowres.bias"}
    assert set(head.state_dict()) == expected


def test_matches_detectron2_head_and_init():
    cfg = _cfg(conv_dims=(512,) * 8, num_keypoints=17)  # the defaults of the paper's head
    shape = ShapeSpec(channels=256, height=14, width=14)
    torch.manual_seed(0)
    mine = build_keypoint_head(cfg, shape)
    theirs = KRCNNConvDeconvUpsampleHead(cfg, shape)
    assert isinstance(mine, MRCNNKeypointHead)
    assert {k: v.shape for k, v in mine.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    # Same init: zero biases, kaiming_normal(fan_out) weights (std sqrt(2 / fan_out)).
    for name, p in mine.named_parameters():
        if name.endswith("bias"):
            assert p.abs().max() == 0
        else:
            fan_out = p.shape[0] * p[0][0].numel()
            assert p.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.05), name
    assert mine.loss_normalizer == "visible" and mine.loss_weight == 1.0

    small = _cfg(conv_dims=(16, 16, 16), num_keypoints=K)
    mine = MRCNNKeypointHead(small, ShapeSpec(channels=8, height=14, width=14))
    theirs = KRCNNConvDeconvUpsampleHead(small, ShapeSpec(channels=8, height=14, width=14))
    mine.load_state_dict(theirs.state_dict(), strict=True)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 8, 14, 14, generator=gen)
    torch.testing.assert_close(mine.layers(x), theirs.layers(x), rtol=0, atol=0)
    instances = [_random_instances(gen, 3), _random_instances(gen, 0), _random_instances(gen, 1)]
    assert mine(x, instances)["loss_keypoint"].item() == pytest.approx(
        theirs(x, instances)["loss_keypoint"].item(), rel=1e-6
    )
    ours = _detections(gen, [3, 1])
    ref = copy.deepcopy(ours)
    for a, b in zip(mine.eval()(x, ours), theirs.eval()(x, ref)):
        torch.testing.assert_close(a.pred_keypoints, b.pred_keypoints, rtol=0, atol=0)
        assert torch.equal(a.pred_keypoint_heatmaps, b.pred_keypoint_heatmaps)


@pytest.mark.parametrize("visible", [True, False])
def test_head_training_forward_normalizer(visible):
    cfg = _cfg(visible=visible)
    cfg.MODEL.ROI_KEYPOINT_HEAD.LOSS_WEIGHT = 3.0
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 16
    cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION = 0.5
    head = MRCNNKeypointHead(cfg, ShapeSpec(channels=4, height=4, width=4)).train()
    gen = torch.Generator().manual_seed(2)
    instances = [_random_instances(gen, 3), _random_instances(gen, 2)]
    x = torch.randn(5, 4, 4, 4, generator=gen)
    loss = head(x, instances)["loss_keypoint"]
    total, count = _naive_loss(head.layers(x).detach(), instances)
    # Not by visible keypoints: by K * BATCH_SIZE_PER_IMAGE * POSITIVE_FRACTION per image.
    normalizer = count if visible else 2 * K * 16 * 0.5
    assert loss.item() == pytest.approx(3.0 * total / normalizer, rel=1e-5)


def test_bfloat16_autocast_train_step_and_inference():
    # The CPU trainer runs the forward under bfloat16 autocast.
    head = MRCNNKeypointHead(_cfg(), ShapeSpec(channels=4, height=14, width=14)).train()
    gen = torch.Generator().manual_seed(7)
    instances = [_random_instances(gen, 3)]
    x = torch.randn(3, 4, 14, 14, generator=gen)
    reference = head(x, instances)["loss_keypoint"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(x, instances)["loss_keypoint"]
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference.item(), rel=0.05)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())
    before = head.conv_fcn1.weight.detach().clone()
    torch.optim.SGD(head.parameters(), lr=0.01).step()
    assert not torch.equal(head.conv_fcn1.weight, before)
    assert all(torch.isfinite(p).all() for p in head.parameters())
    head.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        (dets,) = head(x, _detections(gen, [3]))
    assert dets.pred_keypoints.dtype == torch.float32 and torch.isfinite(dets.pred_keypoints).all()
    assert dets.pred_keypoint_heatmaps.dtype == torch.float32


def test_empty_and_invisible_give_zero_loss():
    head = MRCNNKeypointHead(_cfg(), ShapeSpec(channels=4, height=14, width=14)).train()
    gen = torch.Generator().manual_seed(3)
    empty = [_random_instances(gen, 0), _random_instances(gen, 0)]
    invisible = [_random_instances(gen, 3)]
    invisible[0].gt_keypoints.tensor[..., 2] = 0
    for x, instances in (
        (torch.zeros(0, 4, 14, 14), empty),
        (torch.randn(3, 4, 14, 14), invisible),
    ):
        head.zero_grad()
        with EventStorage() as storage:  # logs the skipped batch like detectron2
            loss = head(x, instances)["loss_keypoint"]
            assert "kpts_num_skipped_batches" in storage.latest()
        total = loss + torch.tensor(1.5)
        assert loss.item() == 0 and torch.isfinite(total) and total.item() == 1.5
        total.backward()  # the graph stays connected to the head's parameters
        assert head.score_lowres.weight.grad.abs().max() == 0


def _detections(gen, counts, side=30.0):
    out = []
    for n in counts:
        xy0 = torch.rand(n, 2, generator=gen) * side
        wh = torch.rand(n, 2, generator=gen) * side + 0.4  # some boxes narrower than 1 px
        inst = Instances((80, 80))
        inst.pred_boxes = Boxes(torch.cat([xy0, xy0 + wh], dim=1))
        out.append(inst)
    return out


def test_inference_matches_detectron2():
    gen = torch.Generator().manual_seed(4)
    mine = _detections(gen, [3, 0, 4])
    theirs = copy.deepcopy(mine)
    logits = torch.randn(7, K, 12, 12, generator=gen) * 3
    keypoint_inference(logits, mine)
    keypoint_rcnn_inference(logits, theirs)
    for a, b in zip(mine, theirs):
        assert a.pred_keypoints.shape == (len(a), K, 3)
        torch.testing.assert_close(a.pred_keypoints, b.pred_keypoints, rtol=1e-5, atol=1e-5)
        assert torch.equal(a.pred_keypoint_heatmaps, b.pred_keypoint_heatmaps)


def _mirror(name):
    """The keypoint name on the other side of the body: left_X <-> right_X, others kept."""
    for a, b in (("left_", "right_"), ("right_", "left_")):
        if name.startswith(a):
            return b + name[len(a) :]
    return name


def test_hflip_swaps_left_and_right_keypoints(tmp_path):
    from mrcnn_plugin.data import register_persons

    names = register_persons(
        root=str(tmp_path), num_train=2, num_val=1, prefix="mrcnn_persons_kptest"
    )
    kp_names = list(MetadataCatalog.get(names[0]).keypoint_names)
    assert sum(n.startswith("left_") for n in kp_names) == 8  # COCO: 8 left/right pairs
    flip = d2_utils.create_keypoint_hflip_indices(names[0])
    assert [kp_names[j] for j in flip] == [_mirror(n) for n in kp_names]

    record = next(r for r in DatasetCatalog.get(names[0]) if r["annotations"])
    width, height = record["width"], record["height"]
    transforms = T.TransformList([T.HFlipTransform(width)])
    for anno in record["annotations"]:
        before = np.asarray(anno["keypoints"], dtype=np.float64).reshape(-1, 3)
        after = d2_utils.transform_instance_annotations(
            copy.deepcopy(anno), transforms, (height, width), keypoint_hflip_indices=flip
        )["keypoints"]
        assert (before[:, 2] > 0).sum() == (after[:, 2] > 0).sum() > 0
        for i, name in enumerate(kp_names):
            # The flipped "left_wrist" is the mirror image of the original "right_wrist".
            x, y, v = before[kp_names.index(_mirror(name))]
            expected = [width - x, y, v] if v > 0 else [0, 0, 0]
            np.testing.assert_allclose(after[i], expected, err_msg=name)
