"""Speed and memory of a config's model, measured side by side with detectron2's built-in
model of the same model-zoo config on the same weights and images.

Each (model, mode) is measured in a fresh subprocess, so its peak memory (max RSS on the CPU,
``torch.cuda.max_memory_allocated`` on a GPU) belongs to that measurement alone.

Shape shorthand: N images per batch, each (3, H, W) uint8 BGR.
"""

import resource
import statistics
import time
from contextlib import nullcontext
from typing import Dict, List

import torch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from .config import build_cfg

# The plugin's component names and detectron2's built-in ones they stand in for.
BUILTIN_NAMES = {
    "MRCNNResNet": "build_resnet_backbone",
    "MRCNNResNetFPN": "build_resnet_fpn_backbone",
    "MRCNNStandardROIHeads": "StandardROIHeads",
    "MRCNNRes5ROIHeads": "Res5ROIHeads",
    "MRCNNMaskHead": "MaskRCNNConvUpsampleHead",
    "MRCNNKeypointHead": "KRCNNConvDeconvUpsampleHead",
}


def use_builtin_components(cfg):
    """Swaps, in place, the plugin's component names in ``cfg`` for detectron2's built-in
    counterparts (same architecture and state_dict names) and maps the RoI op to a pooler type."""
    model = cfg.MODEL
    model.BACKBONE.NAME = BUILTIN_NAMES.get(model.BACKBONE.NAME, model.BACKBONE.NAME)
    model.ROI_HEADS.NAME = BUILTIN_NAMES.get(model.ROI_HEADS.NAME, model.ROI_HEADS.NAME)
    for head in (model.ROI_MASK_HEAD, model.ROI_KEYPOINT_HEAD):
        head.NAME = BUILTIN_NAMES.get(head.NAME, head.NAME)
    op = model.MRCNN.ROI_OP
    pooler = {"MRCNNRoIPool": "ROIPool"}.get(op.NAME, "ROIAlignV2" if op.ALIGNED else "ROIAlign")
    for head in (model.ROI_BOX_HEAD, model.ROI_MASK_HEAD, model.ROI_KEYPOINT_HEAD):
        head.POOLER_TYPE = pooler
    return cfg


def load_cfg(config_file: str, opts: List[str], builtin: bool):
    """The plugin cfg, or with ``builtin`` the same cfg using detectron2's components."""
    cfg = build_cfg(config_file, opts)
    if builtin:
        use_builtin_components(cfg)
    cfg.freeze()
    return cfg


