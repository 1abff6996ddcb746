"""The keypoint configs and whole keypoint models: config values against detectron2's model
zoo, building, one training step (FPN and C4, whose keypoint head runs on res5 features) and
parity with detectron2's built-in Keypoint R-CNN on the same weights."""

import os

import pytest
import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances, Keypoints
from detectron2.utils.events import EventStorage

import mrcnn_plugin.modeling  # noqa: F401  (registers the plugin's components)
from mrcnn_plugin.config import add_mrcnn_config
from mrcnn_plugin.modeling.roi_heads.keypoint_head import MRCNNKeypointHead

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs")

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


@pytest.mark.parametrize("relpath", MY_CONFIGS)
def test_config_builds(relpath):
    cfg = _load(relpath)
    model = build_model(cfg)
    head = model.roi_heads.keypoint_head
    assert isinstance(head, MRCNNKeypointHead) and head.num_keypoints == 17
    conv_dims = [m.out_channels for m in head if type(m).__name__ == "Conv2d"]
    assert conv_dims == list(cfg.MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS)
    assert model.roi_heads.mask_on == cfg.MODEL.MASK_ON
    if "C4" not in relpath:  # FPN: the keypoint branch has its own 14x14 pooler
        pooler = model.roi_heads.keypoint_pooler
        assert pooler.output_size == (14, 14)
        assert type(pooler.level_poolers[0]).__name__ == cfg.MODEL.MRCNN.ROI_OP.NAME


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
