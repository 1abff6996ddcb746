"""Mixed precision on the CPU: detectron2's AMPTrainer is CUDA-only (float16 + GradScaler).

On CPUs with bfloat16 units (AVX-512 BF16 / AMX, Arm BF16) autocasting convolutions and matrix
products to bfloat16 is several times faster. Without them oneDNN emulates bfloat16, which was
about 7x *slower* than float32 for a training step on an AVX2-only AMD EPYC, so autocast is
used only where ``cpu_has_bf16()``. bfloat16 keeps float32's exponent range: no loss scaling.
"""

import inspect
import time

import torch
from detectron2.engine import SimpleTrainer, TrainerBase

from .cpu_features import cpu_has_bf16

__all__ = ["CPUAutocastTrainer", "cpu_has_bf16"]

# v0.6: write_metrics(loss_dict, data_time, prefix); main adds cur_iter before prefix.
_METRICS_TAKE_ITER = "cur_iter" in inspect.signature(SimpleTrainer.write_metrics).parameters


class CPUAutocastTrainer(TrainerBase):
    """SimpleTrainer's step (one batch, forward, backward, metrics, optimizer step) with the
    forward under ``torch.autocast("cpu", bfloat16)``; the losses are summed in float32."""

    def __init__(self, model, data_loader, optimizer):
        super().__init__()
        model.train()
        self.model = model
        self.data_loader = data_loader
        self.data_iter = None  # created on the first step, as detectron2 main does
        self.optimizer = optimizer

    def run_step(self):
        assert self.model.training, "[CPUAutocastTrainer] model was changed to eval mode!"
        if self.data_iter is None:
            self.data_iter = iter(self.data_loader)
        start = time.perf_counter()
        data = next(self.data_iter)
        data_time = time.perf_counter() - start

        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_dict = self.model(data)
        if isinstance(loss_dict, torch.Tensor):
            loss_dict = {"total_loss": loss_dict}
        loss_dict = {k: v.float() for k, v in loss_dict.items()}
        losses = sum(loss_dict.values())

        self.optimizer.zero_grad()
        losses.backward()
        if _METRICS_TAKE_ITER:
            SimpleTrainer.write_metrics(loss_dict, data_time, self.iter)
        else:
            SimpleTrainer.write_metrics(loss_dict, data_time)
        self.optimizer.step()

    def state_dict(self):
        return {**super().state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.optimizer.load_state_dict(state_dict["optimizer"])
