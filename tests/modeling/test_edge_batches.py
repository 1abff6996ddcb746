"""Whole models on edge batches: the synthetic FPN configs (shapes masks; persons keypoints and
masks), a C4 model (keypoints and masks on the shared res5) and the plugin's own head/loss/op
options.

Training: a batch without any ground truth, a half-empty one, all-invisible keypoints and all-zero
masks keep every loss finite, give exactly zero mask/keypoint loss where nothing can supervise
them, and still reach every trainable parameter, so that DistributedDataParallel can run without
``find_unused_parameters``. Inference: NaN/Inf images or features and zero proposals give no
detections, with every output field of a normal detection.
"""

import os

import numpy as np
import pytest
import torch
from detectron2.data.detection_utils import annotations_to_instances
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, BoxMode, Instances, Keypoints
from detectron2.utils.events import EventStorage

import mrcnn_plugin.modeling  # noqa: F401  (registers the plugin's components)
from mrcnn_plugin.config import build_cfg

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs")
H, W = 64, 80
# Small enough for a CPU test; SCORE_THRESH_TEST 0 so a finite image always has detections.
SMALL = (
    "MODEL.DEVICE cpu MODEL.RPN.POST_NMS_TOPK_TRAIN 64 MODEL.RPN.POST_NMS_TOPK_TEST 32 "
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE 32 MODEL.ROI_HEADS.SCORE_THRESH_TEST 0.0 "
    "MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS (32,)"
)
MODELS = {  # name: (config file, overrides)
    "shapes": ("Synthetic/mask_rcnn_R_18_FPN_shapes.yaml", ""),
    "persons": ("Synthetic/keypoint_mask_rcnn_R_18_FPN_persons.yaml", ""),
    # Keypoints and masks on the shared res5, shrunk to R18 with a narrow res5.
    "c4": (
        "COCO-Keypoints/keypoint_rcnn_R_50_C4_1x.yaml",
        "MODEL.MASK_ON True MODEL.RESNETS.DEPTH 18 MODEL.RESNETS.RES2_OUT_CHANNELS 64 "
        "MODEL.RESNETS.WIDTH_PER_GROUP 8 MODEL.PIXEL_STD [57.0,57.0,57.0]",
    ),
    # The plugin's own options on one model: MLP mask head, "softmax" mask loss, RoIPool for the
    # box branch and RoIWarp for the mask branch.
    "options": (
        "Synthetic/mask_rcnn_R_18_FPN_shapes.yaml",
        "MODEL.ROI_MASK_HEAD.NAME MRCNNMLPMaskHead MODEL.MRCNN.MASK_MLP_DIMS [64] "
        "MODEL.MRCNN.MASK_LOSS softmax MODEL.MRCNN.ROI_OP.ALIGNED False "
        "MODEL.MRCNN.ROI_OP.BOX.NAME MRCNNRoIPool MODEL.MRCNN.ROI_OP.BOX.AGGREGATION max "
        "MODEL.MRCNN.ROI_OP.MASK.NAME MRCNNRoIWarp",
    ),
}
CASES = ("all_empty", "half_empty", "invisible_keypoints", "zero_masks")


@pytest.fixture(scope="module")
def models():
    """name -> (cfg, model), built lazily once for the module."""
    cache = {}

    def get(name):
        if name not in cache:
            relpath, opts = MODELS[name]
            cfg = build_cfg(os.path.join(CONFIG_DIR, relpath), f"{SMALL} {opts}".split())
            cfg.MODEL.WEIGHTS = ""  # random init: nothing is downloaded
            torch.manual_seed(0)
            cache[name] = (cfg, build_model(cfg))
        return cache[name]

    return get


