"""Mask R-CNN (He, Gkioxari, Dollar, Girshick, 2017) as detectron2 plugin components.

``import mrcnn_plugin`` registers every component with detectron2's registries under
"MRCNN"-prefixed names; ``add_mrcnn_config(cfg)`` adds the plugin's config keys.
"""

from . import layers, modeling  # noqa: F401  (registers components)
from .config import add_mrcnn_config

__all__ = ["add_mrcnn_config"]
__version__ = "0.1.0"
