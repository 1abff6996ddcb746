"""The hardware floor of a model's inference: its multiply-adds over the CPU's measured
convolution rate.

``model_gflop`` counts the model's FLOPs with fvcore's ``FlopCountAnalysis`` (which counts one
multiply-add as one "flop"; doubled here to FLOPs) on the actual image, so the RoI heads are
counted for the RoIs that image produces. Only the matrix work is counted (convolutions,
transposed convolutions, linear layers, matrix products): the floor is the time those would
take at the best rate a convolution reaches on this CPU, which nothing can beat while keeping
the model's arithmetic. ``conv_rates`` measures that rate on a few convolutions shaped like the
model's (ResNet/FPN 3x3 and 1x1 at FPN resolutions, the 14x14 RoI head convs), in both memory
layouts for float32 and channels-last for bfloat16 (oneDNN's layout for AMX), and keeps the
best of each precision.
"""

import time
from typing import Dict, Iterable

import torch
import torch.nn.functional as F
from fvcore.nn import FlopCountAnalysis
from torch import nn

__all__ = ["CONV_SHAPES", "MATRIX_OPS", "conv_rates", "model_gflop"]

MATRIX_OPS = ("conv", "linear", "matmul", "bmm", "einsum", "addmm")
# (batch, in channels, out channels, kernel, height, width)
CONV_SHAPES = (
    (1, 256, 256, 3, 100, 152),  # FPN output conv at p3 of an 800x1216 image
    (1, 128, 128, 3, 100, 152),  # res3 3x3
    (1, 1024, 256, 1, 50, 76),  # res4 1x1 / FPN lateral
    (100, 256, 256, 3, 14, 14),  # mask head conv on 100 RoIs
    (100, 512, 512, 3, 14, 14),  # keypoint head conv on 100 RoIs
)


class _Detections(nn.Module):
    """A detectron2 model as image -> tensors, for tracing."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        h, w = image.shape[-2:]
        out = self.model([{"image": image, "height": h, "width": w}])[0]["instances"]
        return tuple(v for v in out.get_fields().values() if isinstance(v, torch.Tensor)) + (
            out.pred_boxes.tensor,
        )


def model_gflop(model: nn.Module, image: torch.Tensor) -> Dict[str, float]:
    """{"total": GFLOP of the matrix ops, op name: GFLOP, ...} of one inference of the
    detectron2 ``model`` on ``image`` (3, H, W), from fvcore's FlopCountAnalysis."""
    model.eval()
    with torch.no_grad():
        analysis = FlopCountAnalysis(_Detections(model), (image,))
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        by_op = {k: 2 * v / 1e9 for k, v in analysis.by_operator().items() if k in MATRIX_OPS}
    return {"total": sum(by_op.values()), **by_op}


def _conv_gflop(n, cin, cout, k, h, w) -> float:
    return 2 * n * cin * cout * k * k * h * w / 1e9


@torch.no_grad()
def conv_rates(precisions: Iterable[str] = ("fp32", "bf16"), repeats: int = 2) -> Dict[str, float]:
    """Best measured GFLOP/s per precision over :data:`CONV_SHAPES` (best of ``repeats``
    timings after one warm-up each), with torch's current thread count."""
    best = {}
    for precision in precisions:
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        layouts = (torch.contiguous_format, torch.channels_last) if precision == "fp32" else (
            torch.channels_last,
        )  # fmt: skip
        rate = 0.0
        for n, cin, cout, k, h, w in CONV_SHAPES:
            for layout in layouts:
                x = torch.randn(n, cin, h, w).to(dtype).contiguous(memory_format=layout)
                weight = torch.randn(cout, cin, k, k).to(dtype).contiguous(memory_format=layout)
                bias = torch.randn(cout).to(dtype)
                F.conv2d(x, weight, bias, padding=k // 2)
                for _ in range(repeats):
                    start = time.perf_counter()
                    F.conv2d(x, weight, bias, padding=k // 2)
                    seconds = time.perf_counter() - start
                    rate = max(rate, _conv_gflop(n, cin, cout, k, h, w) / seconds)
        best[precision] = rate
    return best
