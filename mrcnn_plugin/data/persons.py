"""The "persons" data set: articulated stick figures with the 17 COCO person keypoints.

A figure is a filled head circle, a filled torso and limb lines of some thickness, in one colour,
with a random lean, head tilt and random shoulder/elbow/hip/knee angles. Every figure faces the
camera and has a face (two dark eye dots above a nose dot), so the person's left side is on the
image's right as in COCO's frontal views. That cue survives horizontal flips with
``keypoint_flip_map`` (a flipped front-facing figure is again front-facing with its sides
swapped), unlike colour-coded sides, which a flip would contradict.

Figures are drawn in order; later figures occlude earlier ones. Masks and boxes are the visible
part. Keypoint flags: 2 visible, 1 inside the image but covered by a later figure, 0 outside the
image (stored as 0, 0, 0). Keypoints are integer pixel indices, the pixels the joints are drawn
at, so a visible keypoint always lies on its figure's mask.
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

KEYPOINT_NAMES = (
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
)
KEYPOINT_FLIP_MAP = tuple(
    (name, "right_" + name[len("left_") :]) for name in KEYPOINT_NAMES if name.startswith("left_")
)
# COCO's per-keypoint OKS sigmas (cocoapi's COCOeval defaults).
KEYPOINT_OKS_SIGMAS = tuple(
    s / 10.0
    for s in (.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89)
)  # fmt: skip
_LINKS = (
    ("left_ear", "left_eye"), ("left_eye", "nose"), ("nose", "right_eye"),
    ("right_eye", "right_ear"), ("left_shoulder", "right_shoulder"),
    ("left_shoulder", "left_elbow"), ("left_elbow", "left_wrist"),
    ("right_shoulder", "right_elbow"), ("right_elbow", "right_wrist"),
    ("left_shoulder", "left_hip"), ("right_shoulder", "right_hip"), ("left_hip", "right_hip"),
    ("left_hip", "left_knee"), ("left_knee", "left_ankle"),
    ("right_hip", "right_knee"), ("right_knee", "right_ankle"),
)  # fmt: skip


def _link_color(a: str, b: str) -> Tuple[int, int, int]:
    """Orange for links on the person's left, blue on the right, green across the body."""
    sides = {n.split("_")[0] for n in (a, b)} & {"left", "right"}
    return {("left",): (255, 140, 0), ("right",): (0, 140, 255)}.get(tuple(sides), (60, 200, 60))


# detectron2's keypoint_connection_rules: (name1, name2, RGB colour to draw the link with).
KEYPOINT_CONNECTION_RULES = tuple((a, b, _link_color(a, b)) for a, b in _LINKS)
# COCO "skeleton": the same links as 1-based keypoint indices.
SKELETON = tuple(
    [KEYPOINT_NAMES.index(a) + 1, KEYPOINT_NAMES.index(b) + 1]
    for a, b, _ in KEYPOINT_CONNECTION_RULES
)
MAX_FIGURES = 3
MIN_VISIBLE_FRACTION = 0.4
MIN_KEYPOINTS_IN_IMAGE = 12
_PLACEMENT_TRIES = 12
_K = {name: i for i, name in enumerate(KEYPOINT_NAMES)}
_FACE = {"nose", "left_eye", "right_eye", "left_ear", "right_ear"}
# Links drawn as limb lines; the face links lie inside the head circle.
_BODY_LINKS = tuple((a, b) for a, b, _ in KEYPOINT_CONNECTION_RULES if not {a, b} & _FACE)


def persons_categories() -> List[dict]:
    """COCO "categories" with the keypoint names and skeleton."""
    return [
        {
            "id": 1,
            "name": "person",
            "supercategory": "person",
            "keypoints": list(KEYPOINT_NAMES),
            "skeleton": [list(pair) for pair in SKELETON],
        }
    ]


