"""load_checkpoint: .pth, Detectron2-naming .pkl and Caffe2/Detectron1-naming .pkl files load
exactly; fine-tuning skips (and reports) only the predictor layers; anything else that does
not fit raises and names the keys."""

import os
import pickle
import re

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from mrcnn_plugin.checkpoint import (
    CheckpointMismatchError,
    UnsafeCheckpointError,
    is_predictor_key,
    load_checkpoint,
)
from mrcnn_plugin.config import build_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "Synthetic", "mask_rcnn_R_18_FPN_shapes.yaml")

# A tiny R18-FPN Mask R-CNN in the Caffe2 model zoo's style: FrozenBN, no norm in the heads.
TINY_OPTS = [
    "MODEL.RESNETS.NORM", "FrozenBN",
    "MODEL.FPN.NORM", "",
    "MODEL.FPN.OUT_CHANNELS", "32",
    "MODEL.ROI_BOX_HEAD.NORM", "",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "32",
    "MODEL.ROI_MASK_HEAD.NORM", "",
    "MODEL.ROI_MASK_HEAD.CONV_DIM", "16",
    "MODEL.ROI_MASK_HEAD.NUM_CONV", "2",
    "MODEL.DEVICE", "cpu",
]  # fmt: skip

PREDICTOR_KEYS = {
    f"roi_heads.{layer}.{p}"
    for layer in ("box_predictor.cls_score", "box_predictor.bbox_pred", "mask_head.predictor")
    for p in ("weight", "bias")
}


def build(num_classes=3, seed=0, opts=()):
    """The tiny model with random values in every stored tensor (FrozenBN's affine buffers
    too), so that a tensor that is not loaded cannot equal the source's by chance."""
    cfg = build_cfg(CONFIG, TINY_OPTS + ["MODEL.ROI_HEADS.NUM_CLASSES", str(num_classes), *opts])
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if value.is_floating_point() and "running_" not in key and "pixel_" not in key:
                value.normal_()
    return model


def running_stats(model):
    """FrozenBN statistics: not in Caffe2 files (Detectron1 folds them into scale and bias)."""
    return {k for k in model.state_dict() if "running_" in k}


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_equal_except(loaded, source, skip=()):
    for key, value in loaded.items():
        if key not in skip:
            assert torch.equal(value, source[key]), key


def save_pth(model, folder):
    DetectionCheckpointer(model, save_dir=str(folder)).save("model")
    return str(folder / "model.pth")


def save_pkl(obj, path):
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    return str(path)


# Detectron2 name -> Caffe2 Detectron blob name: the inverse of detectron2's
# convert_c2_detectron_names for the layers of this model.
_W = {"weight": "w", "bias": "b"}
_BN = {"weight": "s", "bias": "b"}
_BRANCH = {"conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c", "shortcut": "branch1"}
_RPN = {"conv": "conv_rpn", "objectness_logits": "rpn_cls_logits", "anchor_deltas": "rpn_bbox_pred"}
_C2_RULES = [
    (r"backbone\.bottom_up\.stem\.conv1\.weight", lambda m: "conv1_w"),
    (r"backbone\.bottom_up\.stem\.conv1\.norm\.(\w+)", lambda m: f"res_conv1_bn_{_BN[m[1]]}"),
    (
        r"backbone\.bottom_up\.res(\d)\.(\d+)\.(\w+)\.weight",
        lambda m: f"res{m[1]}_{m[2]}_{_BRANCH[m[3]]}_w",
    ),
    (
        r"backbone\.bottom_up\.res(\d)\.(\d+)\.(\w+)\.norm\.(\w+)",
        lambda m: f"res{m[1]}_{m[2]}_{_BRANCH[m[3]]}_bn_{_BN[m[4]]}",
    ),
    (  # the top level has no lateral branch name in Detectron1
        r"backbone\.fpn_lateral(\d)\.(\w+)",
        lambda m: f"fpn_inner_res{m[1]}_2_sum{'' if m[1] == '5' else '_lateral'}_{_W[m[2]]}",
    ),
    (r"backbone\.fpn_output(\d)\.(\w+)", lambda m: f"fpn_res{m[1]}_2_sum_{_W[m[2]]}"),
    (r"proposal_generator\.rpn_head\.(\w+)\.(\w+)", lambda m: f"{_RPN[m[1]]}_fpn2_{_W[m[2]]}"),
    (r"roi_heads\.box_head\.fc(\d)\.(\w+)", lambda m: f"fc{int(m[1]) + 5}_{_W[m[2]]}"),
    (r"roi_heads\.box_predictor\.(\w+)\.(\w+)", lambda m: f"{m[1]}_{_W[m[2]]}"),
    (r"roi_heads\.mask_head\.mask_fcn(\d)\.(\w+)", lambda m: f"_[mask]_fcn{m[1]}_{_W[m[2]]}"),
    (r"roi_heads\.mask_head\.deconv\.(\w+)", lambda m: f"conv5_mask_{_W[m[1]]}"),
    (r"roi_heads\.mask_head\.predictor\.(\w+)", lambda m: f"mask_fcn_logits_{_W[m[1]]}"),
]


