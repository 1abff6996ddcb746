"""Mask heads, mask loss and mask inference against naive references and detectron2."""

import math

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead, build_mask_head
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from mrcnn_plugin.config import add_mrcnn_config
from mrcnn_plugin.modeling.roi_heads.mask_head import (
    MRCNNMaskHead,
    mask_inference,
    mask_loss,
)

M = 6  # mask side used by the loss tests


def _cfg(num_conv=4, norm="", agnostic=False, loss="sigmoid", name="MRCNNMaskHead"):
    cfg = add_mrcnn_config(get_cfg())
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 5
    cfg.MODEL.ROI_MASK_HEAD.NAME = name
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = num_conv
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 32  # GroupNorm needs 32 | channels
    cfg.MODEL.ROI_MASK_HEAD.NORM = norm
    cfg.MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK = agnostic
    cfg.MODEL.MRCNN.MASK_LOSS = loss
    cfg.MODEL.MRCNN.MASK_MLP_DIMS = [32, 24]
    return cfg


def _foreground_rois(num_classes=4, seed=0):
    """Two images of 2M x 2M with random GT masks and boxes whose M x M targets are known.

    Box (a, b, a+M, b+M) samples pixels (b+i, a+j) exactly, so its target is that crop of the
    mask; box (0, 0, 2M, 2M) averages 2x2 blocks and thresholds at 0.5 (>= 2 of 4 pixels).
    Returns the per-image Instances and the (R, M, M) naive targets and (R,) classes.
    """
    g = torch.Generator().manual_seed(seed)
    images, targets, classes = [], [], []
    for num in (3, 2):
        masks = torch.rand(num, 2 * M, 2 * M, generator=g) > 0.5
        cls = torch.randint(num_classes, (num,), generator=g)
        boxes = []
        for r in range(num):
            if r == 0:
                boxes.append([0.0, 0.0, 2.0 * M, 2.0 * M])
                t = torch.zeros(M, M, dtype=torch.bool)
                for i in range(M):
                    for j in range(M):
                        block = masks[r, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2]
                        t[i, j] = block.float().mean() >= 0.5
            else:
                a, b = (r * 2) % M, (r * 3) % M
                boxes.append([float(a), float(b), float(a + M), float(b + M)])
                t = masks[r, b : b + M, a : a + M]
            targets.append(t)
            classes.append(int(cls[r]))
        inst = Instances((2 * M, 2 * M))
        inst.proposal_boxes = Boxes(torch.tensor(boxes))
        inst.gt_classes = cls
        inst.gt_masks = BitMasks(masks)
        images.append(inst)
    return images, torch.stack(targets), classes


def _naive_sigmoid_loss(logits, targets, channels):
    total, count = 0.0, 0
    for r, c in enumerate(channels):
        for i in range(M):
            for j in range(M):
                p = 1.0 / (1.0 + math.exp(-float(logits[r, c, i, j])))
                y = float(targets[r, i, j])
                total -= y * math.log(p) + (1 - y) * math.log(1 - p)
                count += 1
    return total / count


def _naive_softmax_loss(logits, targets, channels):
    total, count = 0.0, 0
    for r, c in enumerate(channels):
        for i in range(M):
            for j in range(M):
                scores = [0.0] + [float(v) for v in logits[r, :, i, j]]
                log_z = math.log(sum(math.exp(s) for s in scores))
                t = c + 1 if targets[r, i, j] else 0
                total -= scores[t] - log_z
                count += 1
    return total / count


@pytest.mark.parametrize("loss_type", ["sigmoid", "softmax"])
@pytest.mark.parametrize("agnostic", [False, True])
def test_mask_loss_matches_naive(loss_type, agnostic):
    rois, targets, classes = _foreground_rois()
    num_channels = 1 if agnostic else 4
    logits = torch.randn(
        len(classes), num_channels, M, M, generator=torch.Generator().manual_seed(1)
    )
    channels = [0] * len(classes) if agnostic else classes
    naive = _naive_sigmoid_loss if loss_type == "sigmoid" else _naive_softmax_loss
    expected = naive(logits.double(), targets, channels)
    with EventStorage():  # the losses log detectron2's mask_rcnn/* metrics
        loss = mask_loss(logits, rois, loss_type)
        sigmoid = mask_loss(logits, rois, "sigmoid")
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    if agnostic:  # a single channel against a zero background logit is a sigmoid
        assert loss.item() == pytest.approx(sigmoid.item(), rel=1e-5)


