"""Stop a training step before a NaN or Inf reaches the weights.

detectron2's step runners raise ``FloatingPointError`` for a non-finite *loss* before the
optimizer steps (in ``write_metrics``), but a finite loss can still give non-finite gradients
(measured: SOLVER.BASE_LR 20 turned 73 tensors into NaN/Inf one iteration before the loss did,
and that checkpoint was saved). :func:`check_finite_gradients` adds torch's public optimizer
step pre-hook, so it works under every runner (SimpleTrainer, AMPTrainer, CPUAutocastTrainer)
on detectron2 v0.6 and main. Under AMP, GradScaler skips ``optimizer.step`` itself when the
unscaled gradients are not finite, so the hook only sees the steps that would change weights.
"""

from typing import Dict, List

import torch
from detectron2.utils.events import get_event_storage

__all__ = ["NonFiniteGradientError", "check_finite_gradients"]


class NonFiniteGradientError(FloatingPointError):
    """An optimizer step was refused: the message names the iteration, the losses and the
    parameters whose gradients hold NaN or Inf."""


def _current_losses():
    """(iteration, {loss name: value}) of the running step, from detectron2's event storage
    (the losses are there in the main process once ``write_metrics`` ran)."""
    try:
        storage = get_event_storage()
    except AssertionError:  # no EventStorage: called outside a training loop
        return "?", {}
    losses = {
        name: value
        for name, (value, it) in storage.latest().items()
        if "loss" in name and it == storage.iter
    }
    return storage.iter, losses


class _FiniteGradientsHook:
    def __init__(self, names: Dict[int, str]):
        self.names = names

    def __call__(self, optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
        grads = [g for g in grads if g is not None]
        if not grads:
            return None
        if bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            return None
        bad: List[str] = [
            self.names.get(id(p), f"<parameter {tuple(p.shape)}>")
            for group in optimizer.param_groups
            for p in group["params"]
            if p.grad is not None and not bool(torch.isfinite(p.grad).all())
        ]
        iteration, losses = _current_losses()
        shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(losses.items())) or "not recorded"
        raise NonFiniteGradientError(
            f"non-finite gradients at iteration {iteration}: the optimizer step was not taken "
            f"(weights unchanged). Losses: {shown}. {len(bad)} parameters with NaN/Inf "
            f"gradients, e.g. {', '.join(bad[:8])}. Lower SOLVER.BASE_LR or clip gradients "
            f"(SOLVER.CLIP_GRADIENTS)."
        )


def check_finite_gradients(optimizer: torch.optim.Optimizer, model: torch.nn.Module):
    """Makes every ``optimizer.step()`` raise :class:`NonFiniteGradientError`, before it
    changes anything, when a gradient holds NaN or Inf. Returns the hook's removable handle."""
    names = {id(p): name for name, p in model.named_parameters()}
    return optimizer.register_step_pre_hook(_FiniteGradientsHook(names))
