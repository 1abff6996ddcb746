"""mrcnn_plugin.export_latency: ONNX Runtime vs eager latency on the same model and input."""

import pytest
from export_helpers import SHAPES_OPTS, noise_input, perturbed_model
from tool_helpers import SHAPES_CONFIG

from mrcnn_plugin.export import ExportAdapter, export_onnx
from mrcnn_plugin.export_latency import cpu_model, measure_onnx_vs_eager


def test_measure_onnx_vs_eager(tmp_path):
    _, model = perturbed_model(SHAPES_CONFIG, SHAPES_OPTS)
    path = str(tmp_path / "model.onnx")
    export_onnx(ExportAdapter(model), noise_input(0, 64, 64), path)
    image = noise_input(1, 48, 80)  # another size than the traced one
    result = measure_onnx_vs_eager(path, model, image, num_threads=1, runs=3, warmup=1)
    assert result["cpu"] == cpu_model() != ""
    assert result["threads"] == 1 and result["runs"] == 3
    assert result["input_shape"] == [3, 48, 80]
    for key in ("eager_ms", "onnx_ms", "onnx_postprocess_ms"):
        assert 0 < result[key] < 60_000, (key, result)
    assert result["onnx_ms"] <= result["onnx_postprocess_ms"] * 1.5
    assert result["eager_over_onnx"] == pytest.approx(
        result["eager_ms"] / result["onnx_postprocess_ms"]
    )
    eager, onnx = result["num_detections"]
    assert eager == onnx > 0  # both sides ran the same model on the same input
    with pytest.raises(ValueError, match="runs"):
        measure_onnx_vs_eager(path, model, image, runs=0)
