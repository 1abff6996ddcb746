#!/usr/bin/env python
"""Plot losses, learning rate and AP of a detectron2 run from its metrics.json.

    python tools/plot_metrics.py output/shapes [--output curves.png] [--smooth 20]

See :mod:`mrcnn_plugin.cli.plot_metrics`.
"""

from mrcnn_plugin.cli.plot_metrics import main

if __name__ == "__main__":
    main()
