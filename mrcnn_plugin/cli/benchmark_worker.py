"""One contender of ``mrcnn-benchmark`` in its own process (``--worker``): it builds and warms
up its model, then answers "run" with one timed inference and "quit" with its peak RSS."""

import os
import resource
import sys
import time

import torch

from ..benchmark import (
    benchmark_image,
    build_torchvision_contender,
    calibrate_norm_statistics,
    count_detections,
    image_batch,
    inference_cfg,
    load_cfg,
    measure,
    torchvision_inputs,
)


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _with_weights(model: torch.nn.Module, weights: str) -> torch.nn.Module:
    # The loaded state_dict is freed on return, before any calibration or run, so no
    # contender's peak RSS holds a second copy of the weights.
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model


def _build(contender: str, config_file: str, weights: str, args, opts):
    """(callable running one inference, ready info) of an inference contender."""
    from detectron2.modeling import build_model

    from ..engine.inference_modes import prepare_for_inference
    from ..speed_floor import model_gflop

    image = benchmark_image(*args.image_size)
    batch = image_batch(image)
    if contender == "detectron2":
        cfg = inference_cfg(config_file, opts, builtin=True)
        model = _with_weights(build_model(cfg), weights).eval()
        info = {"mode": "fp32", "gflop": model_gflop(model, image)}
        return lambda: model(batch), info
    if contender.startswith("plugin "):
        cfg = inference_cfg(config_file, opts, builtin=False, mode=contender.split()[1])
        model = _with_weights(build_model(cfg), weights)
        calibration = [image_batch(benchmark_image(*args.image_size, seed=s))[0] for s in (1, 2)]
        model = prepare_for_inference(
            model, cfg.MODEL.MRCNN.INFERENCE_MODE, calibration=calibration
        )
        return lambda: model(batch), {"mode": model.mode}
    if contender == "onnxruntime":
        return _build_onnxruntime(config_file, weights, image, args, opts)
    # torchvision fp32 / bf16 (autocast + channels-last)
    model = build_torchvision_contender(config_file)
    inputs = torchvision_inputs(image)
    with torch.no_grad():
        calibrate_norm_statistics(model, lambda: model(inputs))
    if contender.endswith("bf16"):
        model = model.to(memory_format=torch.channels_last)

        def once():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(inputs)

        return once, {"mode": "bf16"}
    return lambda: model(inputs), {"mode": "fp32"}


def _build_onnxruntime(config_file: str, weights: str, image: torch.Tensor, args, opts):
    """The plugin's float32 model on the shared weights, exported as ``mrcnn-export --format
    onnx`` does, run by ONNX Runtime's CPU execution provider with ``args.threads`` threads and
    the numpy post-processing (mask pasting, keypoint decoding) of the torch-free runner: the
    counterpart of the eager model's forward."""
    from detectron2.modeling import build_model

    from ..deploy.onnx_runner import OnnxPredictor, postprocess
    from ..export import ExportAdapter, export_onnx

    model = build_model(inference_cfg(config_file, opts, builtin=False)).eval()
    model.load_state_dict(torch.load(weights, weights_only=True))
    path = os.path.splitext(weights)[0] + ".onnx"
    export_onnx(ExportAdapter(model, keypoints_in_graph=False), image, path)
    predictor = OnnxPredictor(path, num_threads=args.threads)
    array, size = image.numpy(), tuple(image.shape[1:])
    return lambda: postprocess(predictor.run(array), size), {"mode": "fp32"}


def serve(contender: str, config_file: str, weights: str, args, opts, send) -> None:
    torch.set_num_threads(args.threads)
    commands = (line.strip() for line in sys.stdin)
    if contender.startswith("train "):
        cfg = load_cfg(config_file, opts + ["MODEL.DEVICE", "cpu"], contender != "train plugin")
        state = torch.load(weights, weights_only=True)
        send({})
        for command in commands:
            if command == "quit":
                return send({"peak_mib": _peak_mib()})
            row = measure(cfg, state, "train", args.images_per_batch, *args.image_size,
                          args.warmup, args.repeats, args.precision)  # fmt: skip
            row["images_per_s"] = args.images_per_batch / row["median_s"]
            send(row)
        return
    if contender == "floor":
        from ..engine.cpu_features import has_bf16
        from ..speed_floor import conv_rates

        precisions = ("fp32", "bf16") if has_bf16() else ("fp32",)
        run, info = (lambda: conv_rates(precisions)), {}
    else:
        run, info = _build(contender, config_file, weights, args, opts)
    with torch.no_grad():
        output = None
        for _ in range(args.warmup):
            output = run()
        if contender != "floor":
            info["detections"] = count_detections(output if output is not None else run())
        send(info)
        for command in commands:
            if command == "quit":
                return send({"peak_mib": _peak_mib()})
            start = time.perf_counter()
            result = run()
            seconds = time.perf_counter() - start
            send(result if contender == "floor" else seconds)
