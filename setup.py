"""mrcnn-plugin: Mask R-CNN as registered detectron2 components.

detectron2 itself is not listed in install_requires: it is not on PyPI under its own name.
``tools/install_env.sh`` (run by ``make``) keeps an existing detectron2 or installs v0.6 from
the registry's sources; see README.md.
"""

from setuptools import find_packages, setup

setup(
    name="mrcnn-plugin",
    version="0.1.0",
    description="Mask R-CNN (He et al., 2017) as a detectron2 plugin",
    packages=find_packages(include=["mrcnn_plugin", "mrcnn_plugin.*"]),
    python_requires=">=3.8",
    install_requires=[
        "torch>=1.10",  # the models and ops
        "torchvision>=0.11",  # fast roi_align / roi_pool / nms kernels behind the plugin's ops
        "numpy",  # synthetic data generation and evaluation
        "pycocotools>=2.0.2",  # COCO-format masks (RLE) and the COCOeval reference
        "Pillow",  # writes the synthetic images and the drawn predictions
        # cv2 is used by detectron2's Visualizer and the demo's video I/O; 4.11+ wheels need
        # numpy 2, which detectron2 v0.6 cannot use (see tools/detectron2_dist/setup.py).
        "opencv-python-headless>=4.5,<4.11",
        "matplotlib",  # training-curve plots
        "tqdm",  # progress bars in the demo and data generation
        "mrcnn-plugin-csrc",  # detectron2._C stand-in (csrc_fallback/), installed by make
    ],
    entry_points={
        "console_scripts": [
            "mrcnn-train=mrcnn_plugin.cli.train_net:main",
            "mrcnn-demo=mrcnn_plugin.cli.demo:main",
            "mrcnn-benchmark=mrcnn_plugin.cli.benchmark:main",
            "mrcnn-plot-metrics=mrcnn_plugin.cli.plot_metrics:main",
            "mrcnn-export=mrcnn_plugin.cli.export:main",
            # Full environment only; without torch run mrcnn_plugin/deploy/onnx_runner.py as a file.
            "mrcnn-deploy=mrcnn_plugin.deploy.onnx_runner:main",
            "mrcnn-reproduce=mrcnn_plugin.cli.reproduce:main",
        ],
    },
    extras_require={
        # ONNX export (mrcnn-export --format onnx) writes with onnx and verifies with
        # onnxruntime (installed by tools/install_env.sh); TorchScript export needs neither. The
        # TorchScript-based ONNX exporter is used, so onnxscript (dynamo exporter) is not needed.
        # Both resolve with detectron2 v0.6's numpy<1.24 (onnx 1.23.2, onnxruntime 1.32.0 and
        # ml_dtypes 0.5.4 on numpy 1.23.5).
        "export": ["onnx>=1.23,<1.24", "onnxruntime>=1.30,<1.33"],
        "dev": [
            "pytest>=7",  # the test suite
            "ruff==0.14.14",  # formatter and linter, pinned so CI formats like developers do
        ],
    },
)
