#!/usr/bin/env python
"""Train or evaluate the plugin's Mask R-CNN; detectron2's ``tools/train_net.py`` flags.

    python tools/train_net.py --config-file configs/Synthetic/mask_rcnn_R_18_FPN_shapes.yaml
    python tools/train_net.py --config-file CFG --num-gpus 2 MODEL.DEVICE cpu   # 2 CPU processes
    python tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS model_final.pth

See ``python tools/train_net.py --help`` and :mod:`mrcnn_plugin.cli.train_net`.
"""

import mrcnn_plugin  # noqa: F401  (registers the plugin's components)
from mrcnn_plugin.cli.train_net import main

if __name__ == "__main__":
    main()
