"""Checks of training records in detectron2's data-set format ("dataset dicts").

detectron2 trusts its records: a NaN or negative-size box trains silently, a keypoint list of
the wrong length fails deep inside a transform, and none of its errors say which file or field
was at fault. :class:`RecordChecker` checks one record against what the Mask R-CNN mapper and
heads need and raises :class:`BadRecordError`, whose message reads
``<image path> (image_id 7): annotations[3].bbox: contains NaN: [nan, 0.0, 4.0, 4.0]``.

Crowd annotations (``iscrowd`` 1) are only type-checked: the mapper drops them before use.
A box of zero area is not an error: detectron2 drops it when mapping, so it is returned as a
note for the caller to count and log.
"""

import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
from detectron2.data.detection_utils import SizeMismatchError
from detectron2.structures import BoxMode

__all__ = [
    "BadDatasetError",
    "BadImageError",
    "BadRecordError",
    "ImageSizeMismatchError",
    "RecordChecker",
    "TooManyBadRecordsError",
    "describe_record",
    "record_error",
]

SUPPORTED_BOX_MODES = (BoxMode.XYXY_ABS, BoxMode.XYWH_ABS)


class BadRecordError(ValueError):
    """A training record that cannot be used. The message names the image file, the field
    (e.g. ``annotations[3].bbox``) and, once known, the data set and annotation file.

    Constructed from the message alone, so that a DataLoader worker can re-raise it.
    """


class BadImageError(BadRecordError):
    """The record's image file is missing, empty, not an image, truncated, too large for PIL's
    decompression-bomb guard, or in a pixel format that cannot be converted."""


class ImageSizeMismatchError(BadRecordError, SizeMismatchError):
    """The record's height/width differ from the decoded (EXIF-rotated) image. Also a
    detectron2 ``SizeMismatchError``, so code that catches that keeps working."""


class BadDatasetError(ValueError):
    """A registered data set could not be loaded at all (e.g. detectron2's COCO loader met a
    category id missing from the JSON's ``categories``). Not skippable: no record exists."""


class TooManyBadRecordsError(RuntimeError):
    """More records were skipped than ``DATALOADER.MRCNN.MAX_BAD_FRACTION`` / ``MAX_BAD_RECORDS``
    allow."""


def describe_record(record) -> str:
    """``"<file_name> (image_id <id>)"``, the prefix of every message about ``record``."""
    if not isinstance(record, dict):
        return f"record of type {type(record).__name__}"
    name = record.get("file_name")
    where = str(name) if isinstance(name, (str, os.PathLike)) else "record without a file_name"
    if "image_id" in record:
        where += f" (image_id {record['image_id']})"
    return where


def record_error(record, field: str, reason: str, cls=BadRecordError) -> BadRecordError:
    return cls(f"{describe_record(record)}: {field}: {reason}")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    return _is_int(value) or isinstance(value, (float, np.floating))


