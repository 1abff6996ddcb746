"""An import finder that supplies ``detectron2._C`` when detectron2's own cannot be loaded.

It answers for that one module name only. detectron2's compiled module, when it exists and
loads, is always used: the stand-in is returned only if it is missing or raises on load (for
example an ``undefined symbol`` after a torch upgrade).

Environment variable MRCNN_PLUGIN_CSRC_FALLBACK: ``0`` leaves the finder out (read by the .pth
file at start-up); ``force`` makes it hand out the stand-in even where a working compiled
module exists (to test the stand-in against a real build).
"""

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys

TARGET = "detectron2._C"
ENV = "MRCNN_PLUGIN_CSRC_FALLBACK"
logger = logging.getLogger(__name__)


class _ModuleLoader(importlib.abc.Loader):
    """Hands an already-built module object to the import system."""

    def __init__(self, module):
        self._module = module

    def create_module(self, spec):
        return self._module

    def exec_module(self, module):
        pass


class CompiledOpsFallbackFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        forced = os.environ.get(ENV, "").strip().lower() == "force"
        real_spec = None if forced else importlib.machinery.PathFinder.find_spec(fullname, path)
        if real_spec is not None:
            try:
                module = importlib.util.module_from_spec(real_spec)
                real_spec.loader.exec_module(module)
                return importlib.util.spec_from_loader(fullname, _ModuleLoader(module))
            except (ImportError, OSError) as e:
                logger.warning("detectron2._C failed to load (%s); using mrcnn_plugin_csrc", e)
        from . import detectron2_c

        return importlib.util.spec_from_loader(fullname, _ModuleLoader(detectron2_c))


def install():
    """Adds the finder once, ahead of the path finder so a broken .so can be caught."""
    if not any(isinstance(f, CompiledOpsFallbackFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, CompiledOpsFallbackFinder())