def make_batch(cfg, num_images: int, height: int, width: int, seed: int = 0):
    """Random images with a few random boxes and box-filling masks as ground truth."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(num_images):
        image = torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8)
        xy = torch.rand(5, 2, generator=g) * torch.tensor([width * 0.6, height * 0.6])
        wh = 16 + torch.rand(5, 2, generator=g) * torch.tensor([width * 0.3, height * 0.3])
        boxes = torch.cat([xy, xy + wh], dim=1)
        masks = torch.zeros(5, height, width, dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[i, y0:y1, x0:x1] = True
        instances = Instances((height, width))
        instances.gt_boxes = Boxes(boxes)
        instances.gt_classes = torch.randint(0, cfg.MODEL.ROI_HEADS.NUM_CLASSES, (5,), generator=g)
        instances.gt_masks = BitMasks(masks)
        batch.append({"image": image, "height": height, "width": width, "instances": instances})
    return batch


def _autocast(device: str, precision: str):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.split(":")[0], dtype=dtype)


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(cfg, state_dict, mode: str, images: int, height: int, width: int,
            warmup: int, repeats: int, precision: str) -> Dict[str, float]:  # fmt: skip
    """Times ``repeats`` inference passes (one image each) or training steps (``images``
    per step) after ``warmup``; returns median seconds and peak memory in MiB."""
    device = cfg.MODEL.DEVICE
    torch.manual_seed(0)
    model = build_model(cfg)
    model.load_state_dict(state_dict)
    batch = make_batch(cfg, images if mode == "train" else 1, height, width)
    model.train(mode == "train")
    # lr 0: every training step does the full update work but keeps the weights, so random
    # weights cannot diverge over the repeats and both models step on identical weights.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    times = []
    for i in range(warmup + repeats):
        _sync(device)
        start = time.perf_counter()
        if mode == "inference":
            with torch.no_grad(), _autocast(device, precision):
                model(batch)
        else:
            with EventStorage(i), _autocast(device, precision):  # the losses log metrics
                losses = sum(model(batch).values())
            optimizer.zero_grad()
            losses.backward()
            optimizer.step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    if device.startswith("cuda"):
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"median_s": statistics.median(times), "peak_mib": peak_mib}


# --- Inference contenders (one image, interleaved repeats; see mrcnn_plugin/cli/benchmark.py) ---

INFERENCE_OPTS = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MODEL.WEIGHTS", ""]
TORCHVISION_MODELS = {  # config file name -> torchvision builder and its keyword arguments
    "mask_rcnn_R_50_FPN_1x.yaml": ("maskrcnn_resnet50_fpn", {"num_classes": 81}),
    "mask_rcnn_R_50_FPN_3x.yaml": ("maskrcnn_resnet50_fpn", {"num_classes": 81}),
    "keypoint_rcnn_R_50_FPN_1x.yaml": ("keypointrcnn_resnet50_fpn", {"num_classes": 2}),
    "keypoint_rcnn_R_50_FPN_3x.yaml": ("keypointrcnn_resnet50_fpn", {"num_classes": 2}),
}


def benchmark_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """The (3, H, W) uint8 image every contender runs on: smooth random blobs (a few octaves
    of upsampled noise), so features and proposals look less uniform than white noise."""
    g = torch.Generator().manual_seed(seed)
    image = torch.zeros(1, 3, height, width)
    for cells in (4, 16, 64):
        noise = torch.rand(1, 3, cells, cells * width // height + 1, generator=g)
        image += torch.nn.functional.interpolate(noise, (height, width), mode="bilinear")
    image = (image - image.amin()) / (image.amax() - image.amin()) * 255
    return image[0].round().to(torch.uint8)


@torch.no_grad()
def calibrate_norm_statistics(model: torch.nn.Module, run) -> int:
    """Sets the running mean and variance of every frozen/eval batch norm of ``model`` to the
    per-channel statistics of its input during one call of ``run()``, in forward order, so a
    randomly initialised network keeps unit-scale activations (without this, detectron2's
    random R50 features reach ~2000 and every proposal degenerates to the whole image).
    Returns how many norms were set."""
    import torchvision
    from detectron2.layers import FrozenBatchNorm2d

    kinds = (FrozenBatchNorm2d, torchvision.ops.FrozenBatchNorm2d, torch.nn.BatchNorm2d)

    def set_stats(module, args):
        x = args[0].float()
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)))

    hooks = [
        m.register_forward_pre_hook(set_stats) for m in model.modules() if isinstance(m, kinds)
    ]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return len(hooks)


def build_torchvision_contender(config_file: str):
    """torchvision's counterpart of ``config_file`` (random weights, detectron2's test settings:
    score threshold 0, 100 detections, 800-1333 resizing), or None if it has none."""
    import os

    import torchvision

    entry = TORCHVISION_MODELS.get(os.path.basename(config_file))
    if entry is None:
        return None
    name, kwargs = entry
    builder = getattr(torchvision.models.detection, name)
    torch.manual_seed(0)
    return builder(
        weights=None, weights_backbone=None, box_score_thresh=0.0, box_detections_per_img=100,
        **kwargs,
    ).eval()  # fmt: skip


def torchvision_inputs(image: torch.Tensor):
    """torchvision's input for detectron2's BGR uint8 ``image``: RGB float in [0, 1]."""
    return [image.flip(0).float() / 255]


def count_detections(output) -> int:
    if isinstance(output, dict):  # the ONNX runner's results
        return int(output["scores"].shape[0])
    if isinstance(output, list) and output and "instances" in output[0]:
        return len(output[0]["instances"])
    return int(output[0]["boxes"].shape[0])


def inference_cfg(config_file: str, opts: List[str], builtin: bool, mode: str = "exact"):
    """The frozen cfg a contender runs: score threshold 0, no weights file, CPU, ``mode``."""
    extra = INFERENCE_OPTS + ["MODEL.DEVICE", "cpu", "MODEL.MRCNN.INFERENCE_MODE", mode]
    return load_cfg(config_file, list(opts) + extra, builtin)


def image_batch(image: torch.Tensor):
    return [{"image": image, "height": image.shape[1], "width": image.shape[2]}]


def save_shared_weights(config_file: str, opts: List[str], image_size, path: str) -> None:
    """Random weights (seed 0) of the config's model, with batch-norm statistics set on the
    benchmark image (:func:`calibrate_norm_statistics`), saved to ``path`` for every
    detectron2/plugin contender."""
    torch.manual_seed(0)
    model = build_model(inference_cfg(config_file, opts, builtin=False)).eval()
    batch = image_batch(benchmark_image(*image_size))
    with torch.no_grad():
        calibrate_norm_statistics(model, lambda: model(batch))
    torch.save(model.state_dict(), path)
