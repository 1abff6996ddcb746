"""Training and evaluation entry points built on detectron2's engine."""

from .trainer import MRCNNTrainer

__all__ = ["MRCNNTrainer"]