def c2_blobs(model):
    """The model's weights as a Detectron1 model-zoo file would hold them: Caffe2 names, the
    background class first in cls_score and present in bbox_pred / the mask predictor, and no
    FrozenBN running statistics (Detectron1 folds them into scale and bias)."""
    blobs = {}
    for key, value in model.state_dict().items():
        if "running_" in key or "pixel_" in key:
            continue
        name = next(rule(m) for pattern, rule in _C2_RULES if (m := re.fullmatch(pattern, key)))
        if name.startswith("cls_score"):
            value = torch.cat([value[-1:], value[:-1]])  # background: last -> first
        elif name.startswith("bbox_pred"):
            value = torch.cat([torch.zeros_like(value[:4]), value])
        elif name.startswith("mask_fcn_logits"):
            value = torch.cat([torch.zeros_like(value[:1]), value])
        blobs[name] = value.numpy()
    blobs["conv1_w_momentum"] = blobs["conv1_w"] * 0  # solver state: ignored by detectron2
    return blobs


def test_pth_and_detectron2_pkl_load_exactly(tmp_path):
    source = build(seed=1)
    expected = state(source)
    pkl = save_pkl(
        {
            "model": {k: v.numpy() for k, v in expected.items()},
            "__author__": "Detectron2 Model Zoo",
            "matching_heuristics": True,
        },
        tmp_path / "d2.pkl",
    )
    for path in (save_pth(source, tmp_path), pkl):
        target = build(seed=2)
        assert not torch.equal(target.state_dict()["roi_heads.box_head.fc1.weight"],
                               expected["roi_heads.box_head.fc1.weight"])  # fmt: skip
        assert load_checkpoint(target, path) == []
        assert_equal_except(state(target), expected)


def test_caffe2_detectron1_pkl_loads_exactly(tmp_path):
    source = build(seed=1)
    blobs = c2_blobs(source)
    for name in ("conv1_w", "res_conv1_bn_s", "res2_0_branch2a_w", "fpn_inner_res5_2_sum_w",
                 "fpn_inner_res2_2_sum_lateral_w", "cls_score_w", "mask_fcn_logits_w"):  # fmt: skip
        assert name in blobs
    assert len(blobs) == 1 + sum(
        "running_" not in k and "pixel_" not in k for k in source.state_dict()
    )
    path = save_pkl({"blobs": blobs}, tmp_path / "c2.pkl")
    target = build(seed=2)
    assert load_checkpoint(target, path) == []
    loaded = state(target)
    assert_equal_except(loaded, state(source), skip=running_stats(source))
    for key in running_stats(source):  # FrozenBN's statistics of a Detectron1 file: mean 0, var 1
        assert torch.equal(loaded[key], torch.full_like(loaded[key], float(key.endswith("var"))))


