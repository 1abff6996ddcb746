"""``ValidatingDatasetMapper``: detectron2's ``DatasetMapper`` that checks what it maps.

Same configuration, augmentations and output as ``DatasetMapper``; in addition it

- decodes images with :func:`~mrcnn_plugin.data.image_io.read_image_checked` (16-bit images
  scaled to 8 bits, unreadable files named);
- compares the record's height/width with the decoded image (:class:`ImageSizeMismatchError`
  names the file and both sizes);
- in training, checks the record with :class:`~mrcnn_plugin.data.validation.RecordChecker`
  against the decoded image size before any transform;
- turns an error raised by detectron2's annotation transforms into a :class:`BadRecordError`
  naming the file.

It never returns None (detectron2 v0.6's retry path for None fails on Python 3.11): skipping
is done around it, by :class:`~mrcnn_plugin.data.train_loader.BadRecordSkipper`.
"""

import copy
from typing import Optional

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .image_io import read_image_checked
from .validation import (
    BadImageError,
    BadRecordError,
    ImageSizeMismatchError,
    RecordChecker,
    describe_record,
)

__all__ = ["ValidatingDatasetMapper", "check_image_size_named"]

# Errors detectron2's transforms raise on annotations that slipped past the checks.
_TRANSFORM_ERRORS = (ValueError, TypeError, KeyError, IndexError, AssertionError)


def check_image_size_named(record: dict, image: np.ndarray) -> None:
    """detectron2's ``check_image_size`` with a message naming the file and both sizes: the
    record's height/width must equal the decoded image's; missing ones are filled in."""
    height, width = image.shape[:2]
    if "height" in record or "width" in record:
        expected = (record.get("width"), record.get("height"))
        if expected != (width, height):
            raise ImageSizeMismatchError(
                f"{describe_record(record)}: height/width: the record says "
                f"{expected[0]}x{expected[1]} (width x height) but the file decodes to "
                f"{width}x{height} (after its EXIF orientation, as detectron2 reads it)"
            )
    record.setdefault("height", height)
    record.setdefault("width", width)


class ValidatingDatasetMapper(DatasetMapper):
    """A ``DatasetMapper`` that raises :class:`BadRecordError` (naming the image file and the
    field) for malformed input instead of training on it or failing anonymously."""

    @configurable
    def __init__(self, is_train: bool = True, *, checker: Optional[RecordChecker] = None, **kwargs):
        """
        Args:
            checker: checks each training record; None skips the record checks (images are
                still decoded with the checked reader).
            kwargs: ``DatasetMapper``'s arguments (augmentations, image_format, ...).
        """
        super().__init__(is_train, **kwargs)
        self.checker = checker

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        ret["checker"] = RecordChecker.from_config(cfg)
        return ret

    def __call__(self, dataset_dict):
        record = copy.deepcopy(dataset_dict)  # modified below
        image = read_image_checked(record.get("file_name"), format=self.image_format)
        check_image_size_named(record, image)
        if self.is_train and self.checker is not None:
            self.checker.check(record)

        sem_seg = None
        if "sem_seg_file_name" in record:
            sem_seg_file = record.pop("sem_seg_file_name")
            try:  # label ids: read as stored, never rescaled
                sem_seg = utils.read_image(sem_seg_file, "L").squeeze(2)
            except Exception as e:
                raise BadImageError(f"{sem_seg_file}: sem_seg_file_name: {e}") from e

        aug_input = T.AugInput(image, sem_seg=sem_seg)
        transforms = self.augmentations(aug_input)
        image, sem_seg = aug_input.image, aug_input.sem_seg
        image_shape = image.shape[:2]
        # Tensors travel through DataLoader workers' shared memory; keep the layout contiguous.
        record["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if sem_seg is not None:
            record["sem_seg"] = torch.as_tensor(sem_seg.astype("long"))
        if self.proposal_topk is not None:
            utils.transform_proposals(
                record, image_shape, transforms, proposal_topk=self.proposal_topk
            )

        if not self.is_train:
            record.pop("annotations", None)
            return record
        if "annotations" in record:
            try:
                record["instances"] = self.annotations_to_instances(
                    record.pop("annotations"), transforms, image_shape
                )
            except BadRecordError:
                raise
            except _TRANSFORM_ERRORS as e:
                raise BadRecordError(
                    f"{describe_record(dataset_dict)}: annotations: detectron2 could not "
                    f"transform them ({type(e).__name__}: {e})"
                ) from e
        return record

    def annotations_to_instances(self, annotations, transforms, image_shape):
        """Transforms the non-crowd annotations with the image and returns detectron2
        ``Instances`` without empty boxes/masks (what ``DatasetMapper`` puts in "instances")."""
        annos = []
        for ann in annotations:
            if ann.get("iscrowd", 0) != 0:
                continue
            if not self.use_instance_mask:
                ann.pop("segmentation", None)
            if not self.use_keypoint:
                ann.pop("keypoints", None)
            annos.append(
                utils.transform_instance_annotations(
                    ann, transforms, image_shape, keypoint_hflip_indices=self.keypoint_hflip_indices
                )
            )
        instances = utils.annotations_to_instances(
            annos, image_shape, mask_format=self.instance_mask_format
        )
        if self.recompute_boxes:  # boxes of cropped masks are no longer tight
            instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
        return utils.filter_empty_instances(instances)
