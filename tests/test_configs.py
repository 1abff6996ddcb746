"""Every config under configs/ merges into a plugin cfg and builds a model on the CPU."""

import glob
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from mrcnn_plugin import add_mrcnn_config
from mrcnn_plugin.config import build_cfg

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
LEAF_CONFIGS = sorted(
    os.path.relpath(p, CONFIG_DIR)
    for p in glob.glob(os.path.join(CONFIG_DIR, "**", "*.yaml"), recursive=True)
    if not os.path.basename(p).startswith("Base-")
)


def load(relpath):
    cfg = build_cfg(os.path.join(CONFIG_DIR, relpath))  # the tools' safe loader
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def test_configs_were_found():
    assert len(LEAF_CONFIGS) >= 30, LEAF_CONFIGS


@pytest.mark.parametrize("relpath", LEAF_CONFIGS)
def test_config_merges_and_builds(relpath):
    cfg = load(relpath)
    for name in (cfg.MODEL.BACKBONE.NAME, cfg.MODEL.ROI_HEADS.NAME):
        assert name.startswith("MRCNN"), f"{relpath} does not use the plugin's components"
    # Seeded: an untrained keypoint head's logits can be large enough for detectron2's heatmap
    # decoding to hit 0/0 on some draws.
    torch.manual_seed(0)
    model = build_model(cfg)
    assert any(p.requires_grad for p in model.parameters())
    model.eval()
    with torch.no_grad():
        image = torch.zeros(3, 64, 64, dtype=torch.uint8)
        (output,) = model([{"image": image, "height": 64, "width": 64}])
    assert "instances" in output


@pytest.mark.parametrize(
    "relpath, expected",
    [
        ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml", {"MAX_ITER": 270000}),
        ("Paper/mask_rcnn_R_50_C4_paper.yaml", {"MAX_ITER": 160000, "ALIGNED": False}),
        ("Ablations/table2c_R_50_C4_roipool.yaml", {"ROI_OP": "MRCNNRoIPool"}),
        ("Ablations/table6_keypoint_R_50_FPN_roipool.yaml", {"ROI_OP": "MRCNNRoIPool"}),
    ],
)
def test_config_values(relpath, expected):
    cfg = load(relpath)
    got = {
        "MAX_ITER": cfg.SOLVER.MAX_ITER,
        "ALIGNED": cfg.MODEL.MRCNN.ROI_OP.ALIGNED,
        "ROI_OP": cfg.MODEL.MRCNN.ROI_OP.NAME,
    }
    assert {k: got[k] for k in expected} == expected


def test_global_defaults_untouched():
    add_mrcnn_config(get_cfg())
    assert "MRCNN" not in get_cfg().MODEL
    assert "MRCNN" not in get_cfg().DATALOADER
