"""The plugin's ResNet / FPN backbones against detectron2's built-in ones (same cfg, same weights).

Reference models are built through ``build_backbone`` with detectron2's own registered names,
their weights (and norm statistics) are randomised, loaded strictly into the plugin model, and
every output feature must agree.
"""

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import build_backbone
from detectron2.modeling.backbone.resnet import BottleneckBlock as D2Bottleneck
from detectron2.modeling.backbone.resnet import ResNet as D2ResNet
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
            state[name] = torch.rand(t.shape, generator=gen) * 0.4 + (
                0.2 if "weight" in name else -0.2
            )
        else:
            state[name] = torch.randn(t.shape, generator=gen) * (2.0 / t[0].numel()) ** 0.5
    model.load_state_dict(state, strict=True)
    return model


def _with_name(cfg, name):
    cfg.MODEL.BACKBONE.NAME = name
    return cfg


def _build_pair(cfg, d2_name, plugin_name, input_shape=None):
    cfg.MODEL.BACKBONE.NAME = d2_name
    ref = build_backbone(cfg, input_shape)
    cfg.MODEL.BACKBONE.NAME = plugin_name
    ours = build_backbone(cfg, input_shape)
    return ref, ours


CASES = {
    "R50-C4": (_cfg(), False),
    "R50-DC5": (_cfg(RES5_DILATION=2, OUT_FEATURES=["res5"]), False),
    "R50-C5": (_cfg(OUT_FEATURES=["res5"]), False),
    "R18": (_cfg(DEPTH=18, RES2_OUT_CHANNELS=64, OUT_FEATURES=ALL_RES), False),
    "X101-32x8d": (
        _cfg(
            DEPTH=101, NUM_GROUPS=32, WIDTH_PER_GROUP=8, STRIDE_IN_1X1=False, OUT_FEATURES=ALL_RES
        ),
        False,
    ),
    "R50-BN-stem-freeze3": (
        _cfg(NORM="BN", freeze_at=3, OUT_FEATURES=["stem", "res3", "res5"]),
        False,
    ),
    "R50-FPN": (_cfg(fpn=True), True),
    "R50-FPN-GN-avg": (_cfg(fpn=True, NORM="GN", fpn_norm="GN", fuse_type="avg"), True),
}


