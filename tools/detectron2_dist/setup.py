"""Packages detectron2 v0.6's Python sources as a pip distribution named ``detectron2``.

The registry's ``pb1-detectron2==0.6`` sdist holds the official v0.6 Python sources and
model-zoo configs but not the C++ sources, so its own ``setup.py`` cannot build. This file
is copied next to the unpacked sources by ``tools/install_env.sh`` and installs them
without any extension module: ``detectron2._C`` is supplied by ``mrcnn_plugin_csrc``.

The pins below keep v0.6 working with today's libraries; each is exercised by
``tests/test_environment_pins.py``.
"""

from setuptools import find_packages, setup

# detectron2.projects.<name> -> projects/<Dir>/<name>, as detectron2's own setup.py maps them
# for a non-editable install (its import finder only serves in-place checkouts).
PROJECTS = {"point_rend": "PointRend", "deeplab": "DeepLab", "panoptic_deeplab": "Panoptic-DeepLab"}

setup(
    name="detectron2",
    version="0.6",
    description="detectron2 v0.6 Python sources (no compiled ops), repackaged by mrcnn-plugin",
    url="https://github.com/facebookresearch/detectron2",
    license="Apache-2.0",
    packages=find_packages(include=["detectron2", "detectron2.*"])
    + [f"detectron2.projects.{name}" for name in PROJECTS],
    package_dir={f"detectron2.projects.{n}": f"projects/{d}/{n}" for n, d in PROJECTS.items()},
    package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]},
    include_package_data=False,
    python_requires=">=3.8",
    install_requires=[
        # v0.6's own runtime requirements (its setup.py), black excluded: only
        # LazyConfig.save uses it, and it imports it lazily.
        "matplotlib",
        "pycocotools>=2.0.2",
        "termcolor>=1.1",
        "yacs>=0.1.8",
        "tabulate",
        "cloudpickle",
        "tqdm>4.29.0",
        "tensorboard",
        "fvcore>=0.1.5,<0.1.6",
        "iopath>=0.1.7,<0.1.10",
        "omegaconf>=2.1",
        "hydra-core>=1.1",
        # data/transforms/transform.py uses Image.LINEAR, removed in Pillow 10.
        "Pillow>=7.1,<10",
        # structures/masks.py and two evaluators use np.bool / np.float, removed in 1.24.
        "numpy<1.24",
        # model_zoo/model_zoo.py imports pkg_resources: deprecated in setuptools 81, gone in 82.
        "setuptools<81",
    ],
)
