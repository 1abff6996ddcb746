"""The "shapes" data set: filled geometric shapes on textured backgrounds.

Each image holds 1-5 shapes of varied size, colour and rotation. Shapes are drawn in order, so
later ones occlude earlier ones; every annotation is the VISIBLE part of its shape, which makes
the masks of one image pairwise disjoint and equal to the pixels painted in its colour. A
placement that would leave an earlier shape mostly hidden (or tiny) is re-drawn, and a shape
that finds no such placement is left out entirely, so no unlabelled fragment is ever painted.
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

SHAPE_CLASSES = ("circle", "square", "triangle", "star", "hexagon")
DEFAULT_NUM_CLASSES = 3
# Sized so that the CPU R18-FPN learns the set in minutes (see README): up to 4 shapes, each
# kept at least 65% visible and whole inside the image. Occlusion still happens often.
MAX_INSTANCES = 4
# An earlier shape must keep this fraction of its pixels (and MIN_AREA at 128 px) visible.
MIN_VISIBLE_FRACTION = 0.65
MIN_AREA = 40
_PLACEMENT_TRIES = 12


def shapes_categories(num_classes: int = DEFAULT_NUM_CLASSES) -> List[dict]:
    """COCO "categories" (ids 1..num_classes) of the first ``num_classes`` shape classes."""
    return [
        {"id": i + 1, "name": name, "supercategory": "shape"}
        for i, name in enumerate(SHAPE_CLASSES[:num_classes])
    ]


def shapes_metadata(num_classes: int = DEFAULT_NUM_CLASSES) -> dict:
    """detectron2 metadata fields of the data set (thing_classes is a list, as load_coco_json
    sets it, so the two never conflict)."""
    names = list(SHAPE_CLASSES[:num_classes])
    return {
        "thing_classes": names,
        "thing_dataset_id_to_contiguous_id": {i + 1: i for i in range(num_classes)},
    }


def _polygon(center, radius, angle, corners, inner=None) -> np.ndarray:
    """Vertices (K, 2) int32 of a regular polygon; ``inner`` radius ratio makes it a star."""
    count = corners * 2 if inner else corners
    theta = angle + np.arange(count) * 2 * np.pi / count
    radii = np.full(count, radius)
    if inner:
        radii[1::2] *= inner
    pts = np.stack([center[0] + radii * np.cos(theta), center[1] + radii * np.sin(theta)], 1)
    return np.rint(pts).astype(np.int32)


def draw_shape(name: str, center, radius: float, angle: float, size: int) -> np.ndarray:
    """Binary mask (size, size) bool of one filled shape. ``radius`` is a nominal half extent;
    the polygons are scaled so the classes cover comparable areas."""
    mask = np.zeros((size, size), np.uint8)
    if name == "circle":
        cv2.circle(mask, (int(round(center[0])), int(round(center[1]))), int(round(radius)), 1, -1)
        return mask.astype(bool)
    corners, scale, inner = {
        "square": (4, 1.2, None),
        "triangle": (3, 1.35, None),
        "star": (5, 1.4, 0.5),
        "hexagon": (6, 1.05, None),
    }[name]
    cv2.fillPoly(mask, [_polygon(center, radius * scale, angle, corners, inner)], 1)
    return mask.astype(bool)


def render_shapes_image(
    rng: np.random.Generator, image_size: int = 128, num_classes: int = DEFAULT_NUM_CLASSES
) -> Tuple[np.ndarray, List[dict]]:
    """Draws one image.

    Returns:
        image: (image_size, image_size, 3) uint8 RGB.
        annotations: COCO annotation dicts (no ids), one per visible shape, in drawing order.
    """
    scale = image_size / 128
    image, avoid = random_background(rng, image_size)
    min_area = MIN_AREA * scale * scale
    # Each layer: [class index, full mask, visible mask, colour].
    layers = []
    for _ in range(int(rng.integers(1, MAX_INSTANCES + 1))):
        cls = int(rng.integers(num_classes))
        radius = rng.uniform(13, 32) * scale
        color = distinct_color(rng, avoid + [layer[3] for layer in layers])
        for _ in range(_PLACEMENT_TRIES):
            if layers and rng.uniform() < 0.35:
                # Next to an earlier shape, so that occlusion is common.
                anchor = np.array(np.nonzero(layers[int(rng.integers(len(layers)))][2])).mean(1)
                center = anchor[::-1] + rng.normal(0, radius, 2)
                center = np.clip(center, radius, image_size - radius)
            else:
                center = rng.uniform(radius, image_size - radius, 2)
            mask = draw_shape(SHAPE_CLASSES[cls], center, radius, rng.uniform(0, 2 * np.pi),
                              image_size)  # fmt: skip
            if mask.sum() < min_area:
                continue
            if all(
                (v & ~mask).sum() >= max(min_area, MIN_VISIBLE_FRACTION * full.sum())
                for _, full, v, _ in layers
            ):
                for layer in layers:
                    layer[2] = layer[2] & ~mask
                layers.append([cls, mask, mask, color])
                break
    annotations = []
    for cls, full, visible, color in layers:
        image[full] = color
        annotations.append({"category_id": cls + 1, **mask_annotation(visible)})
    return finish_image(rng, image), annotations


def generate_shapes(
    root: str,
    seed: int = 0,
    num_train: int = 800,
    num_val: int = 100,
    image_size: int = 128,
    num_classes: int = DEFAULT_NUM_CLASSES,
    force: bool = False,
) -> Dict[str, Tuple[str, str]]:
    """Writes the shapes data set under ``root`` unless an identical one is there already.

    Returns:
        {"train": (json_file, image_root), "val": (...)}, absolute paths.
    """
    check_params(
        seed=(seed, 0, None),
        num_train=(num_train, 0, None),
        num_val=(num_val, 0, None),
        image_size=(image_size, 32, 4096),
        num_classes=(num_classes, 1, len(SHAPE_CLASSES)),
    )
    params = {
        "seed": int(seed),
        "num_train": int(num_train),
        "num_val": int(num_val),
        "image_size": int(image_size),
        "num_classes": int(num_classes),
    }
    render = functools.partial(
        render_shapes_image, image_size=params["image_size"], num_classes=params["num_classes"]
    )
    return ensure_generated(
        root, "shapes", params, render, shapes_categories(num_classes), force=force
    )
