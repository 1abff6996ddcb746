"""Synthetic data sets named in a config: "mrcnn_shapes_<split>", "mrcnn_persons_<split>",
"mrcnn_thin_shapes_<split>" (or another "<prefix>_<split>" starting with those) are generated under
``<data_root>/<prefix without "mrcnn_">`` when missing and registered by
:func:`register_synthetic_datasets`; nothing happens at import.
"""

import logging
import os
from typing import Dict, Iterable, List, Optional, Tuple

from detectron2.data import MetadataCatalog

from .persons import persons_metadata
from .register import register_synthetic
from .shapes import shapes_metadata
from .thin_shapes import register_thin_shapes, thin_shapes_metadata

logger = logging.getLogger(__name__)

# Data-set name prefix -> the kind register_synthetic understands.
SYNTHETIC_PREFIXES = {
    "mrcnn_shapes": "shapes",
    "mrcnn_persons": "persons",
    "mrcnn_thin_shapes": "thin_shapes",  # thin_shapes.py: the reproduction's data
}
DEFAULT_DATA_ROOT = os.environ.get("MRCNN_DATASETS", "datasets")


def split_synthetic_name(name: str) -> Optional[Tuple[str, str]]:
    """("mrcnn_shapes_val") -> ("shapes", "mrcnn_shapes"): (kind, prefix); None when ``name``
    is not a synthetic data set."""
    for start, kind in SYNTHETIC_PREFIXES.items():
        if name.startswith(start) and name.rsplit("_", 1)[-1] in ("train", "val"):
            return kind, name.rsplit("_", 1)[0]
    return None


def cfg_dataset_names(cfg) -> List[str]:
    """DATASETS.TRAIN + DATASETS.TEST, without repeats, in order."""
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    return list(dict.fromkeys(names))


def _register_kwargs(kind: str, cfg, sizes: Dict[str, Optional[int]]) -> dict:
    kwargs = {k: v for k, v in sizes.items() if v is not None}
    if kind == "shapes":
        # Generate as many classes as the model predicts.
        kwargs.setdefault("num_classes", cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    return kwargs


def register_synthetic_datasets(
    cfg, names: Iterable[str], data_root: str = DEFAULT_DATA_ROOT, **sizes: Optional[int]
) -> List[str]:
    """Generates (if needed) and registers the synthetic data sets among ``names``.

    Args:
        sizes: num_train, num_val, image_size, seed for the generator; None keeps its default.
    Returns:
        The names that were registered (the non-synthetic ones are left alone).
    """
    registered = []
    done = set()
    for name in names:
        parsed = split_synthetic_name(name)
        if parsed is None:
            continue
        kind, prefix = parsed
        if prefix not in done:
            root = os.path.join(data_root, prefix[len("mrcnn_") :])
            kwargs = _register_kwargs(kind, cfg, sizes)
            logger.info("Registering synthetic data set %s_* from %s (%s)", prefix, root, kwargs)
            if kind == "thin_shapes":
                register_thin_shapes(root=root, prefix=prefix, **kwargs)
            else:
                register_synthetic(kind, root=root, prefix=prefix, **kwargs)
            done.add(prefix)
        registered.append(name)
    return registered


def dataset_metadata(cfg, name: Optional[str]):
    """Metadata of data set ``name`` for drawing and for COCO category ids.

    A synthetic data set that is not registered gets its metadata without generating any
    file; an unknown name gives empty metadata (classes are then drawn as numbers).
    """
    if not name:
        return MetadataCatalog.get("__mrcnn_unknown_dataset__")
    # MetadataCatalog.get() creates empty entries (DefaultPredictor does so): look at fields.
    metadata = MetadataCatalog.get(name)
    parsed = split_synthetic_name(name)
    if parsed is not None and not metadata.get("thing_classes"):
        if parsed[0] == "shapes":
            metadata.set(**shapes_metadata(cfg.MODEL.ROI_HEADS.NUM_CLASSES))
        elif parsed[0] == "thin_shapes":
            metadata.set(**thin_shapes_metadata())
        else:
            metadata.set(**persons_metadata())
    return metadata