def _objects(cfg, num, *, visibility=2.0, zero_masks=False):
    """Ground truth of ``num`` objects as detectron2's mapper makes it (annotations_to_instances),
    with bit masks and, if the model has keypoints, keypoints inside each box."""
    boxes = [[4.0, 6.0, 40.0, 50.0], [30.0, 20.0, 72.0, 60.0], [50.0, 4.0, 76.0, 30.0]][:num]
    num_kpts = cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS
    annos = []
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        mask = np.zeros((H, W), dtype=np.uint8)
        if not zero_masks:
            mask[int(y0) + 2 : int(y1) - 2, int(x0) + 2 : int(x1) - 2] = 1
        anno = {
            "bbox": [x0, y0, x1, y1],
            "bbox_mode": BoxMode.XYXY_ABS,
            "category_id": i % cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            "segmentation": mask,
        }
        if cfg.MODEL.KEYPOINT_ON:
            xs, ys = np.linspace(x0 + 2, x1 - 2, num_kpts), np.linspace(y0 + 2, y1 - 2, num_kpts)
            anno["keypoints"] = np.stack([xs, ys, np.full(num_kpts, visibility)], 1).tolist()
        annos.append(anno)
    return annotations_to_instances(annos, (H, W), mask_format="bitmask")


def _empty_with_fields(cfg):
    """An image without objects whose mask/keypoint fields exist with zero rows (the mapper's
    empty images have no such fields; both kinds reach a model)."""
    inst = _objects(cfg, 0)
    inst.gt_masks = BitMasks(torch.zeros(0, H, W, dtype=torch.bool))
    if cfg.MODEL.KEYPOINT_ON:
        inst.gt_keypoints = Keypoints(torch.zeros(0, cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS, 3))
    return inst


def _targets(cfg, case):
    """The ground truth of a two-image batch."""
    if case == "all_empty":
        return [_empty_with_fields(cfg), _objects(cfg, 0)]
    if case == "half_empty":
        return [_objects(cfg, 0), _objects(cfg, 2)]
    if case == "invisible_keypoints":
        return [_objects(cfg, 3, visibility=0.0), _objects(cfg, 1, visibility=0.0)]
    assert case == "zero_masks", case
    return [_objects(cfg, 2, zero_masks=True), _objects(cfg, 3, zero_masks=True)]


def _images(num, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(3, H, W, generator=gen) * 255 for _ in range(num)]


def _train_step(model, targets, autocast=False):
    """One forward/backward from cleared gradients; returns the losses (detached)."""
    model.train()
    model.zero_grad(set_to_none=True)
    batch = [{"image": img, "instances": t} for img, t in zip(_images(len(targets)), targets)]
    with EventStorage(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        losses = model(batch)
    total = sum(losses.values())
    assert torch.isfinite(total), losses
    total.backward()
    return {k: v.detach() for k, v in losses.items()}


def _assert_every_parameter_has_a_finite_grad(model):
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) > 0
    assert [n for n, p in trainable if p.grad is None] == []
    assert [n for n, p in trainable if not torch.isfinite(p.grad).all()] == []


# Which of the head losses can be supervised by a case: False means it must be exactly 0.
SUPERVISED = {
    "all_empty": {"loss_mask": False, "loss_keypoint": False},
    "half_empty": {"loss_mask": True, "loss_keypoint": True},
    "invisible_keypoints": {"loss_mask": True, "loss_keypoint": False},
    "zero_masks": {"loss_mask": True, "loss_keypoint": True},
}


