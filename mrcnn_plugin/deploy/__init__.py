"""Torch-free deployment of an exported Mask R-CNN / Keypoint R-CNN (``mrcnn-export --format
onnx``): :mod:`.onnx_runner` needs only numpy, opencv and onnxruntime.

This package imports nothing, and ``onnx_runner.py`` is one self-contained file that imports
no other module of the project, so it runs where neither torch nor detectron2 is installed:
``python path/to/onnx_runner.py --model model.onnx --input a.jpg --output out/`` (or copy the
file next to the model). ``import mrcnn_plugin.deploy.onnx_runner`` runs the package's
``mrcnn_plugin/__init__.py``, which imports torch and detectron2, so that path (and the
``mrcnn-deploy`` console script) is for the full environment.
"""
