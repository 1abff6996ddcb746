"""Keypoint head, loss and inference against naive references and detectron2; keypoint configs."""

import copy
import math
import os

import numpy as np
import pytest
import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as d2_utils
from detectron2.data import transforms as T
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads.keypoint_head import (
    KRCNNConvDeconvUpsampleHead,
    build_keypoint_head,
    keypoint_rcnn_inference,
    keypoint_rcnn_loss,
)
from detectron2.structures import Boxes, Instances, Keypoints
from detectron2.utils.events import EventStorage

from mrcnn_plugin.config import add_mrcnn_config
from mrcnn_plugin.modeling.roi_heads.keypoint_head import (
    MRCNNKeypointHead,
    keypoint_inference,
    keypoint_loss,
)

try:  # importing the packages registers the plugin's backbones and ROI heads
    import mrcnn_plugin.modeling.backbone  # noqa: F401
    import mrcnn_plugin.modeling.roi_heads  # noqa: F401

    ROI_HEADS_ERROR = None
except ImportError as e:  # only while the ROI heads are being written
    ROI_HEADS_ERROR = f"plugin ROI heads not importable yet: {e}"
needs_roi_heads = pytest.mark.skipif(ROI_HEADS_ERROR is not None, reason=str(ROI_HEADS_ERROR))

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs")
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
    x = torch.randn(4, 8, 14, 14)
    torch.testing.assert_close(mine.layers(x), theirs.layers(x), rtol=0, atol=1e-6)


def test_loss_matches_naive_and_detectron2():
    gen = torch.Generator().manual_seed(1)
    instances = [_random_instances(gen, 4), _random_instances(gen, 0), _random_instances(gen, 3)]
    logits = torch.randn(7, K, 8, 8, generator=gen, requires_grad=True)
    total, count = _naive_loss(logits, instances)
    assert count > 5
    loss = keypoint_loss(logits, instances)
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    assert keypoint_loss(logits, instances, normalizer=10.0).item() == pytest.approx(
        total / 10.0, rel=1e-5
    )
    assert loss.item() == pytest.approx(
        keypoint_rcnn_loss(logits, instances, None).item(), rel=1e-6
    )
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


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


def test_bfloat16_autocast_loss_and_inference():
    # The CPU trainer runs the forward under bfloat16 autocast.
    head = MRCNNKeypointHead(_cfg(), ShapeSpec(channels=4, height=14, width=14)).train()
    gen = torch.Generator().manual_seed(7)
    instances = [_random_instances(gen, 3)]
    x = torch.randn(3, 4, 14, 14, generator=gen)
    reference = head(x, instances)["loss_keypoint"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(x, instances)["loss_keypoint"]
        head.eval()
        (dets,) = head(x, _detections(gen, [3]))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference.item(), rel=0.05)
    assert dets.pred_keypoints.dtype == torch.float32 and torch.isfinite(dets.pred_keypoints).all()


def test_empty_and_invisible_give_zero_loss():
    cfg = _cfg()
    head = MRCNNKeypointHead(cfg, ShapeSpec(channels=4, height=14, width=14)).train()
    gen = torch.Generator().manual_seed(3)
    empty = [_random_instances(gen, 0), _random_instances(gen, 0)]
    loss = head(torch.zeros(0, 4, 14, 14), empty)["loss_keypoint"]
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()

    invisible = [_random_instances(gen, 3)]
    invisible[0].gt_keypoints.tensor[..., 2] = 0
    logits = torch.randn(3, K, 8, 8, requires_grad=True)
    with EventStorage():  # logs the skipped batch like detectron2
        loss = keypoint_loss(logits, invisible)
    total = loss + torch.tensor(1.5)
    assert loss.item() == 0 and torch.isfinite(total) and total.item() == 1.5
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().max() == 0


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


def test_inference_peak_location_and_score():
    # A box exactly S x S: the resized map is the map itself, so the peak cell (row 3, col 5)
    # decodes to its centre, and the score is the peak's probability in an S*S softmax.
    side = 8
    logits = torch.zeros(1, 2, side, side)
    logits[0, :, 3, 5] = 4.0
    inst = Instances((50, 50))
    inst.pred_boxes = Boxes(torch.tensor([[10.0, 20.0, 10.0 + side, 20.0 + side]]))
    keypoint_inference(logits, [inst])
    score = math.exp(4.0) / (math.exp(4.0) + side * side - 1)
    expected = torch.tensor([[10 + 5.5, 20 + 3.5, score]] * 2)
    torch.testing.assert_close(inst.pred_keypoints[0], expected)


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


