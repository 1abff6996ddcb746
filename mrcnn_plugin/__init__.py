"""Mask R-CNN as detectron2 plugin components."""
