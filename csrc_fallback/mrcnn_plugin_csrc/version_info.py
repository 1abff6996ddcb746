"""Build information queried by ``detectron2.utils.collect_env``."""

import torch

BUILD_NOTE = "none (mrcnn_plugin_csrc, pure PyTorch)"


def get_compiler_version():
    """Nothing was compiled: the ops are Python on top of PyTorch."""
    return BUILD_NOTE


def get_cuda_version():
    """No CUDA code was compiled; reports the CUDA runtime PyTorch itself was built with."""
    return f"{BUILD_NOTE}; torch CUDA runtime: {torch.version.cuda or 'not available'}"


def has_cuda():
    """False: no CUDA kernels were built (the ops still run on CUDA tensors via PyTorch).

    collect_env only uses this to decide whether to list compiled GPU architectures.
    """
    return False
