"""Image decoding for training records that names the file when it fails.

Same result as detectron2's ``read_image`` for the images it handles (EXIF orientation applied,
then ``convert_PIL_to_numpy`` to INPUT.FORMAT: palette, CMYK, RGBA (alpha dropped), grayscale
are converted by PIL), plus:

- 16-bit images are scaled to 8 bits (the high byte, as PIL already does for 48-bit RGB PNGs)
  instead of saturating: PIL's ``convert("RGB")`` clips a 16-bit grayscale PNG to 255 (white);
- a missing, empty, non-image or truncated file, an image over PIL's decompression-bomb guard
  (``Image.MAX_IMAGE_PIXELS``: its warning counts as an error here), and pixel formats with no
  8-bit meaning (32-bit integer, float) raise :class:`BadImageError` naming the file.

The file is read once and decoded once.
"""

import io
import os
import warnings
from typing import Optional

import numpy as np
from detectron2.data.detection_utils import convert_PIL_to_numpy
from detectron2.utils.file_io import PathManager
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .validation import BadImageError

__all__ = ["read_image_checked", "to_8bit"]

EXIF_ORIENTATION_TAG = 0x0112
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def _error(file_name, reason: str) -> BadImageError:
    return BadImageError(f"{file_name}: file_name: {reason}")


def _read_bytes(file_name) -> bytes:
    if not isinstance(file_name, (str, os.PathLike)) or not str(file_name):
        raise BadImageError(f"record: file_name: must be a non-empty path, got {file_name!r}")
    try:
        with PathManager.open(str(file_name), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise _error(file_name, "image file not found") from None
    except OSError as e:
        raise _error(file_name, f"cannot read the image file ({type(e).__name__}: {e})") from e
    if not data:
        raise _error(file_name, "image file is empty (0 bytes)")
    return data


def _decode(file_name, data: bytes) -> Image.Image:
    """Opens and fully decodes ``data``; the decompression-bomb warning becomes an error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()  # PIL decodes lazily: truncation only shows here
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _error(
            file_name,
            f"refused by PIL's decompression-bomb guard ({e}); if the file is genuine, raise "
            "PIL.Image.MAX_IMAGE_PIXELS",
        ) from e
    except UnidentifiedImageError as e:
        raise _error(
            file_name, f"not an image file PIL can decode (it starts with {data[:16]!r})"
        ) from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib.error, ...
        hint = ""
        if "truncated" in str(e) and not ImageFile.LOAD_TRUNCATED_IMAGES:
            hint = " (PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True would accept partial images)"
        raise _error(
            file_name, f"truncated or corrupt image data ({type(e).__name__}: {e}){hint}"
        ) from e
    return image


def _is_sixteen_bit(image: Image.Image) -> bool:
    # PIL < 10 opens 16-bit grayscale PNGs as "I" (int32); PNG has no 32-bit samples.
    return image.mode in SIXTEEN_BIT_MODES or (image.mode == "I" and image.format == "PNG")


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION_TAG)
    except Exception:  # unreadable EXIF: keep the image as stored, as detectron2 does
        return image
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(image)
    return image


def to_8bit(image: Image.Image, sixteen_bit: bool, file_name="image") -> Image.Image:
    """A 16-bit image as 8-bit "L" (value >> 8); other images unchanged. 32-bit integer and
    float images raise :class:`BadImageError`: their range is unknown."""
    if sixteen_bit:
        values = np.asarray(image).astype(np.uint32)
        return Image.fromarray((values >> 8).astype(np.uint8), mode="L")
    if image.mode in ("I", "F"):
        kind = "32-bit integer" if image.mode == "I" else "floating-point"
        raise _error(file_name, f"{kind} pixels (PIL mode {image.mode}) have no 8-bit range")
    return image


def read_image_checked(file_name, format: Optional[str] = None) -> np.ndarray:
    """Like detectron2's ``read_image(file_name, format)``; 16-bit images are scaled to 8 bits.

    Returns:
        (H, W, C) array in ``format`` (uint8; float for "YUV-BT.601"), EXIF orientation applied.
    Raises:
        BadImageError: the message starts with ``file_name`` and says what is wrong.
    """
    image = _decode(file_name, _read_bytes(file_name))
    sixteen_bit = _is_sixteen_bit(image)
    image = _apply_exif_orientation(image)
    image = to_8bit(image, sixteen_bit, file_name)
    try:
        return convert_PIL_to_numpy(image, format)
    except ValueError as e:  # e.g. PIL cannot convert "LAB" or "HSV" to RGB
        raise _error(
            file_name, f"cannot convert PIL mode {image.mode} to INPUT.FORMAT {format} ({e})"
        ) from e
