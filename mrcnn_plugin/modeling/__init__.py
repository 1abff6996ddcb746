"""The plugin's model components; importing this package registers them with detectron2."""

from . import backbone, poolers, roi_heads  # noqa: F401  (registers the components)
