"""What the tools share: the synthetic-data flags, and how a bad input is reported.

Every tool's ``main`` is wrapped in :func:`reports_bad_input`: an input the user gave that
cannot be used (a missing or unreadable file, a config or checkpoint the library refuses,
bad training data) ends the tool with ``mrcnn-<tool>: error: <message>`` on stderr and exit
status 2, as argparse does for bad flags. The library's messages name the file; any other
exception is a bug and keeps its traceback.
"""

import argparse
import functools
import sys
from typing import Callable, Dict, Optional

from ..checkpoint import CheckpointMismatchError, CheckpointReadError, UnsafeCheckpointError
from ..config import ConfigError
from ..data.catalog import DEFAULT_DATA_ROOT
from ..data.validation import BadDatasetError, BadRecordError, TooManyBadRecordsError
from ..plotting import MetricsFileError

# Errors about the user's input: OSError for missing or unreadable files, and the library's own
# (their messages name the file, and the line or key).
BAD_INPUT_ERRORS = (
    OSError,
    ConfigError,
    CheckpointReadError,
    UnsafeCheckpointError,
    CheckpointMismatchError,
    MetricsFileError,
    BadRecordError,
    BadDatasetError,
    TooManyBadRecordsError,
)
EXIT_BAD_INPUT = 2  # argparse's status for bad arguments


def reports_bad_input(prog: str) -> Callable:
    """Decorates a tool's ``main(argv=None)``: BAD_INPUT_ERRORS become one line on stderr,
    ``<prog>: error: <message>``, and exit status 2 (a traceback would show where in a library
    the file was read, not what is wrong with it). Other exceptions are bugs and propagate."""

    def decorate(main: Callable) -> Callable:
        @functools.wraps(main)
        def wrapped(argv=None):
            try:
                return main(argv)
            except BAD_INPUT_ERRORS as e:
                print(f"{prog}: error: {e}", file=sys.stderr)
                raise SystemExit(EXIT_BAD_INPUT) from None

        return wrapped

    return decorate


SYNTHETIC_SIZE_FLAGS = ("num_train", "num_val", "image_size", "seed")


def add_synthetic_arguments(parser: argparse.ArgumentParser) -> None:
    """--data-root and the generator sizes (--synthetic-num-train, ...)."""
    group = parser.add_argument_group(
        "synthetic data",
        "Used when DATASETS name mrcnn_shapes_* / mrcnn_persons_*; generated when missing.",
    )
    group.add_argument(
        "--data-root",
        default=DEFAULT_DATA_ROOT,
        help="folder of the synthetic data sets (default: $MRCNN_DATASETS or 'datasets')",
    )
    for field in SYNTHETIC_SIZE_FLAGS:
        group.add_argument(
            "--synthetic-" + field.replace("_", "-"),
            dest="synthetic_" + field,
            type=int,
            default=None,
            help=f"generator {field} (default: the generator's)",
        )


def synthetic_sizes(args: argparse.Namespace) -> Dict[str, Optional[int]]:
    """The generator sizes given on the command line (None for those not given)."""
    return {field: getattr(args, "synthetic_" + field, None) for field in SYNTHETIC_SIZE_FLAGS}
