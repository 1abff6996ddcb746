"""Deformable-conv entry points of the detectron2._C stand-in.

On CPU, detectron2's DeformConv/ModulatedDeformConv autograd Functions refuse to call ``_C``
(they raise or use torchvision directly), so the CPU tests call the ``_C`` functions with
exactly the argument lists those Functions use; the layer-level tests need a GPU. A compiled
detectron2._C has no CPU kernels for these (it raises RuntimeError); with one loaded, the CPU
tests call the stand-in's functions (``mrcnn_plugin_csrc.deform_conv_ops``) directly.
References: ``nn.functional.conv2d`` (zero offsets, integer shifts) and gradcheck.
"""

import pytest
import torch
import torch.nn.functional as F
from detectron2 import _C
from detectron2.layers import DeformConv, ModulatedDeformConv


def _has_cpu_kernels():
    x = torch.zeros(1, 1, 3, 3)
    try:
        _C.deform_conv_forward(
            x, torch.zeros(1, 1, 1, 1), torch.zeros(1, 2, 3, 3), x.new_empty(0), x.new_empty(0),
            x.new_empty(0), 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1,
        )  # fmt: skip
    except RuntimeError as e:
        if "not implemented on cpu" in str(e).lower():
            return False
        raise
    return True


def _cpu_kernels():
    """detectron2._C where it runs on CPU (the stand-in), else the stand-in's module itself."""
    if _has_cpu_kernels():
        return _C
    try:
        from mrcnn_plugin_csrc import deform_conv_ops
    except ImportError:
        return None
    return deform_conv_ops


KERNELS = _cpu_kernels()
needs_cpu_kernels = pytest.mark.skipif(
    KERNELS is None, reason="no CPU deformable-conv kernels: compiled _C, no mrcnn_plugin_csrc"
)


def _out_size(size, k, stride, pad, dil):
    return (size + 2 * pad - (dil * (k - 1) + 1)) // stride + 1


def deform_forward(x, offset, weight, stride, padding, dilation, groups, dg):
    """Calls _C like detectron2's _DeformConv.forward (stride etc. as (h, w) pairs)."""
    out = x.new_empty(
        x.shape[0],
        weight.shape[0],
        _out_size(x.shape[2], weight.shape[2], stride[0], padding[0], dilation[0]),
        _out_size(x.shape[3], weight.shape[3], stride[1], padding[1], dilation[1]),
    )
    buf = [x.new_empty(0), x.new_empty(0)]
    KERNELS.deform_conv_forward(
        x, weight, offset, out, buf[0], buf[1], weight.size(3), weight.size(2),
        stride[1], stride[0], padding[1], padding[0], dilation[1], dilation[0], groups, dg, 64,
    )  # fmt: skip
    return out


class _DeformFn(torch.autograd.Function):
    """Forward and backward both through _C, with detectron2's calling convention."""

    @staticmethod
    def forward(ctx, x, offset, weight, stride, padding, dilation, groups):
        ctx.save_for_backward(x, offset, weight)
        ctx.conv = (stride, padding, dilation, groups)
        return deform_forward(x, offset, weight, stride, padding, dilation, groups, 1)

    @staticmethod
    def backward(ctx, grad_out):
        x, offset, weight = ctx.saved_tensors
        (sh, sw), (ph, pw), (dh, dw), groups = ctx.conv
        grad_x, grad_off, grad_w = (torch.zeros_like(t) for t in (x, offset, weight))
        kw, kh = weight.size(3), weight.size(2)
        common = (kw, kh, sw, sh, pw, ph, dw, dh, groups, 1)
        KERNELS.deform_conv_backward_input(
            x, offset, grad_out, grad_x, grad_off, weight, x.new_empty(0), *common, 64
        )
        KERNELS.deform_conv_backward_filter(
            x, offset, grad_out, grad_w, x.new_empty(0), x.new_empty(0), *common, 1, 64
        )
        return grad_x, grad_off, grad_w, None, None, None, None