def persons_metadata() -> dict:
    """detectron2 metadata fields: classes, keypoint names, flip map, links and OKS sigmas."""
    return {
        "thing_classes": ["person"],
        "thing_dataset_id_to_contiguous_id": {1: 0},
        "keypoint_names": KEYPOINT_NAMES,
        "keypoint_flip_map": KEYPOINT_FLIP_MAP,
        "keypoint_connection_rules": KEYPOINT_CONNECTION_RULES,
        "keypoint_oks_sigmas": list(KEYPOINT_OKS_SIGMAS),
    }


def _rot(v: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def random_pose(
    rng: np.random.Generator, pelvis: np.ndarray, height: float
) -> Tuple[np.ndarray, np.ndarray]:
    """Random pose of one front-facing figure whose head-to-ankle extent is about ``height``.

    Returns:
        joints (17, 2) float and the head centre (2,) float, (x, y) in image pixels.
    """
    up = _rot(np.array([0.0, -1.0]), rng.uniform(-0.35, 0.35))  # torso lean
    side = np.array([-up[1], up[0]])  # towards image right = the person's left
    k = np.zeros((17, 2))
    neck = pelvis + up * 0.30 * height
    for sign, prefix in ((1, "left_"), (-1, "right_")):
        k[_K[prefix + "shoulder"]] = neck + sign * side * 0.11 * height
        k[_K[prefix + "hip"]] = pelvis + sign * side * 0.07 * height
        # Limb angles are measured from "down", positive away from the body's midline.
        for root, mid, end, (lo, hi), bend, (l1, l2) in (
            ("shoulder", "elbow", "wrist", (-0.4, 2.9), 2.3, (0.17, 0.15)),
            ("hip", "knee", "ankle", (-0.15, 0.8), 1.0, (0.24, 0.23)),
        ):
            a = rng.uniform(lo, hi)
            b = a + rng.uniform(-bend, bend)
            k[_K[prefix + mid]] = k[_K[prefix + root]] + l1 * height * _limb_dir(up, sign, a)
            k[_K[prefix + end]] = k[_K[prefix + mid]] + l2 * height * _limb_dir(up, sign, b)
    head_up = _rot(up, rng.uniform(-0.3, 0.3))
    head_side = np.array([-head_up[1], head_up[0]])
    r = 0.1 * height
    head = neck + head_up * (r + 0.04 * height)
    k[_K["nose"]] = head - head_up * 0.15 * r
    for sign, prefix in ((1, "left_"), (-1, "right_")):
        k[_K[prefix + "eye"]] = head + head_up * 0.25 * r + sign * head_side * 0.4 * r
        k[_K[prefix + "ear"]] = head + head_up * 0.05 * r + sign * head_side * 0.9 * r
    return k, head


def _limb_dir(up: np.ndarray, sign: int, angle: float) -> np.ndarray:
    side = np.array([-up[1], up[0]]) * sign
    return -up * np.cos(angle) + side * np.sin(angle)


def draw_figure(
    joints: np.ndarray, head: np.ndarray, height: float, size: int
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rasterises a figure on a (size, size) canvas.

    Args:
        joints, head: (17, 2) and (2,) float positions from :func:`random_pose`.
    Returns:
        keypoints (17, 2) int pixel indices, the figure's mask (size, size) bool and the mask of
        its face features (size, size) bool, drawn in a contrasting shade on the head.
    """
    kp = np.rint(joints).astype(np.int64)
    p = {name: (int(kp[i, 0]), int(kp[i, 1])) for i, name in enumerate(KEYPOINT_NAMES)}
    thick = max(2, int(round(0.05 * height)))
    r = 0.1 * height
    mask = np.zeros((size, size), np.uint8)
    torso = [p["left_shoulder"], p["right_shoulder"], p["right_hip"], p["left_hip"]]
    cv2.fillPoly(mask, [np.array(torso, np.int32)], 1)
    for a, b in _BODY_LINKS:
        cv2.line(mask, p[a], p[b], 1, thick)
    shoulders = (joints[_K["left_shoulder"]] + joints[_K["right_shoulder"]]) / 2
    head_px = (int(round(head[0])), int(round(head[1])))
    cv2.line(mask, (int(round(shoulders[0])), int(round(shoulders[1]))), head_px, 1, thick)
    cv2.circle(mask, head_px, int(round(r)), 1, -1)
    dot = max(1, int(round(0.13 * r)))
    for name in ("left_ear", "right_ear"):  # small bumps on the head's sides
        cv2.circle(mask, p[name], dot + 1, 1, -1)
    # Rounding may leave a joint pixel just off its drawn part: the keypoint must be on it.
    inside = ((kp >= 0) & (kp < size)).all(1)
    mask[kp[inside, 1], kp[inside, 0]] = 1
    face = np.zeros((size, size), np.uint8)
    for name in ("left_eye", "right_eye", "nose"):
        cv2.circle(face, p[name], dot, 1, -1)
    mask = mask.astype(bool)
    return kp, mask, face.astype(bool) & mask


def render_persons_image(
    rng: np.random.Generator, image_size: int = 160
) -> Tuple[np.ndarray, List[dict]]:
    """Draws one image.

    Returns:
        image: (image_size, image_size, 3) uint8 RGB.
        annotations: COCO annotation dicts (no ids) with "keypoints" [x, y, v] * 17 and
            "num_keypoints", one per figure, in drawing order.
    """
    size = image_size
    image, avoid = random_background(rng, size)
    figures = []  # [keypoints, full mask, visible mask, face mask, colour]
    for _ in range(int(rng.integers(1, MAX_FIGURES + 1))):
        color = distinct_color(rng, avoid + [f[4] for f in figures])
        for _ in range(_PLACEMENT_TRIES):
            height = rng.uniform(0.4, 0.75) * size
            pelvis = np.array(
                [rng.uniform(0.1, 0.9) * size, rng.uniform(0.45 * height, size - 0.37 * height)]
            )
            kp, mask, face = draw_figure(*random_pose(rng, pelvis, height), height, size)
            inside = ((kp >= 0) & (kp < size)).all(1)
            if inside.sum() < MIN_KEYPOINTS_IN_IMAGE:
                continue
            if all((f[2] & ~mask).sum() >= MIN_VISIBLE_FRACTION * f[1].sum() for f in figures):
                for f in figures:
                    f[2] = f[2] & ~mask
                figures.append([kp, mask, mask, face, color])
                break
    annotations = []
    for i, (kp, full, visible, face, color) in enumerate(figures):
        image[full] = color
        # Dark features on a light figure, light ones on a dark figure.
        image[face] = color * 0.3 + (0 if color.mean() > 110 else 170)
        later = np.zeros((size, size), bool)
        for f in figures[i + 1 :]:
            later |= f[1]
        annotations.append(
            {"category_id": 1, **mask_annotation(visible), **_keypoint_fields(kp, later)}
        )
    return finish_image(rng, image), annotations


def _keypoint_fields(kp: np.ndarray, covered: np.ndarray) -> dict:
    """COCO "keypoints" and "num_keypoints" of keypoints (17, 2) int, given the mask of the
    figures drawn later (size, size) bool."""
    size = covered.shape[0]
    values = []
    for x, y in kp.tolist():
        if 0 <= x < size and 0 <= y < size:
            values += [x, y, 1 if covered[y, x] else 2]
        else:
            values += [0, 0, 0]
    return {"keypoints": values, "num_keypoints": sum(v > 0 for v in values[2::3])}


def generate_persons(
    root: str,
    seed: int = 0,
    num_train: int = 800,
    num_val: int = 100,
    image_size: int = 160,
    force: bool = False,
) -> Dict[str, Tuple[str, str]]:
    """Writes the persons data set under ``root`` unless an identical one is there already.

    Returns:
        {"train": (json_file, image_root), "val": (...)}, absolute paths.
    """
    check_params(
        seed=(seed, 0, None),
        num_train=(num_train, 0, None),
        num_val=(num_val, 0, None),
        image_size=(image_size, 64, 4096),
    )
    params = {
        "seed": int(seed),
        "num_train": int(num_train),
        "num_val": int(num_val),
        "image_size": int(image_size),
    }
    render = functools.partial(render_persons_image, image_size=params["image_size"])
    return ensure_generated(
        root, "persons", params, render, persons_categories(), len(KEYPOINT_NAMES), force=force
    )
