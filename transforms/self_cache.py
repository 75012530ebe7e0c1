"""The decoder's self-attention cache in preallocated buffers: com.microsoft.GroupQueryAttention, past and present
one buffer.

A fused decoder (transforms/fusion.py) passes its self-attention cache the way it was exported: MultiHeadAttention
concatenates the past and the step's keys and values into a new present tensor each step, so a step copies the
whole cache and allocates it anew. onnxruntime's GroupQueryAttention (with as many key/value heads as query heads,
which is multi-head attention) takes past and present as one buffer of `capacity` positions instead, writes the
step's keys and values at position `past_length` and attends over the positions filled, causally. The runtime
binds the same buffer as the step's past input and present output (runtime/session.py).

Each decoder self-attention becomes: one MatMul of the layer's input by the query, key and value weights packed,
their biases added, then GroupQueryAttention on the packed projections (one MatMul in place of three). The step's
positions, which the exported graph reads from the past's length, come from the `past_length` input instead.
Nothing is changed unless every self-attention block and every read of the cache's length can be rewritten.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeformer.runtime.encoder_decoder import CAPACITY, PAST_LENGTH, is_self_cache, past_for
from edgeformer.transforms.fusion import MS_DOMAIN, remove_dead_nodes
from edgeformer.transforms.graph_edits import producers


def _attribute(node: onnx.NodeProto, name: str) -> Any:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def _weight(name: str, initializers: dict[str, onnx.TensorProto],
            made_by: dict[str, onnx.NodeProto]) -> np.ndarray | None:
    """A MatMul's (D_in, D_out) weight: an initializer, or one transposed by a Transpose node."""
    if name in initializers:
        return numpy_helper.to_array(initializers[name])
    node = made_by.get(name)
    if node is not None and node.op_type == "Transpose" and node.input[0] in initializers:
        perm = _attribute(node, "perm")
        if list(perm or [1, 0]) == [1, 0]:
            return numpy_helper.to_array(initializers[node.input[0]]).T
    return None


def buffer_self_cache(model: onnx.ModelProto, num_heads: int) -> int:
    """Rewrite a fused decoder in place to pass its self-attention cache in buffers; how many blocks were (0:
    the graph is left as it was)."""
    graph = model.graph
    made_by = producers(model)
    initializers = {i.name: i for i in graph.initializer}
    self_cache = {i.name for i in graph.input if is_self_cache(i.name)}
    # GroupQueryAttention is causal and takes no mask: only a causal block without one is rewritten
    blocks = [n for n in graph.node if n.op_type == "MultiHeadAttention" and len(n.input) >= 8
              and n.input[6] in self_cache and n.input[7] in self_cache and not n.input[4] and not n.input[5]
              and _attribute(n, "unidirectional") == 1]
    if not blocks or 2 * len(blocks) != len(self_cache):
        return 0
    rewritten = {id(n) for n in blocks}
    lengths = []  # Shape nodes that read the past's length
    for reader in graph.node:
        if id(reader) in rewritten or not any(i in self_cache for i in reader.input):
            continue
        if reader.op_type != "Shape":
            return 0
        span = (_attribute(reader, "start"), _attribute(reader, "end"))
        if span == (2, 3):
            lengths.append(reader)
        elif span != (0, 1):  # the rows: a buffer has as many
            return 0
    packed = []
    for block in blocks:
        matmuls = [m for x in block.input[:3] if (m := made_by.get(x)) is not None and m.op_type == "MatMul"]
        if len(matmuls) != 3 or len({m.input[0] for m in matmuls}) != 1:  # q, k, v projections of one input
            return 0
        weights = [w for m in matmuls if (w := _weight(m.input[1], initializers, made_by)) is not None]
        if len(weights) != 3 or any(w.dtype != np.float32 for w in weights):  # a float32 graph, as optimize has
            return 0
        packed.append((matmuls[0].input[0], np.concatenate(weights, axis=1)))

    def node(op: str, inputs: list[str], output: str, **attributes: Any) -> str:
        graph.node.append(helper.make_node(op, inputs, [output], name=f"/self_cache/{output}", **attributes))
        return output

    # once per step: total = past_length + T as GroupQueryAttention takes it, (rows,) and a scalar, in int32
    steps = node("Shape", ["input_ids"], "steps", start=1, end=2)
    rows = node("Shape", ["input_ids"], "rows", start=0, end=1)
    total = node("Cast", [node("Add", [PAST_LENGTH, steps], "total_int64")], "total", to=onnx.TensorProto.INT32)
    one = numpy_helper.from_array(np.ones(1, np.int32), "/self_cache/one")
    graph.initializer.append(one)
    seqlens = node("Expand", [node("Sub", [total, one.name], "last"), rows], "seqlens_k")
    total_scalar = node("Squeeze", [total], "total_sequence_length")
    for i, (mha, (source, weight)) in enumerate(zip(blocks, packed, strict=True)):
        w = numpy_helper.from_array(weight, f"/self_cache/{i}/qkv_weight")
        graph.initializer.append(w)
        qkv = node("MatMul", [source, w.name], f"{i}/qkv")
        if mha.input[3]:
            qkv = node("Add", [qkv, mha.input[3]], f"{i}/qkv_biased")
        graph.node.append(helper.make_node(
            "GroupQueryAttention", [qkv, "", "", mha.input[6], mha.input[7], seqlens, total_scalar],
            list(mha.output), name=f"/self_cache/{i}/GroupQueryAttention", domain=MS_DOMAIN,
            num_heads=num_heads, kv_num_heads=num_heads, scale=float(_attribute(mha, "scale") or 0.0)))
        graph.node.remove(mha)
    for shape in lengths:  # the positions start where the past ends
        for n in graph.node:
            n.input[:] = [PAST_LENGTH if x == shape.output[0] else x for x in n.input]
        graph.node.remove(shape)
    graph.input.append(helper.make_tensor_value_info(PAST_LENGTH, onnx.TensorProto.INT64, [1]))
    for value in [*graph.input, *graph.output]:
        cache = value.name if not value.name.startswith("present.") else past_for(value.name)
        if is_self_cache(cache) and len(value.type.tensor_type.shape.dim) == 4:
            value.type.tensor_type.shape.dim[2].dim_param = CAPACITY
    remove_dead_nodes(model)
    from onnxruntime.transformers.onnx_model import OnnxModel

    OnnxModel(model).topological_sort()
    return len(blocks)
