#!/usr/bin/env python
"""Export a model to TorchScript (traced) or ONNX and verify it against eager outputs.

    python tools/export.py --config-file CFG --format torchscript --output out/ \\
        --sample-image a.png b.png c.png --opts MODEL.WEIGHTS output/model_final.pth

See ``python tools/export.py --help`` and :mod:`mrcnn_plugin.cli.export`.
"""

import mrcnn_plugin  # noqa: F401  (registers the plugin's components)
from mrcnn_plugin.cli.export import main

if __name__ == "__main__":
    main()