class _ModulatedFn(torch.autograd.Function):
    """Modulated conv through _C, argument lists as in detectron2's _ModulatedDeformConv."""

    @staticmethod
    def forward(ctx, x, offset, mask, weight, bias, stride, padding, dilation):
        ctx.save_for_backward(x, offset, mask, weight, bias)
        ctx.conv = (stride, padding, dilation)
        kh, kw = weight.shape[2:]
        out = x.new_empty(
            x.shape[0],
            weight.shape[0],
            _out_size(x.shape[2], kh, stride, padding, dilation),
            _out_size(x.shape[3], kw, stride, padding, dilation),
        )
        KERNELS.modulated_deform_conv_forward(
            x, weight, bias, x.new_empty(0), offset, mask, out, x.new_empty(0), kh, kw,
            stride, stride, padding, padding, dilation, dilation, 1, 1, True,
        )  # fmt: skip
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, offset, mask, weight, bias = ctx.saved_tensors
        stride, padding, dilation = ctx.conv
        grads = [torch.zeros_like(t) for t in (x, weight, bias, offset, mask)]
        KERNELS.modulated_deform_conv_backward(
            x, weight, bias, x.new_empty(0), offset, mask, x.new_empty(0), *grads, grad_out,
            weight.shape[2], weight.shape[3], stride, stride, padding, padding,
            dilation, dilation, 1, 1, True,
        )  # fmt: skip
        gx, gw, gb, goff, gmask = grads
        return gx, goff, gmask, gw, gb, None, None, None