@pytest.mark.parametrize("loss_type", ["sigmoid", "softmax"])
def test_accuracy_metric(loss_type):
    rois, targets, classes = _foreground_rois(seed=4)
    logits = torch.randn(len(classes), 4, M, M)
    with EventStorage() as storage:
        mask_loss(logits, rois, loss_type)
        metrics = {k: v[0] for k, v in storage.latest().items()}
    assert {"mask_rcnn/accuracy", "mask_rcnn/false_positive", "mask_rcnn/false_negative"} <= set(
        metrics
    )
    if loss_type == "sigmoid":
        probs = logits.sigmoid()
    else:  # against the zero background logit
        probs = torch.cat([torch.zeros(len(classes), 1, M, M), logits], 1).softmax(1)[:, 1:]
    pred = torch.stack([probs[r, c] > 0.5 for r, c in enumerate(classes)])
    assert metrics["mask_rcnn/accuracy"] == pytest.approx((pred == targets).float().mean().item())


@pytest.mark.parametrize("loss_type", ["sigmoid", "softmax"])
def test_mask_loss_without_foreground_is_zero(loss_type):
    head = MRCNNMaskHead(
        input_shape=ShapeSpec(channels=8), num_classes=3, conv_dims=[8, 8, 8], loss_type=loss_type
    )
    empty = Instances((20, 20))
    empty.proposal_boxes = Boxes(torch.zeros(0, 4))
    empty.gt_classes = torch.zeros(0, dtype=torch.int64)
    empty.gt_masks = BitMasks(torch.zeros(0, 20, 20, dtype=torch.bool))
    with EventStorage():
        losses = head(torch.zeros(0, 8, 14, 14), [empty, empty])
    assert set(losses) == {"loss_mask"}
    assert losses["loss_mask"].item() == 0.0
    total = losses["loss_mask"] + torch.tensor(1.5)
    assert torch.isfinite(total)
    losses["loss_mask"].backward()  # the graph stays connected to the head's parameters
    assert head.predictor.weight.grad is not None


@pytest.mark.parametrize("loss_type", ["sigmoid", "softmax"])
def test_mask_inference_takes_predicted_class(loss_type):
    logits = torch.randn(5, 4, M, M)
    a, b = Instances((10, 10)), Instances((10, 10))
    a.pred_classes = torch.tensor([3, 0, 1])
    b.pred_classes = torch.tensor([2, 2])
    mask_inference(logits, [a, b], loss_type)
    assert a.pred_masks.shape == (3, 1, M, M) and b.pred_masks.shape == (2, 1, M, M)
    got = torch.cat([a.pred_masks, b.pred_masks])[:, 0]
    for r, c in enumerate([3, 0, 1, 2, 2]):
        if loss_type == "sigmoid":
            expected = logits[r, c].sigmoid()
        else:
            exps = logits[r].exp()
            expected = exps[c] / (1.0 + exps.sum(0))
        torch.testing.assert_close(got[r], expected)


def _detections():
    dets = [Instances((10, 10)), Instances((10, 10))]
    dets[0].pred_classes = torch.tensor([0, 4, 2])
    dets[1].pred_classes = torch.tensor([1, 3])
    return dets


@pytest.mark.parametrize(
    "num_conv, side, name",
    [(4, 14, "MRCNNMaskHead"), (0, 7, "MRCNNMaskHead"), (0, 14, "MRCNNMLPMaskHead")],
)
@pytest.mark.parametrize("agnostic", [False, True])
def test_head_shapes_train_and_eval(num_conv, side, name, agnostic):
    """FPN head 14 -> 28, C4 head 7 -> 14, MLP head 14 -> 28; loss in train, masks in eval."""
    cfg = _cfg(num_conv=num_conv, agnostic=agnostic, name=name)
    head = build_mask_head(cfg, ShapeSpec(channels=8, height=side, width=side))
    assert type(head).__name__ == name
    x = torch.randn(5, 8, side, side)
    k = 1 if agnostic else 5
    assert head.layers(x).shape == (5, k, 2 * side, 2 * side)

    rois, _, _ = _foreground_rois(num_classes=5)
    with EventStorage():
        losses = head(x, rois)
    assert set(losses) == {"loss_mask"} and losses["loss_mask"].ndim == 0
    assert torch.isfinite(losses["loss_mask"]) and losses["loss_mask"].requires_grad

    head.eval()
    dets = _detections()
    out = head(x, dets)
    assert out is dets
    assert dets[0].pred_masks.shape == (3, 1, 2 * side, 2 * side)
    assert dets[1].pred_masks.shape == (2, 1, 2 * side, 2 * side)
    assert 0.0 <= dets[0].pred_masks.min() and dets[0].pred_masks.max() <= 1.0