@pytest.mark.parametrize(
    "name, case",
    [(n, c) for n in MODELS for c in CASES if c != "invisible_keypoints" or n in ("persons", "c4")],
)
def test_training_edge_batch(models, name, case):
    cfg, model = models(name)
    losses = _train_step(model, _targets(cfg, case))
    assert all(torch.isfinite(v) for v in losses.values()), losses
    expected = {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc", "loss_mask"}
    if cfg.MODEL.KEYPOINT_ON:
        expected.add("loss_keypoint")
    assert set(losses) == expected
    for key, supervised in SUPERVISED[case].items():
        if key in losses:
            if supervised:
                assert losses[key] > 0, (key, losses)
            else:
                assert losses[key].item() == 0.0, (key, losses)
    if case == "all_empty":  # nothing to regress either
        assert losses["loss_box_reg"].item() == 0.0 and losses["loss_rpn_loc"].item() == 0.0
    _assert_every_parameter_has_a_finite_grad(model)


def test_empty_batch_under_bfloat16_autocast(models):
    """The synthetic configs train under bfloat16 autocast (SOLVER.AMP.ENABLED) where the CPU
    has bfloat16 units: RoI heads without RoIs keep float32 losses and the whole graph there."""
    cfg, model = models("persons")
    assert cfg.SOLVER.AMP.ENABLED
    losses = _train_step(model, _targets(cfg, "all_empty"), autocast=True)
    for key in ("loss_mask", "loss_keypoint"):
        assert losses[key].dtype == torch.float32 and losses[key].item() == 0.0, losses
    _assert_every_parameter_has_a_finite_grad(model)


# ---------------------------------------------------------------------------------------------
# Inference


def _assert_no_detections(inst, like):
    """``inst`` has no detection but every field of ``like`` (a normal output), with the same
    per-detection shapes and dtypes."""
    assert len(like) > 0 and len(inst) == 0
    assert set(inst.get_fields()) == set(like.get_fields())
    for key, value in inst.get_fields().items():
        ref = like.get(key)
        value, ref = (value.tensor, ref.tensor) if isinstance(value, Boxes) else (value, ref)
        assert value.shape[1:] == ref.shape[1:] and value.dtype == ref.dtype, key


def _infer(model, images, size=None):
    """Postprocessed detections (at ``size`` = (height, width) if given) of ``images``."""
    extra = {} if size is None else {"height": size[0], "width": size[1]}
    model.eval()
    with torch.no_grad():
        return [o["instances"] for o in model([{"image": img, **extra} for img in images])]


def _roi_heads_on_one_proposal(model, images):
    """The ROI heads' detections (not postprocessed) given one finite proposal per image."""
    model.eval()
    with torch.no_grad():
        image_list = model.preprocess_image([{"image": img} for img in images])
        features = model.backbone(image_list.tensor)
        proposals = []
        for size in image_list.image_sizes:
            p = Instances(size)
            p.proposal_boxes = Boxes(torch.tensor([[10.0, 10.0, 40.0, 40.0]]))
            p.objectness_logits = torch.tensor([5.0])
            proposals.append(p)
        detections, _ = model.roi_heads(image_list, features, proposals)
    return detections


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_image_gives_no_detections(models, name, value):
    """A NaN/Inf image next to a normal one: the RPN drops its non-finite proposals, so it gets
    no detections (and the normal image its usual ones)."""
    _, model = models(name)
    bad, good = torch.full((3, H, W), value), _images(1)[0]
    out = _infer(model, [bad, good])
    _assert_no_detections(out[0], out[1])


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_features_give_no_detections(models, name, value):
    """Backbone features replaced by NaN/Inf: no detections through the whole model, and none
    from the ROI heads alone given a finite proposal (their box predictions are non-finite)."""
    _, model = models(name)
    images = _images(2)
    normal, normal_heads = _infer(model, images), _roi_heads_on_one_proposal(model, images)

    def poison(module, args, output):
        return {k: torch.full_like(v, value) for k, v in output.items()}

    handle = model.backbone.register_forward_hook(poison)
    try:
        out, heads = _infer(model, images), _roi_heads_on_one_proposal(model, images)
    finally:
        handle.remove()
    for inst, like in zip(out + heads, normal + normal_heads):
        _assert_no_detections(inst, like)


@pytest.mark.parametrize("name", MODELS)
def test_zero_proposals_give_no_detections(models, name):
    """An RPN that proposes nothing: the ROI heads and postprocessing return empty Instances
    with all fields (masks pasted at the requested output size)."""
    _, model = models(name)
    images, size = _images(2), (32, 40)
    normal = _infer(model, images, size)

    def propose_nothing(module, args, output):
        proposals, losses = output
        empty = []
        for p in proposals:
            e = Instances(p.image_size)
            e.proposal_boxes = Boxes(torch.zeros(0, 4))
            e.objectness_logits = torch.zeros(0)
            empty.append(e)
        return empty, losses

    handle = model.proposal_generator.register_forward_hook(propose_nothing)
    try:
        out = _infer(model, images, size)
    finally:
        handle.remove()
    for inst, like in zip(out, normal):
        assert inst.image_size == size
        _assert_no_detections(inst, like)
        if inst.has("pred_masks"):
            assert inst.pred_masks.shape == (0, *size)
