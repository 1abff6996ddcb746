"""Model components (detectron2 plugins). Importing a submodule registers its classes."""

from . import poolers  # noqa: F401