@pytest.mark.parametrize("num_conv, norm", [(4, ""), (4, "GN"), (0, "")])
@pytest.mark.parametrize("agnostic", [False, True])
def test_fcn_head_matches_detectron2(num_conv, norm, agnostic):
    """Same state_dict, same seeded init, same loss, metrics and masks as detectron2's
    MaskRCNNConvUpsampleHead."""
    cfg = _cfg(num_conv=num_conv, norm=norm, agnostic=agnostic)
    shape = ShapeSpec(channels=8, height=7, width=7)
    torch.manual_seed(0)
    ours = MRCNNMaskHead(cfg, shape)
    torch.manual_seed(0)
    theirs = MaskRCNNConvUpsampleHead(cfg, shape)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert list(ours_sd) == list(theirs_sd)
    if norm:
        assert "mask_fcn1.norm.weight" in ours_sd
    for key, value in theirs_sd.items():
        torch.testing.assert_close(ours_sd[key], value, rtol=0, atol=0)
    assert ours.predictor.weight.std().item() == pytest.approx(0.001, rel=0.3)
    assert ours.predictor.bias.abs().sum() == 0 and ours.deconv.bias.abs().sum() == 0

    with torch.no_grad():  # a predictor that gives masks far from 0.5
        theirs.predictor.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(5, 8, 7, 7)
    rois, _, _ = _foreground_rois(num_classes=5)
    losses = []
    for head in (ours, theirs):
        with EventStorage() as storage:
            loss = head(x, rois)["loss_mask"]
            losses.append((loss, {k: v[0] for k, v in storage.latest().items()}))
    assert losses[0][0].item() == losses[1][0].item() and losses[0][1] == losses[1][1]
    assert set(losses[0][1]) >= {"mask_rcnn/accuracy", "mask_rcnn/false_negative"}
    mine, ref = _detections(), _detections()
    ours.eval()(x, mine)
    theirs.eval()(x, ref)
    for a, b in zip(mine, ref):
        assert torch.equal(a.pred_masks, b.pred_masks)


@pytest.mark.parametrize(
    "num_conv, side, name",
    [(4, 14, "MRCNNMaskHead"), (0, 7, "MRCNNMaskHead"), (0, 14, "MRCNNMLPMaskHead")],
)
@pytest.mark.parametrize("loss_type", ["sigmoid", "softmax"])
def test_bfloat16_autocast_train_step_and_inference(num_conv, side, name, loss_type):
    """The CPU trainer runs the forward under bfloat16 autocast: float32 loss close to the
    float32 one, finite gradients, an SGD step, float32 masks in eval."""
    cfg = _cfg(num_conv=num_conv, loss=loss_type, name=name)
    torch.manual_seed(0)
    head = build_mask_head(cfg, ShapeSpec(channels=8, height=side, width=side))
    with torch.no_grad():
        head.predictor.weight.normal_(0, 0.05)
    x = torch.randn(5, 8, side, side)
    rois, _, _ = _foreground_rois(num_classes=5)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    with EventStorage():
        reference = head(x, rois)["loss_mask"].item()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = head(x, rois)["loss_mask"]
        assert loss.dtype == torch.float32
        assert loss.item() == pytest.approx(reference, rel=0.05)
        loss.backward()
        before = head.predictor.weight.detach().clone()
        grads = [p.grad for p in head.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        optimizer.step()
    assert not torch.equal(head.predictor.weight, before)
    assert all(torch.isfinite(p).all() for p in head.parameters())
    head.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        dets = head(x, _detections())
    assert dets[0].pred_masks.dtype == torch.float32
    assert torch.isfinite(dets[0].pred_masks).all()


def test_mlp_head_layers():
    cfg = _cfg(name="MRCNNMLPMaskHead", loss="softmax")
    head = build_mask_head(cfg, ShapeSpec(channels=4, height=14, width=14))
    assert head.loss_type == "softmax"
    assert [k for k in head.state_dict() if k.endswith("weight")] == [
        "mask_fc1.weight",
        "mask_fc2.weight",
        "predictor.weight",
    ]
    assert head.mask_fc1.weight.shape == (32, 4 * 14 * 14)
    assert head.predictor.weight.shape == (5 * 28 * 28, 24)
    # Layout: predictor unit (k * 28 + i) * 28 + j is pixel (i, j) of class k.
    with torch.no_grad():
        head.predictor.weight.zero_()
        head.predictor.bias.zero_()
        head.predictor.bias[(3 * 28 + 5) * 28 + 7] = 1.0
    out = head.layers(torch.randn(2, 4, 14, 14))
    assert out[:, 3, 5, 7].eq(1.0).all() and out.abs().sum() == 2.0


def test_unknown_loss_type_rejected():
    with pytest.raises(AssertionError):
        MRCNNMaskHead(
            input_shape=ShapeSpec(channels=4), num_classes=2, conv_dims=[4], loss_type="l2"
        )
