"""Deformable convolution (v1 and modulated v2) entry points of detectron2's ``_C``.

All five functions keep detectron2's argument lists and write into the tensors they are given,
as its kernels do. The arithmetic is torchvision's ``deform_conv2d``: its offset layout is the
same as detectron2's, per deformable group ``2 * kh * kw`` channels ordered (dy, dx) for each
kernel tap in row-major order, and its mask has one channel per tap. Gradients come from
autograd through ``deform_conv2d``. ``columns``/``ones`` scratch buffers and ``im2col_step``
only served the CUDA kernels' batching and are ignored. Invalid arguments raise RuntimeError
with the compiled checks' messages (TORCH_CHECK / AT_ERROR surface as RuntimeError). Unlike the
compiled module, which only has CUDA kernels, these also run on CPU tensors.
"""

import torch
from torchvision.ops import deform_conv2d


def _fail(condition, message):
    # The compiled kernels check with TORCH_CHECK / AT_ERROR, which Python sees as RuntimeError.
    if not condition:
        raise RuntimeError(message)


def _check_shapes(input, weight, offset, mask, grad_output, kernel, stride, pad, dil, groups, dg):
    """The compiled kernels' argument checks (``shape_check`` and the modulated ones)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, pad, dil
    _fail(weight.dim() == 4, f"4D weight tensor expected, but got: {weight.dim()}D")
    _fail(kh > 0 and kw > 0, f"kernel size should be greater than zero, got kH: {kh} kW: {kw}")
    _fail(
        tuple(weight.shape[2:]) == (kh, kw),
        f"kernel size should be consistent with weight, but got kH: {kh} kW: {kw} "
        f"weight.size(2): {weight.shape[2]}, weight.size(3): {weight.shape[3]}",
    )
    _fail(sh > 0 and sw > 0, f"stride should be greater than zero, got dH: {sh} dW: {sw}")
    _fail(dh > 0 and dw > 0, f"dilation should be greater than 0, got {dh}, {dw}")
    _fail(input.dim() == 4, f"4D input tensor expected but got: {input.dim()}D")
    planes = weight.shape[1] * groups
    _fail(planes % dg == 0, "input channels must divide deformable group size")
    out_h = (input.shape[2] + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    out_w = (input.shape[3] + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    _fail(
        out_h >= 1 and out_w >= 1,
        f"Given input size: ({planes} x {input.shape[2]} x {input.shape[3]}). Calculated output "
        f"size: ({weight.shape[0]} x {out_h} x {out_w}). Output size is too small",
    )
    _fail(
        input.shape[1] == planes,
        f"invalid number of input planes, expected: {planes}, but got: {input.shape[1]}",
    )
    _fail(offset.shape[0] == input.shape[0], "invalid batch size of offset")
    _fail(
        tuple(offset.shape[2:]) == (out_h, out_w),
        f"invalid spatial size of offset, expected height: {out_h} width: {out_w}, "
        f"but got height: {offset.shape[2]} width: {offset.shape[3]}",
    )
    _fail(offset.shape[1] == dg * 2 * kh * kw, "invalid number of channels of offset")
    if mask is not None:
        _fail(
            tuple(mask.shape[2:]) == (out_h, out_w),
            f"invalid spatial size of mask, expected height: {out_h} width: {out_w}, "
            f"but got height: {mask.shape[2]} width: {mask.shape[3]}",
        )
        _fail(mask.shape[1] == dg * kh * kw, "invalid number of channels of mask")
    if grad_output is not None:
        _fail(
            tuple(grad_output.shape[1:]) == (weight.shape[0], out_h, out_w),
            f"invalid size of gradOutput, expected ({weight.shape[0]}, {out_h}, {out_w}), "
            f"but got {tuple(grad_output.shape[1:])}",
        )


def _batched(*tensors):
    """The v1 kernels also take one unbatched (C, H, W) sample: give it a batch of 1."""
    return [t if t is None or t.dim() != 3 else t.unsqueeze(0) for t in tensors]


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


def _unbatched(value, unbatched):
    return value[0] if unbatched else value


# fmt: off
def deform_conv_forward(
    input, weight, offset, output, columns, ones, kW, kH, dW, dH, padW, padH,
    dilationW, dilationH, group, deformable_group, im2col_step,
):
    """Deformable conv v1: fills ``output`` (N, C_out, H_out, W_out). Returns 1 like the C++."""
    unbatched = input.dim() == 3
    input, offset = _batched(input, offset)
    conv = dict(stride=(dH, dW), padding=(padH, padW), dilation=(dilationH, dilationW))
    _check_shapes(input, weight, offset, None, None, (kH, kW), *conv.values(), group,
                  deformable_group)
    out = _run(input, offset, weight, None, None, **conv)
    _write(output, _unbatched(out, unbatched), accumulate=False)
    return 1


def deform_conv_backward_input(
    input, offset, gradOutput, gradInput, gradOffset, weight, columns, kW, kH, dW, dH,
    padW, padH, dilationW, dilationH, group, deformable_group, im2col_step,
):
    """Adds d(loss)/d(input) to ``gradInput`` and writes d(loss)/d(offset) to ``gradOffset``."""
    unbatched = input.dim() == 3
    input, offset, gradOutput = _batched(input, offset, gradOutput)
    conv = dict(stride=(dH, dW), padding=(padH, padW), dilation=(dilationH, dilationW))
    _check_shapes(input, weight, offset, None, gradOutput, (kH, kW), *conv.values(), group,
                  deformable_group)
    tensors = dict(input=input, offset=offset, weight=weight, mask=None, bias=None)
    grads = _grads(gradOutput, tensors, ("input", "offset"), **conv)
    _write(gradInput, _unbatched(grads["input"], unbatched), accumulate=True)
    _write(gradOffset, _unbatched(grads["offset"], unbatched), accumulate=False)
    return 1


def deform_conv_backward_filter(
    input, offset, gradOutput, gradWeight, columns, ones, kW, kH, dW, dH, padW, padH,
    dilationW, dilationH, group, deformable_group, scale, im2col_step,
):
    """Adds ``scale`` * d(loss)/d(weight) to ``gradWeight``."""
    input, offset, gradOutput = _batched(input, offset, gradOutput)
    conv = dict(stride=(dH, dW), padding=(padH, padW), dilation=(dilationH, dilationW))
    _check_shapes(input, gradWeight, offset, None, gradOutput, (kH, kW), *conv.values(), group,
                  deformable_group)
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
    input.size(3)  # like the kernel: IndexError for an input of fewer than 4 dimensions
    conv = dict(stride=(stride_h, stride_w), padding=(pad_h, pad_w),
                dilation=(dilation_h, dilation_w))
    _check_shapes(input, weight, offset, mask, None, (kernel_h, kernel_w), *conv.values(),
                  group, deformable_group)
    out = _run(input, offset, weight, mask, bias if with_bias else None, **conv)
    _write(output, out, accumulate=False)


def modulated_deform_conv_backward(
    input, weight, bias, ones, offset, mask, columns, grad_input, grad_weight, grad_bias,
    grad_offset, grad_mask, grad_output, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
    dilation_h, dilation_w, group, deformable_group, with_bias,
):
    """Gradients of the modulated conv: input/weight/bias are added to, offset/mask written."""
    input.size(3)
    conv = dict(stride=(stride_h, stride_w), padding=(pad_h, pad_w),
                dilation=(dilation_h, dilation_w))
    _check_shapes(input, weight, offset, mask, grad_output, (kernel_h, kernel_w),
                  *conv.values(), group, deformable_group)
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
