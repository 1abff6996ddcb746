"""Mixed precision on the CPU: detectron2's AMPTrainer is CUDA-only (float16 + GradScaler).

On CPUs with bfloat16 units (AVX-512 BF16 / AMX) autocasting convolutions and matrix products
to bfloat16 is several times faster. bfloat16 keeps float32's exponent range, so no loss
scaling is needed: the step is SimpleTrainer's with the forward under ``torch.autocast``.
"""

import time

import torch
from detectron2.engine import SimpleTrainer


class CPUAutocastTrainer(SimpleTrainer):
    """SimpleTrainer whose forward pass runs under ``torch.autocast("cpu", bfloat16)``."""

    def run_step(self):
        assert self.model.training, "[CPUAutocastTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_dict = self.model(data)
        if isinstance(loss_dict, torch.Tensor):
            loss_dict = {"total_loss": loss_dict}
        loss_dict = {k: v.float() for k, v in loss_dict.items()}
        losses = sum(loss_dict.values())

        self.optimizer.zero_grad()
        losses.backward()
        self._write_metrics(loss_dict, data_time)
        self.optimizer.step()
