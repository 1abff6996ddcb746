"""Pieces shared by the synthetic data sets: random generators, textured backgrounds, mask ->
COCO annotation, atomic file writes, validation of the written COCO JSON and the manifest that
decides whether files on disk can be reused.

Layout of a generated root::

    root/manifest.json          generator name, version and parameters (written last)
    root/<split>.json           COCO annotations of the split
    root/<split>/000000.png     the split's images (RGB)

The manifest is removed before a (re)generation starts and written only after every image and
JSON file is in place, so an interrupted run never leaves files that a later run would trust.
"""

import fcntl
import functools
import json
import os
import tempfile
from typing import Callable, Dict, List, Sequence, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_util

# Bump when the drawing code changes so cached data sets are regenerated.
GENERATOR_VERSION = 3
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val")
_SPLIT_STREAM = {"train": 0, "val": 1}

# A renderer draws one image: rng -> (RGB uint8 image (H, W, 3), annotations without ids).
Renderer = Callable[[np.random.Generator], Tuple[np.ndarray, List[dict]]]


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """One independent stream per (seed, split, image): image i never depends on split sizes."""
    return np.random.default_rng([seed, _SPLIT_STREAM[split], index])


@functools.lru_cache(maxsize=8)
def _pixel_grid(size: int) -> Tuple[np.ndarray, np.ndarray]:
    """(yy, xx) float32 (size, size) pixel coordinates, cached: backgrounds need them often."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def random_background(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, List[np.ndarray]]:
    """A textured background: smooth noise, a linear gradient or soft stripes.

    Returns the float32 image (size, size, 3) in [0, 255] and its two main colours (3,), which
    objects drawn on top should stay away from.
    """
    c0 = rng.uniform(0, 255, 3)
    # Limited contrast inside the background keeps the objects the salient thing.
    c1 = np.clip(c0 + rng.uniform(-70, 70, 3), 0, 255)
    kind = rng.integers(3)
    if kind == 0:
        cells = int(rng.integers(3, 9))
        coarse = rng.uniform(0, 1, (cells, cells)).astype(np.float32)
        t = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    else:
        yy, xx = _pixel_grid(size)
        angle = rng.uniform(0, np.pi)
        proj = np.float32(np.cos(angle)) * xx + np.float32(np.sin(angle)) * yy
        if kind == 1:
            t = (proj - proj.min()) / max(float(np.ptp(proj)), 1.0)
        else:
            period = rng.uniform(6, 24) * size / 128
            t = 0.5 + 0.5 * np.sin(proj * np.float32(2 * np.pi / period) + rng.uniform(0, 6.28))
    t = t[..., None]
    image = c0.astype(np.float32) + (c1 - c0).astype(np.float32) * t
    return image, [c0, c1]


def distinct_color(
    rng: np.random.Generator, avoid: Sequence[np.ndarray], min_l1: float = 120.0
) -> np.ndarray:
    """A random RGB colour (3,) far (L1) from every colour in ``avoid``; the best of 30 draws
    when none is far enough."""
    best, best_dist = None, -1.0
    for _ in range(30):
        color = rng.uniform(0, 255, 3)
        dist = min((float(np.abs(color - a).sum()) for a in avoid), default=1e9)
        if dist > best_dist:
            best, best_dist = color, dist
        if dist >= min_l1:
            break
    return best


def finish_image(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Adds mild uniform pixel noise (in [-3.5, 3.5]) to the float32 image (H, W, 3) and
    converts it to uint8 with rounding and saturation. Random bytes are much cheaper to draw
    than Gaussian samples, which matters at a few thousand images per run."""
    noise = (np.frombuffer(rng.bytes(image.size), np.uint8) & 7).reshape(image.shape)
    return cv2.add(image, noise.astype(np.float32) - np.float32(3.5), dtype=cv2.CV_8U)


