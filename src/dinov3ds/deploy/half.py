"""fp16 graphs: weights and activations in float16, the numerically fragile parts kept in float32.

onnxruntime's own converter (`onnxruntime.transformers.float16`) does the conversion; this module only
chooses what it must leave in float32, from the graph's data flow rather than from node names:
- every value computed from the input's *shape* alone (the RoPE sin/cos tables, deformable attention's
  reference points and level sizes): angles of up to hundreds of radians lose their position in fp16;
- each attention's logits, from the q/k projections (after their weights) through RoPE's rotation and the
  scaling to the softmax: q·k overflows or rounds in fp16 on high-norm tokens, and RoPE rotated in fp16
  breaks DINOv3 in TensorRT;
- softmax and LayerNorm (its mean and variance) as whole ops;
- for a depth model, what follows its last softmax (`output_tail`): the bin centres weighted by the softmax
  into metres, where fp16 would round a depth of 8 m to steps of 8 mm, beyond a 16-bit millimetre PNG's own.
Matrix products with weights, convolutions, MLPs and the residual stream run in fp16. The graph's input
and output stay float32, so a caller feeds and reads the same arrays as with the fp32 file.
"""

from __future__ import annotations

import onnx

KEEP_FP32_OPS = ("LayerNormalization", "Softmax", "Resize")
# Where the backward walk from a softmax stops: weights are applied there, the data path starts.
WEIGHTED_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose", "LayerNormalization", "Softmax", "Einsum"}


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {output: node for node in graph.node for output in node.output}


def shape_derived(graph: onnx.GraphProto) -> set[str]:
    """Names of nodes whose outputs depend on the input's shape and constants only, never on its values."""
    data = {tensor.name for tensor in graph.input}
    derived = set()
    for node in graph.node:  # ONNX graphs are stored in topological order
        if node.op_type != "Shape" and any(name in data for name in node.input):
            data.update(node.output)
        elif any(name for name in node.input) or node.op_type == "Shape":
            derived.add(node.name)
    return derived


def attention_logits(graph: onnx.GraphProto) -> set[str]:
    """Names of the nodes between each softmax and the weighted ops (projections, norms) that feed it."""
    producers = _producers(graph)
    weights = {tensor.name for tensor in graph.initializer}
    kept: set[str] = set()
    for softmax in (node for node in graph.node if node.op_type == "Softmax"):
        pending = [name for name in softmax.input]
        while pending:
            node = producers.get(pending.pop())
            if node is None or node.name in kept:
                continue
            weighted = node.op_type in WEIGHTED_OPS and any(name in weights for name in node.input)
            if weighted or node.op_type in ("LayerNormalization", "Softmax", "Conv", "Gemm"):
                continue
            kept.add(node.name)
            if node.op_type != "Shape":
                pending.extend(node.input)
    return kept


def output_tail(graph: onnx.GraphProto) -> set[str]:
    """Names of the nodes between the graph's outputs and the last softmax (or weighted op) before them."""
    producers = _producers(graph)
    weights = {tensor.name for tensor in graph.initializer}
    kept: set[str] = set()
    pending = [value.name for value in graph.output]
    while pending:
        node = producers.get(pending.pop())
        if node is None or node.name in kept or node.op_type == "Softmax":
            continue
        if node.op_type in WEIGHTED_OPS and any(name in weights for name in node.input):
            continue
        kept.add(node.name)
        pending.extend(node.input)
    return kept


def to_half(model: onnx.ModelProto, keep_output_tail: bool = False) -> onnx.ModelProto:
    """The fp16 graph of an fp32 `model` (float32 input and output kept; with `keep_output_tail`, what follows
    the last softmax too, as a depth model's metres need)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    keep = shape_derived(model.graph) | attention_logits(model.graph)
    keep = sorted(keep | output_tail(model.graph) if keep_output_tail else keep)
    return convert_float_to_float16(model, keep_io_types=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *KEEP_FP32_OPS],
                                    node_block_list=keep)  # fmt: skip
