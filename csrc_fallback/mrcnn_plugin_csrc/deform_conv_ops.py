"""Deformable convolution (v1 and modulated v2) entry points of detectron2's ``_C``.

All five functions keep detectron2's argument lists and write into the tensors they are given,
as its kernels do. The arithmetic is torchvision's ``deform_conv2d``: its offset layout is the
same as detectron2's, per deformable group ``2 * kh * kw`` channels ordered (dy, dx) for each
kernel tap in row-major order, and its mask has one channel per tap. Gradients come from
autograd through ``deform_conv2d``. ``columns``/``ones`` scratch buffers and ``im2col_step``
only served the CUDA kernels' batching and are ignored.
"""

import torch
from torchvision.ops import deform_conv2d


def _check_shapes(input, weight, offset, mask, kernel_h, kernel_w, group, deformable_group):
    if input.dim() != 4:
        raise ValueError(f"expected a 4D input, got {input.dim()}D")
    if tuple(weight.shape[2:]) != (kernel_h, kernel_w):
        raise ValueError(f"weight kernel {tuple(weight.shape[2:])} != ({kernel_h}, {kernel_w})")
    if input.shape[1] != weight.shape[1] * group:
        raise ValueError(f"input channels {input.shape[1]} != {weight.shape[1]} x group {group}")
    taps = kernel_h * kernel_w
    if offset.shape[1] != 2 * taps * deformable_group:
        raise ValueError(f"offset has {offset.shape[1]} channels, expected {2 * taps} x groups")
    if mask is not None and mask.shape[1] != taps * deformable_group:
        raise ValueError(f"mask has {mask.shape[1]} channels, expected {taps} x groups")


def _run(input, offset, weight, mask, bias, stride, padding, dilation):
    """deform_conv2d with (h, w) pairs; input/offset/weight/mask: torchvision layouts."""
    return deform_conv2d(
        input, offset, weight, bias, stride=stride, padding=padding, dilation=dilation, mask=mask
    )


def _grads(grad_output, tensors, wanted, **conv):
    """Autograd of deform_conv2d w.r.t. the tensors flagged in ``wanted`` (others -> None).

    ``tensors`` maps input/offset/weight/mask/bias to tensors (mask/bias may be None).
    """
    with torch.enable_grad():
        leaves = {
            k: (v.detach().requires_grad_(k in wanted) if v is not None else None)
            for k, v in tensors.items()
        }
        args = [leaves[k] for k in ("input", "offset", "weight", "mask", "bias")]
        out = _run(*args, **conv)
        targets = [k for k in wanted if leaves[k] is not None]
        found = torch.autograd.grad(out, [leaves[k] for k in targets], grad_output)
    return dict(zip(targets, found))


def _write(dst, value, accumulate):
    """Stores ``value`` in ``dst`` (resized if needed), adding to it when ``accumulate``."""
    if dst.shape != value.shape:
        dst.resize_(value.shape).zero_()
    if accumulate:
        dst.add_(value.to(dst.dtype))
    else:
        dst.copy_(value)


# fmt: off
def deform_conv_forward(
    input, weight, offset, output, columns, ones, kW, kH, dW, dH, padW, padH,
    dilationW, dilationH, group, deformable_group, im2col_step,
):
    """Deformable conv v1: fills ``output`` (N, C_out, H_out, W_out). Returns 1 like the C++."""
    _check_shapes(input, weight, offset, None, kH, kW, group, deformable_group)
    conv = dict(stride=(dH, dW), padding=(padH, padW), dilation=(dilationH, dilationW))
    _write(output, _run(input, offset, weight, None, None, **conv), accumulate=False)
    return 1


def deform_conv_backward_input(
    input, offset, gradOutput, gradInput, gradOffset, weight, columns, kW, kH, dW, dH,
    padW, padH, dilationW, dilationH, group, deformable_group, im2col_step,
):
    """Adds d(loss)/d(input) to ``gradInput`` and writes d(loss)/d(offset) to ``gradOffset``."""
    _check_shapes(input, weight, offset, None, kH, kW, group, deformable_group)
    conv = dict(stride=(dH, dW), padding=(padH, padW), dilation=(dilationH, dilationW))
    tensors = dict(input=input, offset=offset, weight=weight, mask=None, bias=None)
    grads = _grads(gradOutput, tensors, ("input", "offset"), **conv)
    _write(gradInput, grads["input"], accumulate=True)
    _write(gradOffset, grads["offset"], accumulate=False)
    return 1


def deform_conv_backward_filter(
    input, offset, gradOutput, gradWeight, columns, ones, kW, kH, dW, dH, padW, padH,
    dilationW, dilationH, group, deformable_group, scale, im2col_step,
):
    """Adds ``scale`` * d(loss)/d(weight) to ``gradWeight``."""
    _check_shapes(input, gradWeight, offset, None, kH, kW, group, deformable_group)
    conv = dict(stride=(dH, dW), padding=(padH, padW), dilation=(dilationH, dilationW))
    # The weight gradient does not depend on the weight's value, which is not passed here.
    weight = torch.zeros_like(gradWeight)
    tensors = dict(input=input, offset=offset, weight=weight, mask=None, bias=None)
    grads = _grads(gradOutput, tensors, ("weight",), **conv)
    _write(gradWeight, grads["weight"] * scale, accumulate=True)
    return 1


def modulated_deform_conv_forward(
    input, weight, bias, ones, offset, mask, output, columns, kernel_h, kernel_w,
    stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group, deformable_group,
    with_bias,
):
    """Modulated deformable conv v2: fills ``output`` (N, C_out, H_out, W_out)."""
    _check_shapes(input, weight, offset, mask, kernel_h, kernel_w, group, deformable_group)
    conv = dict(stride=(stride_h, stride_w), padding=(pad_h, pad_w),
                dilation=(dilation_h, dilation_w))
    out = _run(input, offset, weight, mask, bias if with_bias else None, **conv)
    _write(output, out, accumulate=False)


def modulated_deform_conv_backward(
    input, weight, bias, ones, offset, mask, columns, grad_input, grad_weight, grad_bias,
    grad_offset, grad_mask, grad_output, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
    dilation_h, dilation_w, group, deformable_group, with_bias,
):
    """Gradients of the modulated conv: input/weight/bias are added to, offset/mask written."""
    _check_shapes(input, weight, offset, mask, kernel_h, kernel_w, group, deformable_group)
    conv = dict(stride=(stride_h, stride_w), padding=(pad_h, pad_w),
                dilation=(dilation_h, dilation_w))
    tensors = dict(input=input, offset=offset, weight=weight, mask=mask,
                   bias=bias if with_bias else None)
    wanted = ("input", "offset", "weight", "mask") + (("bias",) if with_bias else ())
    grads = _grads(grad_output, tensors, wanted, **conv)
    _write(grad_input, grads["input"], accumulate=True)
    _write(grad_weight, grads["weight"], accumulate=True)
    _write(grad_offset, grads["offset"], accumulate=False)
    _write(grad_mask, grads["mask"], accumulate=False)
    if with_bias:
        _write(grad_bias, grads["bias"], accumulate=True)
# fmt: on
