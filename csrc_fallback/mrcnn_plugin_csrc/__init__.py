"""Pure PyTorch stand-in for detectron2 v0.6's compiled module ``detectron2._C``."""
