"""Model-zoo parity of whole models: the plugin's config of a model-zoo name (plugin backbone
and heads) loads the state_dict of detectron2's built-in model of the same model-zoo config
with no missing or unexpected keys, and gives the same boxes, scores, classes and masks.
For R50-FPN and R50-C4 the weights also go through a model-zoo-format .pkl and
detectron2's DetectionCheckpointer."""

import os
import pickle

import pytest
import torch
from detectron2 import model_zoo
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from test_roi_heads import _redraw_predictors

from mrcnn_plugin.config import build_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# config name: (pixel std keeping random activations O(1), proposals, detections, via .pkl)
CASES = {
    "mask_rcnn_R_50_FPN_3x": (1000.0, 200, 30, True),
    "mask_rcnn_R_50_C4_3x": (300.0, 32, 16, True),
    "mask_rcnn_R_50_DC5_3x": (300.0, 32, 16, False),
    "mask_rcnn_X_101_32x8d_FPN_3x": (1000.0, 100, 20, False),
}


def _settings(cfg, pixel_std, proposals, detections):
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.PIXEL_STD = [pixel_std] * 3
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = proposals
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.TEST.DETECTIONS_PER_IMAGE = detections
    return cfg


def _write_model_zoo_pkl(model, path):
    weights = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    with open(path, "wb") as f:
        pickle.dump({"model": weights, "__author__": "Detectron2 Model Zoo"}, f)


@pytest.mark.parametrize("name", sorted(CASES))
def test_plugin_model_matches_builtin_model(name, tmp_path):
    pixel_std, proposals, detections, via_pkl = CASES[name]
    relpath = f"COCO-InstanceSegmentation/{name}.yaml"
    zoo_cfg = build_cfg(model_zoo.get_config_file(relpath))
    plugin_cfg = build_cfg(os.path.join(ROOT, "configs", relpath))
    assert plugin_cfg.MODEL.BACKBONE.NAME.startswith("MRCNN")
    assert plugin_cfg.MODEL.ROI_HEADS.NAME.startswith("MRCNN")
    g = torch.Generator().manual_seed(1)
    inputs = [{"image": torch.rand(3, 128, 160, generator=g) * 255, "height": 128, "width": 160}]

    torch.manual_seed(0)
    theirs = build_model(_settings(zoo_cfg, pixel_std, proposals, detections)).eval()
    _redraw_predictors(theirs, inputs)
    ours = build_model(_settings(plugin_cfg, pixel_std, proposals, detections)).eval()
    assert set(ours.state_dict()) == set(theirs.state_dict())
    if via_pkl:
        path = str(tmp_path / "model_final.pkl")
        _write_model_zoo_pkl(theirs, path)
        DetectionCheckpointer(ours).load(path)
    else:
        ours.load_state_dict(theirs.state_dict(), strict=True)
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key

    with torch.no_grad():
        a = theirs(inputs)[0]["instances"]
        b = ours(inputs)[0]["instances"]
    assert len(a) == len(b) == detections
    assert a.pred_classes.unique().numel() > 1 and a.scores.std() > 0.01  # a non-trivial case
    assert torch.equal(a.pred_classes, b.pred_classes)
    assert torch.allclose(a.pred_boxes.tensor, b.pred_boxes.tensor, atol=1e-4)
    assert torch.allclose(a.scores, b.scores, atol=1e-6)
    assert torch.equal(a.pred_masks, b.pred_masks)