@pytest.mark.parametrize("fmt", ["pth", "caffe2"])
def test_finetune_skips_only_predictor_layers(tmp_path, fmt):
    source = build(num_classes=3, seed=1)
    if fmt == "pth":
        path = save_pth(source, tmp_path)
    else:
        path = save_pkl({"blobs": c2_blobs(source)}, tmp_path / "c2.pkl")

    target = build(num_classes=5, seed=2)
    initial = state(target)
    skipped = load_checkpoint(target, path, allow_head_mismatch=True)
    assert {s.key for s in skipped} == PREDICTOR_KEYS
    shapes = {s.key: (s.checkpoint_shape, s.model_shape) for s in skipped}
    assert shapes["roi_heads.box_predictor.cls_score.weight"] == ((4, 32), (6, 32))
    assert shapes["roi_heads.box_predictor.bbox_pred.bias"] == ((12,), (20,))
    assert shapes["roi_heads.mask_head.predictor.weight"] == ((3, 16, 1, 1), (5, 16, 1, 1))
    loaded = state(target)
    not_in_file = running_stats(source) if fmt == "caffe2" else set()
    assert_equal_except(loaded, state(source), skip=PREDICTOR_KEYS | not_in_file)
    for key in PREDICTOR_KEYS:  # left at their fresh initialisation
        assert torch.equal(loaded[key], initial[key])

    # Without allow_head_mismatch the same file is refused, naming the keys and the file.
    with pytest.raises(CheckpointMismatchError) as error:
        load_checkpoint(build(num_classes=5, seed=3), path)
    message = str(error.value)
    assert path in message
    for key in PREDICTOR_KEYS:
        assert key in message
    assert "allow_head_mismatch" in message


def test_backbone_shape_mismatch_raises_even_for_finetuning(tmp_path):
    source = build(seed=1, opts=["MODEL.FPN.OUT_CHANNELS", "64"])
    pth = save_pth(source, tmp_path)
    c2 = save_pkl({"blobs": c2_blobs(source)}, tmp_path / "c2.pkl")
    for path in (pth, c2):
        with pytest.raises(CheckpointMismatchError) as error:
            load_checkpoint(build(seed=2), path, allow_head_mismatch=True)
        message = str(error.value)
        assert re.search(r"shape mismatch: backbone\.fpn_lateral2\.weight is \(64, 64, 1, 1\)"
                         r" in the checkpoint but \(32, 64, 1, 1\)", message), message  # fmt: skip
        assert "proposal_generator.rpn_head.conv.weight" in message


def test_missing_and_unexpected_keys_raise(tmp_path):
    weights = state(build(seed=1))
    weights = {k: v for k, v in weights.items() if not k.startswith("roi_heads.mask_head.")}
    weights["roi_heads.extra_head.weight"] = torch.zeros(3)
    path = str(tmp_path / "partial.pth")
    torch.save({"model": weights}, path)
    with pytest.raises(CheckpointMismatchError) as error:
        load_checkpoint(build(seed=2), path, allow_head_mismatch=True)
    message = str(error.value)
    assert "missing from the checkpoint: roi_heads.mask_head.deconv.weight" in message
    assert "missing from the checkpoint: roi_heads.mask_head.predictor.weight" in message
    assert "not in the model: roi_heads.extra_head.weight" in message
    assert "backbone." not in message  # only the keys that do not fit are named

    with pytest.raises(FileNotFoundError):
        load_checkpoint(build(seed=2), str(tmp_path / "absent.pth"))


def test_is_predictor_key():
    assert is_predictor_key("roi_heads.keypoint_head.score_lowres.weight")
    assert is_predictor_key("roi_heads.box_predictor.cls_score.bias")
    assert not is_predictor_key("roi_heads.box_head.fc1.weight")
    assert not is_predictor_key("roi_heads.mask_head.deconv.weight")


class _RunsCode:
    """Unpickling this runs a shell command: what a malicious .pkl checkpoint would do."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_pkl_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "marker"
    blobs = c2_blobs(build(seed=1))
    blobs["conv1_w_momentum"] = _RunsCode(f"touch {marker}")
    path = save_pkl({"blobs": blobs}, tmp_path / "evil.pkl")
    with pytest.raises(UnsafeCheckpointError) as error:
        load_checkpoint(build(seed=2), path)
    message = str(error.value)
    assert path in message and f"{os.system.__module__}.system" in message, message
    assert not marker.exists()
