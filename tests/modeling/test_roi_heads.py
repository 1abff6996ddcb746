"""The plugin's ROI heads: detectron2 compatibility (names, outputs), training and inference.

Models use detectron2's own backbones ("build_resnet_backbone" / "build_resnet_fpn_backbone")
with the plugin's ROI heads and mask head. Tiny R18 models for behaviour; R50 model-zoo
architectures (small image, fewer proposals) for output parity with detectron2's heads.
"""

import pytest
import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.modeling import ROI_HEADS_REGISTRY, build_model, detector_postprocess
from detectron2.structures import BitMasks, Boxes, Instances, Keypoints
from detectron2.utils.events import EventStorage

from mrcnn_plugin.config import add_mrcnn_config
from mrcnn_plugin.layers import MRCNNRoIAlign
from mrcnn_plugin.modeling.poolers import MultiLevelRoIPooler
from mrcnn_plugin.modeling.roi_heads import (
    MRCNNMaskHead,
    MRCNNRes5ROIHeads,
    MRCNNStandardROIHeads,
)

PLUGIN_HEADS = {"FPN": "MRCNNStandardROIHeads", "C4": "MRCNNRes5ROIHeads"}
IMAGE = 64
NUM_KEYPOINTS = 3


def _zoo_cfg(arch):
    cfg = add_mrcnn_config(get_cfg())
    name = f"COCO-InstanceSegmentation/mask_rcnn_R_50_{arch}_3x.yaml"
    cfg.merge_from_file(model_zoo.get_config_file(name))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return cfg


def _use_plugin(cfg, arch):
    cfg = cfg.clone()
    cfg.MODEL.ROI_HEADS.NAME = PLUGIN_HEADS[arch]
    cfg.MODEL.ROI_MASK_HEAD.NAME = "MRCNNMaskHead"
    return cfg


def _tiny_cfg(arch, keypoints=False):
    """detectron2's zoo architecture shrunk to R18 with narrow heads (detectron2 names)."""
    cfg = _zoo_cfg(arch)
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 8  # narrow res5 bottleneck in the C4 head
    cfg.MODEL.PIXEL_STD = [100.0] * 3  # keeps random-init activations O(1)
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 64
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 32
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 32
    if keypoints:
        cfg.MODEL.KEYPOINT_ON = True
        cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS = NUM_KEYPOINTS
        cfg.MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS = (16, 16)
    return cfg


def _batch(keypoints=False, with_gt=(True, False)):
    """Images of IMAGE x IMAGE; the ones flagged in ``with_gt`` hold two objects."""
    g = torch.Generator().manual_seed(0)
    batch = []
    for has_gt in with_gt:
        inst = Instances((IMAGE, IMAGE))
        boxes = [[4.0, 6.0, 40.0, 44.0], [30.0, 20.0, 60.0, 58.0]] if has_gt else []
        inst.gt_boxes = Boxes(torch.tensor(boxes).reshape(-1, 4))
        inst.gt_classes = torch.tensor([1, 2][: len(boxes)], dtype=torch.int64)
        masks = torch.zeros(len(boxes), IMAGE, IMAGE, dtype=torch.bool)
        for m, (x0, y0, x1, y1) in zip(masks, boxes):
            m[int(y0) + 3 : int(y1) - 2, int(x0) + 2 : int(x1) - 5] = True
        inst.gt_masks = BitMasks(masks)
        if keypoints:
            kpts = torch.zeros(len(boxes), NUM_KEYPOINTS, 3)
            for k, (x0, y0, x1, y1) in enumerate(boxes):
                kpts[k, :, 0] = torch.linspace(x0 + 3, x1 - 3, NUM_KEYPOINTS)
                kpts[k, :, 1] = torch.linspace(y0 + 3, y1 - 3, NUM_KEYPOINTS)
                kpts[k, :, 2] = 2
            inst.gt_keypoints = Keypoints(kpts)
        image = torch.rand(3, IMAGE, IMAGE, generator=g) * 255
        batch.append({"image": image, "instances": inst, "height": IMAGE, "width": IMAGE})
    return batch


