"""Plugin components mix with detectron2's built-in ones in both directions: each mixed model
builds from a config, trains a step and runs inference."""

import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from mrcnn_plugin.config import build_cfg

CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "Base-MRCNN-FPN.yaml")
SMALL = [
    "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "32",
    "MODEL.ROI_MASK_HEAD.CONV_DIM", "16", "MODEL.ROI_HEADS.NUM_CLASSES", "3",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "50", "MODEL.DEVICE", "cpu",
]  # fmt: skip
MIXES = {
    "plugin backbone, detectron2 heads": [
        "MODEL.BACKBONE.NAME", "MRCNNResNetFPN",
        "MODEL.ROI_HEADS.NAME", "StandardROIHeads",
        "MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead",
    ],
    "detectron2 backbone, plugin heads": [
        "MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone",
        "MODEL.ROI_HEADS.NAME", "MRCNNStandardROIHeads",
        "MODEL.ROI_MASK_HEAD.NAME", "MRCNNMaskHead",
    ],
}  # fmt: skip


def _batch():
    g = torch.Generator().manual_seed(0)
    instances = Instances((64, 64))
    instances.gt_boxes = Boxes(torch.tensor([[4.0, 6.0, 40.0, 30.0], [20.0, 20.0, 60.0, 62.0]]))
    instances.gt_classes = torch.tensor([0, 2])
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, 6:30, 4:40] = True
    masks[1, 20:62, 20:60] = True
    instances.gt_masks = BitMasks(masks)
    image = torch.randint(0, 256, (3, 64, 64), generator=g, dtype=torch.uint8)
    return [{"image": image, "height": 64, "width": 64, "instances": instances}]


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_mixed_model_trains_a_step_and_infers(mix):
    torch.manual_seed(0)
    model = build_model(build_cfg(CONFIG, SMALL + MIXES[mix]))
    names = {type(m).__name__ for m in model.modules()}
    assert any(n.startswith("MRCNN") for n in names), names
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    with EventStorage(0):
        losses = model(_batch())
    assert {"loss_cls", "loss_box_reg", "loss_mask"} <= set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    trained = [p for p in model.backbone.parameters() if p.grad is not None]
    assert trained and any(p.grad.abs().sum() > 0 for p in trained)
    optimizer.step()

    model.eval()
    with torch.no_grad():
        (output,) = model([{"image": _batch()[0]["image"], "height": 64, "width": 64}])
    instances = output["instances"]
    assert instances.image_size == (64, 64)
    assert instances.pred_masks.shape[1:] == (64, 64)