# ------------------------------------------------------------------------------------------
# Configs and the full model.

# The first four have a detectron2 model-zoo config of the same name and hyperparameters.
ZOO_TWINS = [
    f"COCO-Keypoints/keypoint_rcnn_{name}.yaml"
    for name in ("R_50_FPN_1x", "R_50_FPN_3x", "R_101_FPN_3x", "X_101_32x8d_FPN_3x")
]
MY_CONFIGS = ZOO_TWINS + [
    "COCO-Keypoints/keypoint_mask_rcnn_R_50_FPN_1x.yaml",
    "COCO-Keypoints/keypoint_rcnn_R_50_C4_1x.yaml",
    "Ablations/table6_keypoint_R_50_FPN_roipool.yaml",
    "Ablations/table6_keypoint_R_50_FPN_roialign.yaml",
    "Synthetic/keypoint_rcnn_R_18_FPN_persons.yaml",
    "Synthetic/keypoint_mask_rcnn_R_18_FPN_persons.yaml",
]
# Keys where the plugin's configs differ from detectron2's by design: component names and the
# plugin's own MODEL.MRCNN node.
PLUGIN_KEYS = ("NAME", "MRCNN")


def _load(relpath):
    cfg = add_mrcnn_config(get_cfg())
    cfg.merge_from_file(os.path.join(CONFIG_DIR, relpath))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def _flatten(node, prefix=""):
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return out


@pytest.mark.parametrize("relpath", MY_CONFIGS)
def test_config_values(relpath):
    with open(os.path.join(CONFIG_DIR, relpath)) as f:
        assert f.readline().startswith("# "), "first line must say what the config reproduces"
    cfg = _load(relpath)
    assert cfg.MODEL.KEYPOINT_ON and cfg.MODEL.ROI_KEYPOINT_HEAD.NAME == "MRCNNKeypointHead"
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 1 and cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS == 17
    assert cfg.MODEL.MASK_ON == ("mask" in relpath)
    if "roipool" in relpath:
        assert cfg.MODEL.MRCNN.ROI_OP.NAME == "MRCNNRoIPool"
    if "Synthetic" in relpath:
        assert cfg.DATASETS.TRAIN == ("mrcnn_persons_train",) and not cfg.TEST.KEYPOINT_OKS_SIGMAS
    if relpath not in ZOO_TWINS:
        return
    ref = get_cfg()
    ref.merge_from_file(model_zoo.get_config_file(relpath))
    ref.MODEL.DEVICE = "cpu"
    mine, theirs = _flatten(cfg), _flatten(ref)
    diff = {
        k: (mine.get(k), theirs.get(k))
        for k in set(mine) | set(theirs)
        if mine.get(k) != theirs.get(k) and not any(p in k.split(".") for p in PLUGIN_KEYS)
    }
    assert diff == {}


@needs_roi_heads
@pytest.mark.parametrize("relpath", MY_CONFIGS)
def test_config_builds(relpath):
    cfg = _load(relpath)
    model = build_model(cfg)
    head = model.roi_heads.keypoint_head
    assert isinstance(head, MRCNNKeypointHead) and head.num_keypoints == 17
    conv_dims = [c.out_channels for c in head.convs]
    assert conv_dims == list(cfg.MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS)
    assert model.roi_heads.mask_on == cfg.MODEL.MASK_ON
    if "C4" not in relpath:  # FPN: the keypoint branch has its own 14x14 pooler
        pooler = model.roi_heads.keypoint_pooler
        assert pooler.output_size == (14, 14)
        assert type(pooler.level_poolers[0]).__name__ == cfg.MODEL.MRCNN.ROI_OP.NAME


