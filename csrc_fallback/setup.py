"""mrcnn-plugin-csrc: a Python/PyTorch stand-in for detectron2's compiled module ``detectron2._C``.

Installed (not editable) by ``tools/install_env.sh`` because it ships a ``.pth`` file: at
interpreter start that file adds one import finder that answers for ``detectron2._C`` only,
and only when detectron2's own compiled module is missing or fails to load. That makes
``import detectron2.layers`` work in any import order without importing the plugin first.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_FILE = "mrcnn_plugin_csrc.pth"


class BuildPyWithPth(build_py):
    """Puts the .pth file at the root of the wheel, i.e. into site-packages."""

    def run(self):
        super().run()
        self.copy_file(PTH_FILE, os.path.join(self.build_lib, PTH_FILE))

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH_FILE)]


setup(
    name="mrcnn-plugin-csrc",
    version="0.1.0",
    description="Pure PyTorch stand-in for detectron2's compiled ops (detectron2._C; v0.6, main)",
    packages=["mrcnn_plugin_csrc"],
    python_requires=">=3.8",
    install_requires=[
        "torch>=1.8",  # every op is written with torch tensors
        "torchvision",  # deform_conv2d backs the deformable-convolution ops
        "numpy",  # the COCOeval fast path works on numpy arrays
    ],
    cmdclass={"build_py": BuildPyWithPth},
)
