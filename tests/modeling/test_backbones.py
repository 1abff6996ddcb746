"""The plugin's backbones against detectron2's built-in ones (same cfg, same weights), and the
plugin's own part: the C4 head's res5 stage with a first stride of 1 or 2.

Reference models are built through ``build_backbone`` with detectron2's registered names, their
weights and norm statistics randomised and loaded strictly into the plugin's model; then every
output must agree.
"""

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import build_backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock, ResNet
from torch import nn

from mrcnn_plugin.config import add_mrcnn_config
from mrcnn_plugin.modeling.backbone import (
    MRCNNResNet,
    MRCNNResNetFPN,
    make_res5_stage,
    res5_stage_kwargs_from_config,
)

ALL_RES = ["res2", "res3", "res4", "res5"]


def _cfg(fpn=False, freeze_at=2, fpn_norm="", fuse_type="sum", **resnets):
    """detectron2's default cfg with ``MODEL.RESNETS`` overrides (and an FPN over res2..res5)."""
    cfg = get_cfg()
    for key, value in resnets.items():
        setattr(cfg.MODEL.RESNETS, key, value)
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    if fpn:
        cfg.MODEL.RESNETS.OUT_FEATURES = ALL_RES
        cfg.MODEL.FPN.IN_FEATURES = ALL_RES
        cfg.MODEL.FPN.NORM = fpn_norm
        cfg.MODEL.FPN.FUSE_TYPE = fuse_type
    return cfg


def _randomize_(model, seed=0):
    """Random weights and norm statistics, so that a mismatch in any layer shows up."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            state[name] = t
        elif name.endswith("running_var"):
            state[name] = torch.rand(t.shape, generator=gen) + 0.5
        elif ".norm." in name:  # affine and running mean: keep activations in a sane range
            offset = 0.2 if "weight" in name else -0.2
            state[name] = torch.rand(t.shape, generator=gen) * 0.4 + offset
        else:
            state[name] = torch.randn(t.shape, generator=gen) * (2.0 / t[0].numel()) ** 0.5
    model.load_state_dict(state, strict=True)
    return model


def _build(cfg, name, input_shape=None):
    cfg = cfg.clone()
    cfg.MODEL.BACKBONE.NAME = name
    return build_backbone(cfg, input_shape)


CASES = {
    "R50-C4": _cfg(),
    "R50-DC5": _cfg(RES5_DILATION=2, OUT_FEATURES=["res5"]),
    "R50-C5": _cfg(OUT_FEATURES=["res5"]),
    "R18": _cfg(DEPTH=18, RES2_OUT_CHANNELS=64, OUT_FEATURES=ALL_RES),
    "X101-32x8d": _cfg(
        DEPTH=101, NUM_GROUPS=32, WIDTH_PER_GROUP=8, STRIDE_IN_1X1=False, OUT_FEATURES=ALL_RES
    ),
    "R50-BN-stem-freeze3": _cfg(NORM="BN", freeze_at=3, OUT_FEATURES=["stem", "res3", "res5"]),
    "R50-FPN": _cfg(fpn=True),
    "R50-FPN-GN-avg": _cfg(fpn=True, NORM="GN", fpn_norm="GN", fuse_type="avg"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_detectron2(case):
    cfg = CASES[case]
    fpn = bool(cfg.MODEL.FPN.IN_FEATURES)
    ref = _build(cfg, "build_resnet_fpn_backbone" if fpn else "build_resnet_backbone")
    ours = _build(cfg, "MRCNNResNetFPN" if fpn else "MRCNNResNet")
    assert isinstance(ours, MRCNNResNetFPN if fpn else MRCNNResNet)
    assert isinstance(ours.bottom_up if fpn else ours, ResNet)

    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert {k: v.shape for k, v in ref_sd.items()} == {k: v.shape for k, v in our_sd.items()}
    # Same frozen parameters and the same norm layer types (FrozenBN where frozen).
    assert {n: p.requires_grad for n, p in ref.named_parameters()} == {
        n: p.requires_grad for n, p in ours.named_parameters()
    }
    ref_types = {n: type(m) for n, m in ref.named_modules() if n.endswith("norm")}
    assert ref_types == {n: type(m) for n, m in ours.named_modules() if n.endswith("norm")}
    assert ref.output_shape() == ours.output_shape()
    assert ref.size_divisibility == ours.size_divisibility

    _randomize_(ref)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected, got = ref.eval()(x), ours.eval()(x)
    assert list(got) == list(expected)
    for name, spec in ours.output_shape().items():
        size = -(-64 // spec.stride)
        assert got[name].shape == (1, spec.channels, size, size), name
        assert expected[name].abs().max() > 1e-3, name  # a non-trivial comparison
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5)


def test_c4_has_no_res5_and_dc5_keeps_stride_16():
    c4 = _build(_cfg(), "MRCNNResNet")
    assert c4.stage_names == ("res2", "res3", "res4")  # res5 belongs to the C4 RoI head
    dc5 = _build(_cfg(RES5_DILATION=2, OUT_FEATURES=["res5"]), "MRCNNResNet")
    assert dc5.output_shape()["res5"].stride == 16
    assert dc5.res5[0].conv2.dilation == (2, 2) and dc5.res5[0].conv2.padding == (2, 2)


def test_fpn_levels_and_p6():
    ours = _build(_cfg(fpn=True, DEPTH=18, RES2_OUT_CHANNELS=64), "MRCNNResNetFPN").eval()
    assert isinstance(ours, FPN) and isinstance(ours.top_block, LastLevelMaxPool)
    assert [(k, s.stride) for k, s in ours.output_shape().items()] == [
        ("p2", 4),
        ("p3", 8),
        ("p4", 16),
        ("p5", 32),
        ("p6", 64),
    ]
    assert isinstance(ours.bottom_up.res5[1], BasicBlock)  # R18: two 3x3 convs per block
    assert "bottom_up.res5.1.conv2.norm.running_var" in ours.state_dict()
    with torch.no_grad():
        out = ours(torch.randn(1, 3, 64, 96))
    assert torch.equal(out["p6"], out["p5"][:, :, ::2, ::2])


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 4])
def test_freeze_at(freeze_at):
    cfg = _cfg(DEPTH=18, RES2_OUT_CHANNELS=64, NORM="BN", freeze_at=freeze_at)
    cfg.MODEL.RESNETS.OUT_FEATURES = ALL_RES
    model = _build(cfg, "MRCNNResNet")
    for index, part in enumerate(["stem"] + ALL_RES, start=1):
        frozen = freeze_at >= index
        module = getattr(model, part)
        assert all(p.requires_grad != frozen for p in module.parameters()), part
        norms = [m for m in module.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
        assert norms and all(isinstance(m, FrozenBatchNorm2d) == frozen for m in norms), part


def test_explicit_arguments_and_input_channels():
    stages = ResNet.make_default_stages(18, norm="BN")
    model = MRCNNResNet(
        BasicStem(4, 64, norm="BN"), stages, out_features=["res2", "res3"], freeze_at=1
    )
    assert not model.stem.conv1.weight.requires_grad and model.res3[0].conv1.weight.requires_grad
    assert model(torch.randn(1, 4, 32, 32))["res3"].shape == (1, 128, 4, 4)
    fpn = MRCNNResNetFPN(model, ["res2", "res3"], 32, top_block=LastLevelMaxPool())
    assert list(fpn.output_shape()) == ["p2", "p3", "p4"]

    cfg = _cfg(fpn=True, DEPTH=18, RES2_OUT_CHANNELS=64)
    fpn = MRCNNResNetFPN(cfg, ShapeSpec(channels=1))  # positional (cfg, input_shape)
    assert fpn.bottom_up.stem.conv1.weight.shape == (64, 1, 7, 7)


def _d2_res5(stride, **kw):
    """The res5 as detectron2's Res5ROIHeads builds it, with the given first stride."""
    kw["stride_per_block"] = [stride, 1, 1]
    stage = ResNet.make_stage(BottleneckBlock, 3, in_channels=1024, out_channels=2048, **kw)
    return nn.Sequential(*stage)


