"""Pure PyTorch stand-in for detectron2's compiled module ``detectron2._C`` (v0.6 and main)."""
