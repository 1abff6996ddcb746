#!/usr/bin/env python
"""Draw a model's predictions on images or a video and write them as COCO JSON.

    python tools/demo.py --config-file CFG --input 'images/*.png' --output out/ \\
        --opts MODEL.WEIGHTS output/model_final.pth

See ``python tools/demo.py --help`` and :mod:`mrcnn_plugin.cli.demo`.
"""

import mrcnn_plugin  # noqa: F401  (registers the plugin's components)
from mrcnn_plugin.cli.demo import main

if __name__ == "__main__":
    main()