def test_res5_stage_matches_detectron2_roi_head_stage():
    kw = {"bottleneck_channels": 512, "norm": "FrozenBN", "stride_in_1x1": True}
    ref = _randomize_(_d2_res5(2, **kw)).eval()
    ours = make_res5_stage(1024, 2048, first_stride=2)
    assert [n for n, _ in ours.named_children()] == ["0", "1", "2"]
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert "0.shortcut.weight" in ours.state_dict() and "1.shortcut.weight" not in ours.state_dict()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 1024, 14, 14)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref(x), atol=1e-5, rtol=1e-5)

    # The paper's stride-1 head loads the same weights and keeps a 7x7 RoI feature at 7x7.
    paper = make_res5_stage(first_stride=1)
    paper.load_state_dict(ref.state_dict(), strict=True)
    ref1 = _d2_res5(1, **kw)
    ref1.load_state_dict(ref.state_dict(), strict=True)
    x7 = torch.randn(2, 1024, 7, 7)
    with torch.no_grad():
        out = paper.eval()(x7)
        assert out.shape == (2, 2048, 7, 7) and ours(x).shape == (2, 2048, 7, 7)
        torch.testing.assert_close(out, ref1.eval()(x7), atol=1e-5, rtol=1e-5)


def test_res5_stage_from_config_resnext():
    cfg = add_mrcnn_config(_cfg(NUM_GROUPS=32, WIDTH_PER_GROUP=8, STRIDE_IN_1X1=False))
    cfg.MODEL.MRCNN.RES5_FIRST_STRIDE = 1
    kwargs = res5_stage_kwargs_from_config(cfg)
    assert kwargs["first_stride"] == 1 and kwargs["in_channels"] == 1024
    stage = make_res5_stage(**kwargs)
    assert stage[0].conv2.groups == 32 and stage[0].conv2.weight.shape == (2048, 64, 3, 3)
    assert stage[0].conv2.stride == (1, 1) and stage[0].shortcut.stride == (1, 1)
    ref = _d2_res5(1, bottleneck_channels=2048, num_groups=32, norm="FrozenBN", stride_in_1x1=False)
    assert {k: v.shape for k, v in stage.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    # Without the plugin's key, detectron2's stride 2.
    assert res5_stage_kwargs_from_config(_cfg())["first_stride"] == 2
