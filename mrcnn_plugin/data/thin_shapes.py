"""The "thin shapes" data set: thin and small objects, where a one-pixel shift of the RoI
features costs a large share of a mask's IoU (the reproduction's data, ``mrcnn-reproduce``).

Each image holds 1-4 objects of three classes: "ring" (an annulus), "bar" (a rotated thin
rectangle) and "cross" (two crossing thin bars), 14-60 px across at 128 px, with strokes a
quarter to two fifths of the half extent (2-10 px),
drawn in distinct colours on the textured backgrounds of the other synthetic sets. Objects do
not overlap (each placement keeps a 2 px gap to the earlier ones, re-drawn up to a few times or
left out), so every mask is its object's painted pixels. On a stroke of 2-4 px a mask shifted
by one pixel drops below IoU 0.75, and RoIPool's rounding to the stride-16 grid shifts the
features by up to 8 px, which is why mask AP75 separates the RoI ops (paper Table 2c/2d) here
more than on the solid shapes.
"""

import functools
from typing import Dict, List, Tuple

import cv2
import numpy as np

from .common import (
    check_params,
    distinct_color,
    ensure_generated,
    finish_image,
    mask_annotation,
    random_background,
)
from .register import _register_splits as register_splits

THIN_CLASSES = ("ring", "bar", "cross")
MAX_INSTANCES = 4
MIN_AREA = 30  # pixels at 128 px
_PLACEMENT_TRIES = 10
_GAP = 2  # pixels kept free around each earlier object


def thin_shapes_categories() -> List[dict]:
    """COCO "categories" (ids 1..3)."""
    return [
        {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(THIN_CLASSES)
    ]


def thin_shapes_metadata() -> dict:
    """detectron2 metadata fields of the data set."""
    return {
        "thing_classes": list(THIN_CLASSES),
        "thing_dataset_id_to_contiguous_id": {i + 1: i for i in range(len(THIN_CLASSES))},
    }


def _bar(mask: np.ndarray, center, half_length: float, angle: float, thickness: int):
    d = np.array([np.cos(angle), np.sin(angle)]) * half_length
    p0 = tuple(int(v) for v in np.rint(np.asarray(center) - d))
    p1 = tuple(int(v) for v in np.rint(np.asarray(center) + d))
    cv2.line(mask, p0, p1, 1, thickness)


def draw_thin_shape(
    name: str, center, radius: float, angle: float, thickness: int, size: int
) -> np.ndarray:
    """Binary mask (size, size) bool of one object; ``radius`` is its half extent."""
    mask = np.zeros((size, size), np.uint8)
    if name == "ring":
        c = (int(round(center[0])), int(round(center[1])))
        cv2.circle(mask, c, max(int(round(radius - thickness / 2)), 1), 1, thickness)
    elif name == "bar":
        _bar(mask, center, radius, angle, thickness)
    elif name == "cross":
        _bar(mask, center, radius, angle, thickness)
        _bar(mask, center, radius * 0.7, angle + np.pi / 2, thickness)
    else:
        raise ValueError(f"unknown thin shape {name!r}; choose one of {THIN_CLASSES}")
    return mask.astype(bool)


def render_thin_shapes_image(
    rng: np.random.Generator, image_size: int = 128
) -> Tuple[np.ndarray, List[dict]]:
    """Draws one image: (image_size, image_size, 3) uint8 RGB and its COCO annotations."""
    scale = image_size / 128
    image, avoid = random_background(rng, image_size)
    kernel = np.ones((2 * _GAP + 1, 2 * _GAP + 1), np.uint8)
    occupied = np.zeros((image_size, image_size), bool)
    layers = []  # (class index, mask, colour)
    for _ in range(int(rng.integers(1, MAX_INSTANCES + 1))):
        cls = int(rng.integers(len(THIN_CLASSES)))
        radius = rng.uniform(7, 25) * scale
        # Strokes a quarter to two fifths of the half extent (2-10 px at 128 px): thin enough
        # that a RoI shifted by a fraction of a stride-16 cell misses most of the stroke, thick
        # enough that a 14x14 mask target (the C4 head's) still holds it.
        thickness = max(int(round(radius * rng.uniform(0.25, 0.4))), 2)
        color = distinct_color(rng, avoid + [layer[2] for layer in layers])
        for _ in range(_PLACEMENT_TRIES):
            center = rng.uniform(radius + 1, image_size - radius - 1, 2)
            mask = draw_thin_shape(
                THIN_CLASSES[cls], center, radius, rng.uniform(0, np.pi), thickness, image_size
            )
            if mask.sum() < MIN_AREA * scale * scale:
                continue
            grown = cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)
            if not (grown & occupied).any():
                occupied |= mask
                layers.append((cls, mask, color))
                break
    annotations = []
    for cls, mask, color in layers:
        image[mask] = color
        annotations.append({"category_id": cls + 1, **mask_annotation(mask)})
    return finish_image(rng, image), annotations


def generate_thin_shapes(
    root: str,
    seed: int = 0,
    num_train: int = 800,
    num_val: int = 100,
    image_size: int = 128,
    force: bool = False,
) -> Dict[str, Tuple[str, str]]:
    """Writes the data set under ``root`` unless an identical one is there already.

    Returns:
        {"train": (json_file, image_root), "val": (...)}, absolute paths.
    """
    check_params(
        seed=(seed, 0, None),
        num_train=(num_train, 0, None),
        num_val=(num_val, 0, None),
        image_size=(image_size, 32, 4096),
    )
    params = {
        "stroke": "0.25-0.4 radius",  # a different drawing than the first thin shapes
        "seed": int(seed),
        "num_train": int(num_train),
        "num_val": int(num_val),
        "image_size": int(image_size),
    }
    render = functools.partial(render_thin_shapes_image, image_size=params["image_size"])
    return ensure_generated(
        root, "thin_shapes", params, render, thin_shapes_categories(), force=force
    )


def register_thin_shapes(
    root: str = "datasets/thin_shapes",
    seed: int = 0,
    num_train: int = 800,
    num_val: int = 100,
    image_size: int = 128,
    prefix: str = "mrcnn_thin_shapes",
) -> Tuple[str, str]:
    """Generates (if needed) and registers "<prefix>_train" and "<prefix>_val" (as
    ``register.register_shapes`` does for the solid shapes); returns the two names."""
    params = {
        "root": root,
        "seed": seed,
        "num_train": num_train,
        "num_val": num_val,
        "image_size": image_size,
    }
    return register_splits(
        prefix, "thin_shapes", params, generate_thin_shapes, thin_shapes_metadata()
    )