@needs_roi_heads
@pytest.mark.parametrize(
    "relpath",
    [
        "COCO-Keypoints/keypoint_rcnn_R_50_C4_1x.yaml",
        "Synthetic/keypoint_rcnn_R_18_FPN_persons.yaml",
        "Synthetic/keypoint_mask_rcnn_R_18_FPN_persons.yaml",
    ],
)
def test_config_trains_one_step(relpath):
    cfg = _load(relpath)
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 16
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50  # the C4 head runs res5 on every test proposal
    cfg.TEST.DETECTIONS_PER_IMAGE = 10
    cfg.MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS = (32,)  # keep the CPU test small
    torch.manual_seed(0)
    model = build_model(cfg).train()
    assert isinstance(model.roi_heads.keypoint_head, MRCNNKeypointHead)
    target = Instances((64, 80))
    target.gt_boxes = Boxes(torch.tensor([[8.0, 6.0, 40.0, 60.0]]))
    target.gt_classes = torch.tensor([0])
    gen = torch.Generator().manual_seed(5)
    xy = torch.rand(1, 17, 2, generator=gen) * torch.tensor([32.0, 54.0]) + torch.tensor([8, 6])
    target.gt_keypoints = Keypoints(torch.cat([xy, torch.full((1, 17, 1), 2.0)], dim=2))
    if cfg.MODEL.MASK_ON:
        from detectron2.structures import BitMasks

        mask = torch.zeros(1, 64, 80, dtype=torch.bool)
        mask[0, 6:60, 8:40] = True
        target.gt_masks = BitMasks(mask)
    image = torch.randint(0, 255, (3, 64, 80), dtype=torch.uint8)
    with EventStorage():
        losses = model([{"image": image, "instances": target}])
    assert losses["loss_keypoint"].item() > 0  # the GT box is always a keypoint proposal
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.roi_heads.keypoint_head.conv_fcn1.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": image, "height": 64, "width": 80}])
    assert out["instances"].pred_keypoints.shape[1:] == (17, 3)


@needs_roi_heads
def test_parity_with_detectron2_keypoint_rcnn():
    cfg = add_mrcnn_config(get_cfg())
    cfg.merge_from_file(model_zoo.get_config_file("COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml"))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.TEST.DETECTIONS_PER_IMAGE = 10  # the 8 x 512 head costs 7 GFLOPs per detection
    torch.manual_seed(0)
    reference = build_model(cfg).eval()
    # A randomly initialized R50-FPN without batch norm gives features ~1e4, for which the RPN
    # keeps only a few image-sized boxes; scaled to ~1 it yields varied detections.
    with torch.no_grad():
        for name, param in reference.backbone.named_parameters():
            if name.startswith("fpn_output"):
                param.mul_(1e-3)

    cfg.MODEL.ROI_HEADS.NAME = "MRCNNStandardROIHeads"
    cfg.MODEL.ROI_KEYPOINT_HEAD.NAME = "MRCNNKeypointHead"
    cfg.MODEL.MRCNN.ROI_OP.NAME = "MRCNNRoIAlign"
    cfg.MODEL.MRCNN.ROI_OP.ALIGNED = True  # POOLER_TYPE "ROIAlignV2"
    plugin = build_model(cfg).eval()
    assert isinstance(plugin.roi_heads.keypoint_head, MRCNNKeypointHead)
    plugin.load_state_dict(reference.state_dict(), strict=True)

    gen = torch.Generator().manual_seed(6)
    image = torch.randint(0, 255, (3, 128, 160), dtype=torch.uint8, generator=gen)
    inputs = [{"image": image, "height": 128, "width": 160}]
    with torch.no_grad():
        (ref,) = reference(inputs)
        (out,) = plugin(inputs)
    ref, out = ref["instances"], out["instances"]
    assert len(out) == len(ref) == 10
    diffs = {
        "pred_boxes": (out.pred_boxes.tensor - ref.pred_boxes.tensor).abs().max().item(),
        "scores": (out.scores - ref.scores).abs().max().item(),
        "keypoint_xy": (out.pred_keypoints[..., :2] - ref.pred_keypoints[..., :2]).abs().max(),
        "keypoint_score": (out.pred_keypoints[..., 2] - ref.pred_keypoints[..., 2]).abs().max(),
        "heatmaps": (out.pred_keypoint_heatmaps - ref.pred_keypoint_heatmaps).abs().max(),
    }
    print("max abs diffs vs detectron2:", {k: float(v) for k, v in diffs.items()})
    assert torch.equal(out.pred_classes, ref.pred_classes)
    assert diffs["pred_boxes"] < 1e-4 and diffs["scores"] < 1e-6, diffs
    assert diffs["keypoint_xy"] < 1e-3 and diffs["heatmaps"] < 1e-5, diffs
    torch.testing.assert_close(
        out.pred_keypoints[..., 2], ref.pred_keypoints[..., 2], rtol=1e-4, atol=0
    )
