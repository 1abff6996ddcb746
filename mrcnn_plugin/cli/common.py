"""Command-line flags the tools share: the synthetic-data flags."""

import argparse
from typing import Dict, Optional

from ..data.catalog import DEFAULT_DATA_ROOT

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