# (detectron2's registered builder, the plugin's) for plain ResNets and for FPNs.
BUILDERS = {
    False: ("build_resnet_backbone", "MRCNNResNet"),
    True: ("build_resnet_fpn_backbone", "MRCNNResNetFPN"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_detectron2(case):
    cfg, fpn = CASES[case]
    cfg = cfg.clone()
    ref, ours = _build_pair(cfg, *BUILDERS[fpn])
    assert isinstance(ours, MRCNNResNetFPN if fpn else MRCNNResNet)

    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert set(ref_sd) == set(our_sd)
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
    ref.eval()
    ours.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected, got = ref(x), ours(x)
    assert list(got) == list(expected)
    for name, spec in ours.output_shape().items():
        size = -(-64 // spec.stride)
        assert got[name].shape == (1, spec.channels, size, size), name
        assert expected[name].abs().max() > 1e-3, name  # a non-trivial comparison
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5)


def test_fpn_levels_and_p6():
    cfg = _cfg(fpn=True, DEPTH=18, RES2_OUT_CHANNELS=64)
    ours = build_backbone(_with_name(cfg, "MRCNNResNetFPN")).eval()
    assert ours.size_divisibility == 32
    shapes = ours.output_shape()
    assert list(shapes) == ["p2", "p3", "p4", "p5", "p6"]
    assert [s.stride for s in shapes.values()] == [4, 8, 16, 32, 64]
    keys = set(ours.state_dict())
    for k in range(2, 6):
        assert {f"fpn_lateral{k}.weight", f"fpn_lateral{k}.bias"} <= keys
        assert {f"fpn_output{k}.weight", f"fpn_output{k}.bias"} <= keys
    assert "bottom_up.res5.1.conv2.norm.running_var" in keys
    with torch.no_grad():
        out = ours(torch.randn(1, 3, 64, 96))
    assert out["p6"].shape[-2:] == (1, 2)
    assert torch.equal(out["p6"], out["p5"][:, :, ::2, ::2])


def test_state_dict_names_r50():
    keys = set(MRCNNResNet(depth=50, out_features=["res5"]).state_dict())
    norm = ["weight", "bias", "running_mean", "running_var"]
    expected_some = {"stem.conv1.weight", "res2.0.conv1.weight", "res2.0.shortcut.weight"}
    expected_some |= {f"stem.conv1.norm.{n}" for n in norm}
    expected_some |= {f"res2.0.shortcut.norm.{n}" for n in norm}
    expected_some |= {f"res5.2.conv3.norm.{n}" for n in norm} | {"res5.2.conv3.weight"}
    assert expected_some <= keys
    assert "res2.1.shortcut.weight" not in keys and "res6.0.conv1.weight" not in keys
    # 1 stem conv + 16 blocks x 3 convs + 4 shortcuts, each with weight and 4 FrozenBN buffers.
    assert len(keys) == (1 + 16 * 3 + 4) * 5


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 4])
def test_freeze_at(freeze_at):
    model = MRCNNResNet(
        depth=18, res2_out_channels=64, norm="BN", freeze_at=freeze_at, out_features=ALL_RES
    )
    parts = ["stem", "res2", "res3", "res4", "res5"]
    for index, part in enumerate(parts, start=1):
        frozen = freeze_at >= index
        module = getattr(model, part)
        assert all(p.requires_grad != frozen for p in module.parameters()), part
        norms = [m for m in module.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
        assert norms and all(isinstance(m, FrozenBatchNorm2d) == frozen for m in norms), part


@pytest.mark.parametrize(
    "norm,norm_type", [("GN", nn.GroupNorm), ("BN", nn.BatchNorm2d), ("SyncBN", nn.SyncBatchNorm)]
)
def test_norms_build_and_run(norm, norm_type):
    model = MRCNNResNet(depth=18, res2_out_channels=64, norm=norm, out_features=["res3"])
    assert isinstance(model.stem.conv1.norm, norm_type)
    assert isinstance(model.res3[0].shortcut.norm, norm_type)
    with torch.no_grad():  # eval mode: SyncBN uses running statistics, so it runs on CPU
        out = model.eval()(torch.randn(1, 3, 32, 32))["res3"]
    assert out.shape == (1, 128, 4, 4)


def test_cfg_call_honours_input_channels():
    cfg = _cfg(DEPTH=18, RES2_OUT_CHANNELS=64, OUT_FEATURES=["res2"])
    model = MRCNNResNet(cfg, ShapeSpec(channels=4))  # positional (cfg, input_shape)
    assert model.stem.conv1.weight.shape == (64, 4, 7, 7)
    assert model(torch.randn(1, 4, 32, 32))["res2"].shape == (1, 64, 8, 8)
    fpn = MRCNNResNetFPN(_cfg(fpn=True, DEPTH=18, RES2_OUT_CHANNELS=64), ShapeSpec(channels=1))
    assert fpn.bottom_up.stem.conv1.weight.shape[1] == 1


def test_invalid_configs_raise():
    with pytest.raises(ValueError, match="res2_out_channels=64"):
        MRCNNResNet(depth=18, res2_out_channels=256)
    with pytest.raises(ValueError, match="res5_dilation"):
        MRCNNResNet(depth=50, res5_dilation=4)
    with pytest.raises(ValueError, match="depth"):
        MRCNNResNet(depth=26)
    cfg = _cfg(DEPTH=18, RES2_OUT_CHANNELS=64)  # OUT_FEATURES stays ["res4"]
    cfg.MODEL.FPN.IN_FEATURES = ALL_RES
    with pytest.raises(ValueError, match="OUT_FEATURES"):
        MRCNNResNetFPN(cfg)


def _d2_res5(**kw):
    blocks = D2ResNet.make_stage(D2Bottleneck, 3, in_channels=1024, out_channels=2048, **kw)
    return nn.Sequential(*blocks)


def test_res5_stage_matches_detectron2_roi_head_stage():
    kw = {"bottleneck_channels": 512, "norm": "FrozenBN", "stride_in_1x1": True}
    ref = _randomize_(_d2_res5(stride_per_block=[2, 1, 1], **kw)).eval()
    ours = make_res5_stage(1024, 2048, first_stride=2)
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert {"0.shortcut.weight", "0.conv1.norm.running_mean", "2.conv3.weight"} <= set(
        ours.state_dict()
    )
    assert not any(k.startswith(("1.shortcut", "2.shortcut")) for k in ours.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 1024, 14, 14)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref(x), atol=1e-5, rtol=1e-5)

    # The paper's stride-1 head has the same parameters; it keeps a 7x7 RoI feature at 7x7.
    paper = make_res5_stage(first_stride=1)
    paper.load_state_dict(ref.state_dict(), strict=True)
    with torch.no_grad():
        assert paper.eval()(torch.randn(2, 1024, 7, 7)).shape == (2, 2048, 7, 7)
        assert ours(torch.randn(2, 1024, 14, 14)).shape == (2, 2048, 7, 7)


def test_res5_stage_from_config_resnext():
    cfg = add_mrcnn_config(_cfg(NUM_GROUPS=32, WIDTH_PER_GROUP=8, STRIDE_IN_1X1=False))
    cfg.MODEL.MRCNN.RES5_FIRST_STRIDE = 1
    kwargs = res5_stage_kwargs_from_config(cfg)
    assert kwargs["first_stride"] == 1 and kwargs["in_channels"] == 1024
    stage = make_res5_stage(**kwargs)
    assert stage[0].conv2.groups == 32 and stage[0].conv2.weight.shape == (2048, 64, 3, 3)
    assert stage[0].conv1.stride == (1, 1) and stage[0].shortcut.stride == (1, 1)
    ref = _d2_res5(
        stride_per_block=[1, 1, 1],
        bottleneck_channels=2048,
        num_groups=32,
        norm="FrozenBN",
        stride_in_1x1=False,
    )
    assert {k: v.shape for k, v in stage.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
