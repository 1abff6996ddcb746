"""Two fixes that make a traced graph follow any input size and detection count.

* **Per-image splits.** detectron2's heads split per-proposal tensors by image with
  ``x.split([len(p) for p in proposals])``: ``len()`` is a Python int, so the trace records
  ``Split(x, split=[R])`` with the traced proposal count R, which ONNX Runtime rejects as soon
  as the RPN keeps another number (fewer than POST_NMS_TOPK_TEST proposals survive NMS on a
  small image); TorchScript's ``split_with_sizes`` fails the same way. With one image per
  graph every such split has ONE piece, the whole tensor: :func:`replace_single_output_splits`
  makes them Identity in ONNX, :func:`remove_single_piece_splits` removes them from a traced
  TorchScript module, exactly what they mean.
* **GroupNorm on zero RoIs.** torch's exporter writes GroupNorm as ``Reshape(x, [0, G, -1])``;
  ONNX Runtime cannot infer -1 for a tensor with no elements, so a mask head with GroupNorm
  fails on an image with zero detections. :func:`group_norm_symbolic` (registered for the
  export by :func:`group_norm_for_empty_batches`) reshapes to explicit sizes instead.

TorchScript has no second limit.
"""

import contextlib
from typing import Iterator

import torch
from torch.onnx import symbolic_helper

__all__ = [
    "group_norm_symbolic",
    "group_norm_for_empty_batches",
    "replace_single_output_splits",
    "remove_single_piece_splits",
]


def _const(g, values, dtype=torch.int64):
    return g.op("Constant", value_t=torch.tensor(values, dtype=dtype))


def _is_none(value) -> bool:
    return value is None or value.node().mustBeNone()


@symbolic_helper.parse_args("v", "i", "v", "v", "f", "i")
def group_norm_symbolic(g, input, num_groups, weight, bias, eps, cudnn_enabled):
    """aten::group_norm as Reshape to (N, G, C/G * prod(spatial)) with sizes computed from
    Shape (no -1), mean and variance over the last axis, Reshape back, then weight and bias."""
    rank = input.type().dim()
    shape = g.op("Shape", input)
    batch = g.op("Slice", shape, _const(g, [0]), _const(g, [1]))
    rest = g.op("ReduceProd", g.op("Slice", shape, _const(g, [1]), _const(g, [rank])), keepdims_i=1)
    grouped = g.op("Concat", batch, _const(g, [num_groups]),
                   g.op("Div", rest, _const(g, [num_groups])), axis_i=0)  # fmt: skip
    x = g.op("Reshape", input, grouped)
    centered = g.op("Sub", x, g.op("ReduceMean", x, axes_i=[2], keepdims_i=1))
    var = g.op("ReduceMean", g.op("Mul", centered, centered), axes_i=[2], keepdims_i=1)
    eps_t = _const(g, eps, dtype=torch.float32)
    normed = g.op("Reshape", g.op("Div", centered, g.op("Sqrt", g.op("Add", var, eps_t))), shape)
    axes = _const(g, list(range(1, rank - 1)))
    if not _is_none(weight):
        normed = g.op("Mul", normed, g.op("Unsqueeze", weight, axes))
    if not _is_none(bias):
        normed = g.op("Add", normed, g.op("Unsqueeze", bias, axes))
    return normed


@contextlib.contextmanager
def group_norm_for_empty_batches(opset: int) -> Iterator[None]:
    """Uses :func:`group_norm_symbolic` for aten::group_norm inside the block."""
    torch.onnx.register_custom_op_symbolic("aten::group_norm", group_norm_symbolic, opset)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::group_norm", opset)


def replace_single_output_splits(model) -> int:
    """Turns every one-output Split node of the onnx ModelProto (subgraphs included) into
    Identity, in place; returns how many."""
    import onnx

    count = 0
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        nodes = []
        for node in graph.node:
            graphs += [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
            if node.op_type == "Split" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
                node = onnx.helper.make_node(
                    "Identity", [node.input[0]], list(node.output), name=node.name
                )
                count += 1
            nodes.append(node)
        del graph.node[:]
        graph.node.extend(nodes)
    return count


def remove_single_piece_splits(module: torch.jit.ScriptModule) -> int:
    """In every graph of a traced module, ``split_with_sizes(x, [n])`` unpacked into its one
    piece is replaced by ``x``; returns how many."""
    count = 0
    for submodule in module.modules():
        try:
            graph = submodule.graph
        except (AttributeError, RuntimeError):  # a module without a traced forward
            continue
        for node in graph.findAllNodes("aten::split_with_sizes"):
            sizes = node.inputsAt(1).node()
            unpacks = [use.user for use in node.output().uses()]
            if (
                sizes.kind() != "prim::ListConstruct"
                or sizes.inputsSize() != 1
                or not unpacks
                or any(u.kind() != "prim::ListUnpack" or u.outputsSize() != 1 for u in unpacks)
            ):
                continue
            for unpack in unpacks:
                unpack.output().replaceAllUsesWith(node.inputsAt(0))
                unpack.destroy()
            node.destroy()
            count += 1
    return count
