"""Explicit registration of the synthetic data sets in detectron2's catalogs.

Nothing is registered at import. Each ``register_*`` call generates the files if they are
missing or were made with other parameters, then registers one COCO-format data set per split
through detectron2's public ``register_coco_instances``. Calling again with the same arguments
is a no-op; calling with other arguments under the same names replaces the registration.

The annotations hold RLE masks, so a training config needs ``INPUT.MASK_FORMAT = "bitmask"``
(detectron2's default "polygon" cannot hold RLE).
"""

import logging
import os
from typing import Callable, Dict, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from .common import SPLITS
from .persons import generate_persons, persons_metadata
from .shapes import DEFAULT_NUM_CLASSES, generate_shapes, shapes_metadata

logger = logging.getLogger(__name__)

# Metadata key holding the arguments a data set was registered with.
PARAMS_KEY = "mrcnn_synthetic_params"


def _register_splits(
    prefix: str, kind: str, params: dict, generate: Callable, metadata: dict
) -> Tuple[str, ...]:
    """Generates (if needed) and registers "<prefix>_<split>" for every split."""
    if not isinstance(prefix, str) or not prefix:
        raise ValueError(f"parameter 'prefix' must be a non-empty str, got {prefix!r}")
    names = tuple(f"{prefix}_{split}" for split in SPLITS)
    params = {"kind": kind, **params, "root": os.path.abspath(params["root"])}
    files = generate(**{k: v for k, v in params.items() if k != "kind"})
    for split, name in zip(SPLITS, names):
        registered = name in DatasetCatalog.list()
        if registered and MetadataCatalog.get(name).get(PARAMS_KEY) == params:
            continue
        if registered:
            logger.warning(f"Re-registering data set '{name}' with new parameters {params}")
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)  # stale metadata would refuse the new values
        json_file, image_root = files[split]
        register_coco_instances(name, {**metadata, PARAMS_KEY: params}, json_file, image_root)
    return names


def register_shapes(
    root: str = "datasets/shapes",
    seed: int = 0,
    num_train: int = 800,
    num_val: int = 100,
    image_size: int = 128,
    num_classes: int = DEFAULT_NUM_CLASSES,
    prefix: str = "mrcnn_shapes",
) -> Tuple[str, str]:
    """Generates (if needed) and registers the shapes data set.

    Returns:
        The registered names, ("<prefix>_train", "<prefix>_val").
    """
    params = {
        "root": root,
        "seed": seed,
        "num_train": num_train,
        "num_val": num_val,
        "image_size": image_size,
        "num_classes": num_classes,
    }
    return _register_splits(prefix, "shapes", params, generate_shapes, shapes_metadata(num_classes))


def register_persons(
    root: str = "datasets/persons",
    seed: int = 0,
    num_train: int = 800,
    num_val: int = 100,
    image_size: int = 160,
    prefix: str = "mrcnn_persons",
) -> Tuple[str, str]:
    """Generates (if needed) and registers the persons (keypoints) data set.

    Metadata carries keypoint_names, keypoint_flip_map, keypoint_connection_rules and
    keypoint_oks_sigmas (for ``COCOEvaluator(kpt_oks_sigmas=...)`` and
    ``cfg.TEST.KEYPOINT_OKS_SIGMAS``).

    Returns:
        The registered names, ("<prefix>_train", "<prefix>_val").
    """
    params = {
        "root": root,
        "seed": seed,
        "num_train": num_train,
        "num_val": num_val,
        "image_size": image_size,
    }
    return _register_splits(prefix, "persons", params, generate_persons, persons_metadata())


_REGISTER: Dict[str, Callable] = {"shapes": register_shapes, "persons": register_persons}


def register_synthetic(name: str, root: str, seed: int = 0, **sizes) -> Tuple[str, str]:
    """Dispatches to :func:`register_shapes` or :func:`register_persons` by ``name``
    ("shapes" or "persons"); ``sizes`` are their other keyword arguments (num_train, num_val,
    image_size, num_classes for shapes, prefix)."""
    if name not in _REGISTER:
        raise ValueError(f"unknown synthetic data set {name!r}; choose one of {sorted(_REGISTER)}")
    return _REGISTER[name](root=root, seed=seed, **sizes)