def mask_annotation(mask: np.ndarray) -> dict:
    """COCO fields of a binary mask (H, W): RLE segmentation (counts as str), bbox [x, y, w, h]
    (tight pixel extent) and area (pixel count)."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    bbox = [float(v) for v in mask_util.toBbox(rle)]
    area = int(mask_util.area(rle))
    rle["counts"] = rle["counts"].decode("ascii")
    return {"segmentation": rle, "bbox": bbox, "area": area, "iscrowd": 0}


def _atomic_write(path: str, data: bytes):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, obj) -> None:
    """Writes JSON atomically (temporary file + os.replace); output is byte-stable."""
    _atomic_write(path, json.dumps(obj, separators=(",", ":")).encode("utf-8"))


def write_png(path: str, image_rgb: np.ndarray) -> None:
    """Writes an RGB uint8 image (H, W, 3) as PNG. Not atomic (a rename per image is slow on
    some file systems): the manifest, written last, is what marks a data set complete."""
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image_rgb[..., ::-1]))
    if not ok:
        raise RuntimeError(f"could not encode {path} as PNG")
    with open(path, "wb") as f:
        f.write(buf.tobytes())


def read_json(path: str, what: str):
    """Loads a JSON file; a parse error becomes a ValueError that names the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupted {what} (not valid JSON: {e})") from e


def _require(path: str, obj, field: str, types, where: str = ""):
    where = where or field
    if not isinstance(obj, dict) or field not in obj:
        raise ValueError(f"{path}: missing field '{where}'")
    value = obj[field]
    if not isinstance(value, types) or isinstance(value, bool):
        raise ValueError(f"{path}: field '{where}' has type {type(value).__name__}")
    return value


def validate_coco_json(path: str, num_keypoints: int = 0) -> dict:
    """Checks the fields this package writes; raises ValueError naming the file and the field.

    Returns the loaded dict.
    """
    data = read_json(path, "COCO annotation file")
    num = (int, float)
    images = _require(path, data, "images", list)
    annotations = _require(path, data, "annotations", list)
    categories = _require(path, data, "categories", list)
    for i, img in enumerate(images):
        for field, types in (("id", int), ("file_name", str), ("height", int), ("width", int)):
            _require(path, img, field, types, f"images[{i}].{field}")
    cat_ids = {
        _require(path, c, "id", int, f"categories[{i}].id") for i, c in enumerate(categories)
    }
    for i, ann in enumerate(annotations):
        for field, types in (("id", int), ("image_id", int), ("area", num), ("iscrowd", int)):
            _require(path, ann, field, types, f"annotations[{i}].{field}")
        where = f"annotations[{i}]"
        if _require(path, ann, "category_id", int, where + ".category_id") not in cat_ids:
            raise ValueError(f"{path}: field '{where}.category_id' is not in 'categories'")
        bbox = _require(path, ann, "bbox", list, where + ".bbox")
        if len(bbox) != 4 or not all(isinstance(v, num) for v in bbox):
            raise ValueError(f"{path}: field '{where}.bbox' must be 4 numbers [x, y, w, h]")
        segm = _require(path, ann, "segmentation", dict, where + ".segmentation")
        _require(path, segm, "counts", str, where + ".segmentation.counts")
        _require(path, segm, "size", list, where + ".segmentation.size")
        if num_keypoints:
            kpts = _require(path, ann, "keypoints", list, where + ".keypoints")
            if len(kpts) != 3 * num_keypoints:
                raise ValueError(f"{path}: field '{where}.keypoints' needs {3 * num_keypoints}")
            _require(path, ann, "num_keypoints", int, where + ".num_keypoints")
    return data


def split_paths(root: str, split: str) -> Tuple[str, str]:
    """(json_file, image_root) of a split, absolute."""
    root = os.path.abspath(root)
    return os.path.join(root, f"{split}.json"), os.path.join(root, split)