def _data(gen, dtype=torch.float32, kh=3, kw=2, groups=2, out_hw=(4, 5), size=(7, 8)):
    x = torch.randn(2, 4, *size, generator=gen, dtype=dtype)
    weight = torch.randn(6, 4 // groups, kh, kw, generator=gen, dtype=dtype)
    offset = torch.zeros(2, 2 * kh * kw, *out_hw, dtype=dtype)
    return x, weight, offset


@needs_cpu_kernels
def test_zero_offset_equals_conv2d():
    gen = torch.Generator().manual_seed(0)
    x, weight, _ = _data(gen)
    conv = dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2))
    want = F.conv2d(x, weight, groups=2, **conv)
    offset = torch.zeros(2, 2 * 3 * 2, *want.shape[2:])
    got = deform_forward(x, offset, weight, (2, 1), (1, 0), (1, 2), 2, 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    offset = torch.zeros(2, 2 * 2 * 3 * 2, *want.shape[2:])  # two deformable groups
    got = deform_forward(x, offset, weight, (2, 1), (1, 0), (1, 2), 2, 2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_cpu_kernels
def test_offset_layout_is_dy_dx():
    # Offsets (dy=1, dx=0) on every tap read the input one row lower: conv2d of the shifted map.
    gen = torch.Generator().manual_seed(1)
    x, weight, _ = _data(gen, groups=1, kh=3, kw=3)
    weight = torch.randn(6, 4, 3, 3, generator=gen)
    offset = torch.zeros(2, 18, 5, 6)
    offset[:, 0::2] = 1.0
    shifted = torch.cat([x[:, :, 1:], torch.zeros_like(x[:, :, :1])], dim=2)
    want = F.conv2d(shifted, weight)
    got = deform_forward(x, offset, weight, (1, 1), (0, 0), (1, 1), 1, 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_cpu_kernels
def test_deform_conv_backward_matches_conv2d_at_zero_offset():
    gen = torch.Generator().manual_seed(2)
    x, weight, _ = _data(gen)
    x.requires_grad_()
    weight.requires_grad_()
    ref = F.conv2d(x, weight, stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2)
    grad = torch.randn(ref.shape, generator=gen)
    want = torch.autograd.grad(ref, (x, weight), grad)
    offset = torch.zeros(2, 12, *ref.shape[2:], requires_grad=True)
    out = _DeformFn.apply(x, offset, weight, (2, 1), (1, 0), (1, 2), 2)
    got = torch.autograd.grad(out, (x, weight), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


@needs_cpu_kernels
def test_deform_conv_gradcheck_random_offsets():
    gen = torch.Generator().manual_seed(3)
    x, weight, offset = _data(gen, torch.float64, groups=1, size=(5, 5), out_hw=(3, 4))
    weight = torch.randn(3, 4, 3, 2, generator=gen, dtype=torch.float64)
    offset = torch.rand(offset.shape, generator=gen, dtype=torch.float64) * 1.6 - 0.8
    args = [t.requires_grad_() for t in (x, offset, weight)]
    fn = lambda a, b, c: _DeformFn.apply(a, b, c, (1, 1), (0, 0), (1, 1), 1)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, atol=1e-5, fast_mode=True)


@needs_cpu_kernels
def test_modulated_matches_conv2d_and_gradcheck():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 3, 4, 5, generator=gen, dtype=torch.float64)
    weight = torch.randn(2, 3, 3, 3, generator=gen, dtype=torch.float64)
    bias = torch.randn(2, generator=gen, dtype=torch.float64)
    zeros = torch.zeros(1, 18, 4, 5, dtype=torch.float64)
    ones = torch.ones(1, 9, 4, 5, dtype=torch.float64)
    want = F.conv2d(x, weight, bias, padding=1)
    torch.testing.assert_close(_ModulatedFn.apply(x, zeros, ones, weight, bias, 1, 1, 1), want)
    half = _ModulatedFn.apply(x, zeros, ones / 2, weight, bias, 1, 1, 1)
    torch.testing.assert_close(half, (want - bias[:, None, None]) / 2 + bias[:, None, None])
    offset = torch.rand(zeros.shape, generator=gen, dtype=torch.float64) * 1.6 - 0.8
    mask = torch.rand(ones.shape, generator=gen, dtype=torch.float64)
    args = [t.clone().requires_grad_() for t in (x, offset, mask, weight, bias)]
    fn = lambda *a: _ModulatedFn.apply(*a, 1, 1, 1)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize(
    "case", ["offset_channels", "offset_size", "kernel", "stride", "too_small", "mask_channels"]
)
def test_bad_arguments_raise_runtime_error(case):
    # As the compiled kernels' TORCH_CHECKs (and their CPU "not implemented" error) do.
    x, weight = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    offset, mask = torch.zeros(1, 18, 3, 3), torch.ones(1, 9, 3, 3)
    k, stride = 3, 1
    if case == "offset_channels":
        offset = torch.zeros(1, 16, 3, 3)
    elif case == "offset_size":
        offset = torch.zeros(1, 18, 4, 3)
    elif case == "kernel":
        k = 2
    elif case == "stride":
        stride = 0
    elif case == "too_small":
        x = torch.randn(1, 2, 2, 2)
    elif case == "mask_channels":
        mask = torch.ones(1, 8, 3, 3)
    out, buf = x.new_empty(0), x.new_empty(0)
    kernels = KERNELS if KERNELS is not None else _C
    with pytest.raises(RuntimeError):
        if case == "mask_channels":
            kernels.modulated_deform_conv_forward(
                x, weight, torch.zeros(3), buf, offset, mask, out, buf, k, k,
                stride, stride, 0, 0, 1, 1, 1, 1, True,
            )  # fmt: skip
        else:
            kernels.deform_conv_forward(
                x, weight, offset, out, buf, buf, k, k, stride, stride, 0, 0, 1, 1, 1, 1, 64
            )


def test_cpu_layer_forward_zero_offset():
    # detectron2's CPU path (torchvision directly): a consistency check of the same convention.
    layer = DeformConv(4, 6, 3, padding=1)
    x = torch.randn(1, 4, 6, 7)
    offset = torch.zeros(1, 18, 6, 7)
    torch.testing.assert_close(layer(x, offset), F.conv2d(x, layer.weight, padding=1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="detectron2 calls _C only on CUDA")
def test_layers_on_cuda_match_conv2d_and_torchvision_grads():
    from torchvision.ops import deform_conv2d

    torch.manual_seed(5)
    x = torch.randn(2, 4, 9, 8, device="cuda", requires_grad=True)
    layer = DeformConv(4, 6, 3, padding=1).cuda()
    offset = torch.zeros(2, 18, 9, 8, device="cuda")
    torch.testing.assert_close(layer(x, offset), F.conv2d(x, layer.weight, padding=1))
    offset = (torch.rand_like(offset) - 0.5).requires_grad_()
    out = layer(x, offset)
    out.square().sum().backward()
    tx, toff, tw = (t.detach().clone().requires_grad_() for t in (x, offset, layer.weight))
    deform_conv2d(tx, toff, tw, padding=1).square().sum().backward()
    for got, want in ((x.grad, tx.grad), (offset.grad, toff.grad), (layer.weight.grad, tw.grad)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    mod = ModulatedDeformConv(4, 6, 3, padding=1).cuda()
    zero = torch.zeros(2, 18, 9, 8, device="cuda")
    ones = torch.ones(2, 9, 9, 8, device="cuda")
    torch.testing.assert_close(mod(x, zero, ones), F.conv2d(x, mod.weight, mod.bias, padding=1))
    mask = torch.rand_like(ones).requires_grad_()
    mod(x, offset, mask).sum().backward()
    assert mask.grad is not None and mask.grad.abs().sum() > 0