def _record_inputs(module):
    """Records (number of RoIs, instances) of every call of ``module``."""
    calls = []

    def hook(mod, args):
        calls.append((args[0].shape[0], args[1]))

    module.register_forward_pre_hook(hook)
    return calls


def test_registered():
    assert ROI_HEADS_REGISTRY.get("MRCNNStandardROIHeads") is MRCNNStandardROIHeads
    assert ROI_HEADS_REGISTRY.get("MRCNNRes5ROIHeads") is MRCNNRes5ROIHeads


@pytest.mark.parametrize("arch, keypoints", [("FPN", False), ("FPN", True), ("C4", False)])
def test_state_dict_equals_detectron2(arch, keypoints):
    """Same parameter names and shapes as detectron2's StandardROIHeads / Res5ROIHeads."""
    cfg = _tiny_cfg(arch, keypoints)
    theirs = build_model(cfg).state_dict()
    ours_model = build_model(_use_plugin(cfg, arch))
    ours = ours_model.state_dict()
    assert sorted(ours) == sorted(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert any(k.startswith("roi_heads.mask_head.deconv") for k in ours)
    if arch == "C4":
        assert "roi_heads.res5.2.conv3.weight" in ours
    else:
        assert "roi_heads.box_head.fc2.weight" in ours
    ours_model.load_state_dict(theirs, strict=True)


def test_fpn_poolers_and_roi_op_from_config():
    cfg = _use_plugin(_tiny_cfg("FPN", keypoints=True), "FPN")
    heads = build_model(cfg).roi_heads
    assert isinstance(heads.mask_head, MRCNNMaskHead)
    poolers = {"box": (heads.box_pooler, 7), "mask": (heads.mask_pooler, 14)}
    poolers["keypoint"] = (heads.keypoint_pooler, 14)
    for pooler, side in poolers.values():
        assert isinstance(pooler, MultiLevelRoIPooler)
        assert pooler.output_size == (side, side)
        assert (pooler.min_level, pooler.max_level) == (2, 5)
        assert all(isinstance(op, MRCNNRoIAlign) for op in pooler.level_poolers)
    # The op comes from MODEL.MRCNN.ROI_OP and its per-branch overrides, not from POOLER_TYPE.
    cfg.MODEL.MRCNN.ROI_OP.NAME = "MRCNNRoIPool"
    cfg.MODEL.MRCNN.ROI_OP.ALIGNED = False
    cfg.MODEL.MRCNN.ROI_OP.AGGREGATION = "max"
    cfg.MODEL.MRCNN.ROI_OP.MASK.NAME = "MRCNNRoIWarp"
    heads = build_model(cfg).roi_heads
    ops = {
        "box": heads.box_pooler.level_poolers,
        "mask": heads.mask_pooler.level_poolers,
        "keypoint": heads.keypoint_pooler.level_poolers,
    }
    assert {branch: {type(op).__name__ for op in o} for branch, o in ops.items()} == {
        "box": {"MRCNNRoIPool"},
        "mask": {"MRCNNRoIWarp"},
        "keypoint": {"MRCNNRoIPool"},
    }


def test_c4_pools_once_so_rejects_mask_and_keypoint_op_overrides():
    cfg = _use_plugin(_tiny_cfg("C4"), "C4")
    cfg.MODEL.MRCNN.ROI_OP.BOX.AGGREGATION = "max"
    heads = build_model(cfg).roi_heads
    assert heads.pooler.level_poolers[0].aggregation == "max"
    cfg.MODEL.MRCNN.ROI_OP.MASK.NAME = "MRCNNRoIWarp"
    with pytest.raises(ValueError, match="ROI_OP.MASK"):
        build_model(cfg)


def test_c4_paper_variant():
    """Paper Fig. 4: 7x7 RoIs into a stride-1 res5 -> 7x7 features, 14x14 masks; the
    parameters are those of detectron2's design, so the same checkpoints load."""
    default = build_model(_use_plugin(_tiny_cfg("C4"), "C4"))
    cfg = _use_plugin(_tiny_cfg("C4"), "C4")
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    cfg.MODEL.MRCNN.RES5_FIRST_STRIDE = 1
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    model = build_model(cfg)
    heads = model.roi_heads
    assert isinstance(heads.pooler, MultiLevelRoIPooler) and heads.pooler.output_size == (7, 7)
    assert heads.res5[0].conv1.stride == (1, 1) and heads.res5[0].shortcut.stride == (1, 1)
    model.load_state_dict(default.state_dict(), strict=True)

    mask_calls = _record_inputs(heads.mask_head)
    model.eval()
    with torch.no_grad():
        out = model.inference(_batch(), do_postprocess=False)
    assert len(out[0]) > 0 and out[0].pred_masks.shape[1:] == (1, 14, 14)
    num_rois, _ = mask_calls[0]
    assert num_rois == len(out[0]) + len(out[1])


@pytest.mark.parametrize("arch", ["FPN", "C4"])
@pytest.mark.parametrize(
    "mask_head, loss_type",
    [("MRCNNMaskHead", "sigmoid"), ("MRCNNMaskHead", "softmax"), ("MaskRCNNConvUpsampleHead", "")],
)
def test_train_step(arch, mask_head, loss_type):
    """One step on a half-empty batch: finite losses, gradients, masks on foreground only."""
    cfg = _use_plugin(_tiny_cfg(arch), arch)
    cfg.MODEL.ROI_MASK_HEAD.NAME = mask_head
    if loss_type:
        cfg.MODEL.MRCNN.MASK_LOSS = loss_type
    torch.manual_seed(0)
    model = build_model(cfg)
    if loss_type:
        assert model.roi_heads.mask_head.loss_type == loss_type
    mask_calls = _record_inputs(model.roi_heads.mask_head)
    model.train()
    with EventStorage() as storage:
        losses = model(_batch())
        num_fg = storage.latest()["roi_head/num_fg_samples"][0] * 2  # mean over 2 images
        assert "mask_rcnn/accuracy" in storage.latest()
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"}
    assert all(torch.isfinite(v) for v in losses.values()), losses
    assert losses["loss_mask"] > 0
    sum(losses.values()).backward()
    for param in (
        model.roi_heads.mask_head.predictor.weight,
        model.roi_heads.box_predictor.cls_score.weight,
    ):
        assert param.grad is not None and torch.isfinite(param.grad).all()
        assert param.grad.abs().sum() > 0

    ((num_rois, instances),) = mask_calls
    assert num_rois == sum(len(i) for i in instances) == num_fg > 0
    assert len(instances[1]) == 0  # the image without objects has no foreground
    assert (instances[0].gt_classes < cfg.MODEL.ROI_HEADS.NUM_CLASSES).all()


@pytest.mark.parametrize("arch", ["FPN", "C4"])
def test_no_ground_truth_gives_zero_mask_loss(arch):
    model = build_model(_use_plugin(_tiny_cfg(arch), arch))
    model.train()
    with EventStorage():
        losses = model(_batch(with_gt=(False, False)))
    assert losses["loss_mask"].item() == 0.0
    assert torch.isfinite(sum(losses.values()))


@pytest.mark.parametrize("arch", ["FPN", "C4"])
def test_inference_masks_on_top_detections(arch):
    cfg = _use_plugin(_tiny_cfg(arch), arch)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.TEST.DETECTIONS_PER_IMAGE = 5
    model = build_model(cfg).eval()
    mask_calls = _record_inputs(model.roi_heads.mask_head)
    with torch.no_grad():
        out = model(_batch())
    dets = [o["instances"] for o in out]
    assert [len(d) for d in dets] == [5, 5]
    ((num_rois, _),) = mask_calls
    assert num_rois == 10  # the mask branch runs on the detections only
    for d in dets:
        assert d.pred_masks.shape == (5, IMAGE, IMAGE) and d.pred_masks.dtype == torch.bool
        assert d.has("pred_boxes") and d.has("scores") and d.has("pred_classes")


@pytest.mark.parametrize("arch", ["FPN", "C4"])
def test_keypoint_branch(arch):
    cfg = _use_plugin(_tiny_cfg(arch, keypoints=True), arch)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    model = build_model(cfg)
    kpt_calls = _record_inputs(model.roi_heads.keypoint_head)
    with EventStorage():
        losses = model(_batch(keypoints=True))
    assert torch.isfinite(losses["loss_keypoint"]) and losses["loss_keypoint"] > 0
    num_rois, instances = kpt_calls[0]
    assert num_rois == sum(len(i) for i in instances) > 0
    assert all(i.has("gt_keypoints") for i in instances if len(i))
    model.eval()
    with torch.no_grad():
        dets = model(_batch(keypoints=True))[0]["instances"]
    assert len(dets) > 0 and dets.pred_keypoints.shape == (len(dets), NUM_KEYPOINTS, 3)
    assert dets.pred_masks.shape[1:] == (IMAGE, IMAGE)


# ---------------------------------------------------------------------------------------------
# Parity with detectron2's built-in heads on the model-zoo R50 architectures.

PARITY_SETTINGS = {
    # arch: (pixel std keeping random activations O(1), proposals, detections)
    "FPN": (1000.0, 200, 30),
    "C4": (300.0, 32, 16),
}


def _redraw_predictors(model, inputs):
    """Random-init predictors give near-uniform scores, unmoved boxes and 0.5 masks, where a
    wrong pooler would hardly show. Redraw them so logits / deltas have a useful spread."""
    heads = model.roi_heads
    layers = {
        "cls": (heads.box_predictor.cls_score, 2.0),
        "box": (heads.box_predictor.bbox_pred, 0.3),
        "mask": (heads.mask_head.predictor, 2.0),
    }
    input_rms = {}

    def record(name):
        def hook(module, args, output):
            input_rms[name] = args[0].pow(2).mean().sqrt().item()

        return hook

    hooks = [layer.register_forward_hook(record(n)) for n, (layer, _) in layers.items()]
    with torch.no_grad():
        model.inference(inputs, do_postprocess=False)
    for h in hooks:
        h.remove()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, (layer, target_std) in layers.items():
            w = layer.weight
            scale = target_std / (input_rms[name] * w[0].numel() ** 0.5)
            w.copy_(torch.randn(w.shape, generator=g) * scale)


@pytest.mark.parametrize("arch", ["FPN", "C4"])
def test_parity_with_detectron2(arch):
    pixel_std, proposals, detections = PARITY_SETTINGS[arch]
    cfg = _zoo_cfg(arch)
    cfg.MODEL.PIXEL_STD = [pixel_std] * 3
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = proposals
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.TEST.DETECTIONS_PER_IMAGE = detections
    g = torch.Generator().manual_seed(1)
    inputs = [{"image": torch.rand(3, 128, 160, generator=g) * 255, "height": 128, "width": 160}]

    torch.manual_seed(0)
    theirs = build_model(cfg).eval()
    _redraw_predictors(theirs, inputs)
    ours = build_model(_use_plugin(cfg, arch)).eval()
    assert type(ours.roi_heads).__name__ == PLUGIN_HEADS[arch]
    incompatible = ours.load_state_dict(theirs.state_dict(), strict=False)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys, incompatible

    with torch.no_grad():
        a = theirs.inference(inputs, do_postprocess=False)[0]
        b = ours.inference(inputs, do_postprocess=False)[0]
    assert len(a) == len(b) == detections
    assert a.pred_classes.unique().numel() > 1 and a.scores.std() > 0.01  # a non-trivial case
    assert 0.1 < a.pred_masks.std()
    diffs = {
        "boxes": (a.pred_boxes.tensor - b.pred_boxes.tensor).abs().max().item(),
        "scores": (a.scores - b.scores).abs().max().item(),
        "soft masks": (a.pred_masks - b.pred_masks).abs().max().item(),
    }
    pasted_a = detector_postprocess(a, 128, 160).pred_masks
    pasted_b = detector_postprocess(b, 128, 160).pred_masks
    diffs["binary mask pixels differing"] = (pasted_a != pasted_b).sum().item()
    print(f"{arch} parity, {len(a)} detections, max abs diffs: {diffs}")
    assert torch.equal(a.pred_classes, b.pred_classes)
    assert diffs["boxes"] <= 1e-4 and diffs["scores"] <= 1e-6 and diffs["soft masks"] <= 1e-6
    assert diffs["binary mask pixels differing"] == 0