def _write_split(root, split, num_images, seed, render, categories, info) -> None:
    json_file, image_root = split_paths(root, split)
    os.makedirs(image_root, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        image, anns = render(image_rng(seed, split, index))
        file_name = f"{index:06d}.png"
        write_png(os.path.join(image_root, file_name), image)
        image_id = index + 1
        h, w = image.shape[:2]
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
    coco = {"info": info, "images": images, "annotations": annotations, "categories": categories}
    write_json(json_file, coco)


def _manifest_matches(root: str, kind: str, params: dict, num_keypoints: int) -> bool:
    """True when root holds a complete data set made by ``kind`` with exactly ``params``."""
    path = os.path.join(root, MANIFEST_NAME)
    if not os.path.exists(path):
        return False
    manifest = read_json(path, "manifest")
    found_kind = _require(path, manifest, "generator", str)
    if found_kind != kind:
        raise ValueError(
            f"{path}: field 'generator' is '{found_kind}' but a '{kind}' data set was requested;"
            " use another root"
        )
    if _require(path, manifest, "params", dict) != params:
        return False
    for split in SPLITS:
        json_file, image_root = split_paths(root, split)
        if not os.path.exists(json_file):
            return False
        coco = validate_coco_json(json_file, num_keypoints)
        if any(
            not os.path.exists(os.path.join(image_root, img["file_name"])) for img in coco["images"]
        ):
            return False
    return True


def ensure_generated(
    root: str,
    kind: str,
    params: Dict[str, int],
    render: Renderer,
    categories: List[dict],
    num_keypoints: int = 0,
    force: bool = False,
) -> Dict[str, Tuple[str, str]]:
    """Generates the data set under ``root`` unless a matching one is already there.

    Args:
        params: generation parameters; must hold "seed" and "num_<split>" for every split.
            They are stored in the manifest and compared on the next call.
        render: draws one image from its random generator (the same for every split).
        num_keypoints: > 0 makes the validation of reused files check keypoints.
    Returns:
        split -> (json_file, image_root), absolute paths.
    """
    root = os.path.abspath(root)
    params = {"version": GENERATOR_VERSION, **params}
    os.makedirs(root, exist_ok=True)
    # Under an exclusive lock: processes started together on one root (mrcnn-reproduce, one
    # per seed) generate it once, the others wait and reuse it. A read-only root (a shared copy
    # nobody writes into) is only read, without a lock.
    try:
        lock = open(os.path.join(root, ".generate.lock"), "w")
    except OSError:
        lock = None
    try:
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        _generate_unless_matching(root, kind, params, render, categories, num_keypoints, force)
    finally:
        if lock is not None:
            lock.close()
    return {split: split_paths(root, split) for split in SPLITS}


def _generate_unless_matching(root, kind, params, render, categories, num_keypoints, force):
    if force or not _manifest_matches(root, kind, params, num_keypoints):
        manifest_path = os.path.join(root, MANIFEST_NAME)
        if os.path.exists(manifest_path):
            os.remove(manifest_path)
        # Split sizes stay out of "info": a split's file must not depend on the other's size.
        base = {k: v for k, v in params.items() if not k.startswith("num_")}
        for split in SPLITS:
            info = {"description": f"mrcnn_plugin synthetic '{kind}' data set", **base}
            info["split"] = split
            n = params[f"num_{split}"]
            _write_split(root, split, n, params["seed"], render, categories, info)
        write_json(manifest_path, {"generator": kind, "params": params})


def check_params(**params) -> None:
    """Raises ValueError naming the first parameter that is not an int in its range.

    Each value is ``(value, minimum, maximum)``; maximum None means unbounded.
    """
    for name, (value, lo, hi) in params.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise ValueError(f"parameter '{name}' must be an int, got {value!r}")
        if value < lo or (hi is not None and value > hi):
            upper = "" if hi is None else f" and <= {hi}"
            raise ValueError(f"parameter '{name}' must be >= {lo}{upper}, got {value}")