def _short(value, limit: int = 80) -> str:
    text = repr(value.tolist() if isinstance(value, np.ndarray) else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class RecordChecker:
    """Checks training records for the Mask R-CNN mapper; see :meth:`check`."""

    def __init__(
        self,
        *,
        num_classes: int,
        mask_on: bool = False,
        mask_format: str = "polygon",
        keypoint_on: bool = False,
        num_keypoints: int = 0,
    ):
        """
        Args:
            num_classes: valid category ids are [0, num_classes) (contiguous, as the model's).
            mask_on: every non-crowd annotation needs a "segmentation".
            mask_format: "polygon" or "bitmask" (INPUT.MASK_FORMAT); RLE needs "bitmask".
            keypoint_on: every non-crowd annotation needs "keypoints" of num_keypoints points.
        """
        self.num_classes = num_classes
        self.mask_on = mask_on
        self.mask_format = mask_format
        self.keypoint_on = keypoint_on
        self.num_keypoints = num_keypoints

    @classmethod
    def from_config(cls, cfg) -> "RecordChecker":
        return cls(
            num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            mask_on=cfg.MODEL.MASK_ON,
            mask_format=cfg.INPUT.MASK_FORMAT,
            keypoint_on=cfg.MODEL.KEYPOINT_ON,
            num_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS,
        )

    def check(self, record) -> List[str]:
        """Raises :class:`BadRecordError` for the first problem found in ``record``.

        Boxes are checked against the image when the record has height and width (the mapper
        calls this after it has set them from the decoded image).

        Returns:
            Notes about annotations detectron2 will drop (zero-area boxes), one per annotation.
        """
        if not isinstance(record, dict):
            raise record_error(record, "record", "must be a dict")
        name = record.get("file_name")
        if not isinstance(name, (str, os.PathLike)) or not str(name):
            raise record_error(record, "file_name", f"must be a non-empty path, got {_short(name)}")
        image_hw = self._image_size(record)
        annotations = record.get("annotations")
        if not isinstance(annotations, list):
            reason = "missing" if annotations is None else f"is a {type(annotations).__name__}"
            raise record_error(record, "annotations", f"{reason}; training needs a list")
        notes = []
        for i, ann in enumerate(annotations):
            note = self._check_annotation(record, f"annotations[{i}]", ann, image_hw)
            if note:
                notes.append(note)
        return notes

    def _image_size(self, record) -> Optional[Tuple[int, int]]:
        if "height" not in record and "width" not in record:
            return None
        size = []
        for field in ("height", "width"):
            value = record.get(field)
            if value is None:
                raise record_error(record, field, "missing while the other of height/width is set")
            integral = _is_int(value) or (isinstance(value, float) and value.is_integer())
            if not integral or value <= 0:
                raise record_error(record, field, f"must be a positive int, got {_short(value)}")
            size.append(int(value))
        return size[0], size[1]

    def _check_annotation(self, record, where: str, ann, image_hw) -> Optional[str]:
        if not isinstance(ann, dict):
            raise record_error(record, where, f"must be a dict, got {type(ann).__name__}")
        crowd = ann.get("iscrowd", 0)
        if not (_is_int(crowd) or isinstance(crowd, bool)) or crowd not in (0, 1):
            raise record_error(record, where + ".iscrowd", f"must be 0 or 1, got {_short(crowd)}")
        if crowd:
            return None
        category = ann.get("category_id")
        if not _is_int(category):
            raise record_error(
                record, where + ".category_id", f"must be an int, got {_short(category)}"
            )
        if not 0 <= category < self.num_classes:
            raise record_error(
                record,
                where + ".category_id",
                f"{category} is outside [0, {self.num_classes}) (MODEL.ROI_HEADS.NUM_CLASSES)",
            )
        note = self._check_box(record, where, ann, image_hw)
        if self.mask_on:
            self._check_segmentation(record, where + ".segmentation", ann, image_hw)
        if self.keypoint_on:
            self._check_keypoints(record, where + ".keypoints", ann)
        return note

    @staticmethod
    def _numbers(record, field: str, value, length: Optional[int] = None) -> np.ndarray:
        """``value`` as a float64 vector; it must be a list/tuple/1-D array of real numbers."""
        ok = isinstance(value, (list, tuple)) and all(_is_real(v) for v in value)
        if isinstance(value, np.ndarray):
            ok = value.ndim == 1 and (value.dtype.kind in "iuf")
        if not ok:
            raise record_error(record, field, f"must be a list of numbers, got {_short(value)}")
        array = np.asarray(value, dtype=np.float64)
        if length is not None and len(array) != length:
            raise record_error(record, field, f"has {len(array)} numbers, needs {length}")
        return array

    @staticmethod
    def _finite(record, field: str, array: np.ndarray, value) -> None:
        """``value``, the field as stored, is what the message shows."""
        if np.isnan(array).any():
            raise record_error(record, field, f"contains NaN: {_short(value)}")
        if np.isinf(array).any():
            raise record_error(record, field, f"contains Inf: {_short(value)}")

    def _check_box(self, record, where: str, ann, image_hw) -> Optional[str]:
        if "bbox_mode" not in ann:
            raise record_error(record, where + ".bbox_mode", "missing (a detectron2 BoxMode)")
        try:
            mode = BoxMode(ann["bbox_mode"])
        except ValueError:
            raise record_error(
                record, where + ".bbox_mode", f"{_short(ann['bbox_mode'])} is not a BoxMode"
            ) from None
        if mode not in SUPPORTED_BOX_MODES:
            raise record_error(
                record, where + ".bbox_mode", f"{mode.name} is not supported; use XYXY_ABS/XYWH_ABS"
            )
        field = where + ".bbox"
        if "bbox" not in ann:
            raise record_error(record, field, "missing")
        shown = _short(ann["bbox"])
        box = self._numbers(record, field, ann["bbox"], 4)
        self._finite(record, field, box, ann["bbox"])
        x0, y0 = box[0], box[1]
        if mode == BoxMode.XYWH_ABS:
            w, h = box[2], box[3]
        else:
            w, h = box[2] - box[0], box[3] - box[1]
        if w < 0 or h < 0:
            raise record_error(record, field, f"negative size {w:g} x {h:g} ({mode.name} {shown})")
        if image_hw is not None:
            height, width = image_hw
            if x0 >= width or y0 >= height or x0 + w <= 0 or y0 + h <= 0:
                raise record_error(
                    record, field, f"{shown} lies outside the {width}x{height} image"
                )
        if w == 0 or h == 0:
            return f"{describe_record(record)}: {field}: zero area {shown}"
        return None

    def _check_segmentation(self, record, field: str, ann, image_hw) -> None:
        segm = ann.get("segmentation")
        if segm is None:
            raise record_error(record, field, "missing while MODEL.MASK_ON is True")
        if isinstance(segm, list):
            self._check_polygons(record, field, segm)
        elif isinstance(segm, dict):
            self._check_rle(record, field, segm, image_hw)
        else:
            raise record_error(
                record,
                field,
                f"must be polygons (list of lists) or COCO RLE (dict), got {type(segm).__name__}",
            )

    def _check_polygons(self, record, field: str, polygons: list) -> None:
        if not polygons:
            raise record_error(record, field, "has no polygons")
        for j, polygon in enumerate(polygons):
            where = f"{field}[{j}]"
            coords = self._numbers(record, where, polygon)
            if len(coords) % 2:
                raise record_error(
                    record, where, f"has an odd number ({len(coords)}) of coordinates"
                )
            if len(coords) < 6:
                raise record_error(
                    record, where, f"has {len(coords) // 2} points; a polygon needs at least 3"
                )
            self._finite(record, where, coords, polygon)

    def _check_rle(self, record, field: str, rle: dict, image_hw) -> None:
        if self.mask_format != "bitmask":
            raise record_error(
                record,
                field,
                f"is RLE, which needs INPUT.MASK_FORMAT 'bitmask' (it is '{self.mask_format}')",
            )
        size = rle.get("size")
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(map(_is_int, size))):
            raise record_error(record, field + ".size", f"must be [height, width], got {size!r}")
        counts = rle.get("counts")
        if isinstance(counts, list):
            raise record_error(
                record,
                field + ".counts",
                "is uncompressed RLE; compress it with pycocotools.mask.frPyObjects",
            )
        if not isinstance(counts, (str, bytes)):
            raise record_error(
                record, field + ".counts", f"must be str or bytes, got {type(counts).__name__}"
            )
        if image_hw is not None and tuple(size) != tuple(image_hw):
            raise record_error(
                record, field + ".size", f"{list(size)} differs from the image's {list(image_hw)}"
            )

    def _check_keypoints(self, record, field: str, ann) -> None:
        if "keypoints" not in ann:
            raise record_error(record, field, "missing while MODEL.KEYPOINT_ON is True")
        want = 3 * self.num_keypoints
        values = self._numbers(record, field, ann["keypoints"])
        if len(values) != want:
            raise record_error(
                record,
                field,
                f"has {len(values)} numbers, needs 3 x {self.num_keypoints} = {want} "
                "(MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS)",
            )
        self._finite(record, field, values, ann["keypoints"])
        visibility = values[2::3]
        bad = np.flatnonzero(~np.isin(visibility, (0, 1, 2)))
        if len(bad):
            k = int(bad[0])
            raise record_error(
                record, field, f"visibility {visibility[k]:g} of keypoint {k} is not 0, 1 or 2"
            )


def first_lines(messages: Sequence[str], limit: int = 5) -> str:
    """Up to ``limit`` messages, one per line, and how many were left out."""
    shown = "\n".join(f"  - {m}" for m in messages[:limit])
    more = len(messages) - limit
    return shown + (f"\n  ... and {more} more" if more > 0 else "")


def fraction_text(count: int, total: int) -> str:
    return f"{count} of {total} ({100.0 * count / max(total, 1):.2f}%)"
