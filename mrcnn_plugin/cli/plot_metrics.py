"""Plot a detectron2 training run: losses, learning rate and AP over iterations.

    mrcnn-plot-metrics output/shapes                 # writes output/shapes/metrics.png
    mrcnn-plot-metrics output/shapes/metrics.json --output curves.png --smooth 20

Draws the panels of :func:`mrcnn_plugin.plotting.make_figure` from a run's ``metrics.json``.
"""

import argparse
import sys
from typing import List, Optional

from ..plotting import plot_metrics
from .common import reports_bad_input


@reports_bad_input("mrcnn-plot-metrics")
def main(argv: Optional[List[str]] = None):
    """Console entry point; ``argv`` defaults to sys.argv[1:]."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("metrics", help="metrics.json, or the OUTPUT_DIR that holds it")
    parser.add_argument("--output", help="PNG to write (default: metrics.png beside it)")
    parser.add_argument(
        "--smooth", type=int, default=1, help="moving-average window for the losses"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.smooth < 1:
        parser.error("--smooth must be >= 1")
    print(f"wrote {plot_metrics(args.metrics, args.output, args.smooth)}")
    # No return value: a console script exits with it, and a path would read as a failure.
