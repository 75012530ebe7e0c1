"""Fuse our attention into onnxruntime's com.microsoft.MultiHeadAttention.

onnxruntime's transformer optimizer knows the attention patterns of the Hugging Face exports it was written for;
it finds none in the graphs torch.onnx (dynamo) makes of `MultiHeadAttention` in model/transformer.py. Those
graphs have one fixed shape, so we match it here:

    Softmax(MatMul(Transpose(Reshape(q)), Kt) * scale + bias) -> MatMul(., V) -> Transpose -> Reshape -> out

where K and V are the layer's projections (encoder self-attention), the past cache concatenated with them
(decoder self-attention, whose Concat outputs are the `present.*` outputs), or the cross-attention cache inputs
(decoder cross-attention, whose query is a source's rows grouped: the final Reshape, which ungroups them, stays).
Each match becomes one MultiHeadAttention node: past and present go through its past_key/past_value inputs and
present_key/present_value outputs; padding masks become its key_padding_mask, the causal mask its
`unidirectional` attribute, and the projections' biases its `bias` input. Node count is what a decoding step of a
small model costs, so every node the kernel can absorb goes.

A block is fused only where the kernel computes what the nodes did: softmax over the last axis, a constant scalar
scale (passed on as the kernel's `scale`), heads split by Reshape to (num_heads, head_dim) with the transposes
the kernel assumes, and an additive bias that is the source mask's padding (or, with a past, the causal mask
alone; in an encoder, all zeros: the ViT's, which masks nothing). Anything else is left as it is. Layer-norm
fusions (epsilon included) are onnxruntime's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeformer.transforms.graph_edits import drop_unused_initializers, producers

MS_DOMAIN = "com.microsoft"


@dataclass
class _Graph:
    model: onnx.ModelProto

    def __post_init__(self) -> None:
        self.producer = producers(self.model)
        self.inputs = {i.name for i in self.model.graph.input}
        self.initializers = {i.name: i for i in self.model.graph.initializer}

    def op(self, name: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def unbiased(self, name: str) -> tuple[str, np.ndarray | None]:
        """(x, b) for a projection `name` = Add(x, b) with b a (D,) initializer; (name, None) otherwise."""
        add = self.op(name, "Add")
        if add is not None:
            for x, b in (add.input, reversed(add.input)):
                if b in self.initializers and len(self.initializers[b].dims) == 1:
                    return x, numpy_helper.to_array(self.initializers[b])
        return name, None


def _perm(node: onnx.NodeProto) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])


def _constant(g: _Graph, name: str) -> np.ndarray | None:
    if name in g.initializers:
        return numpy_helper.to_array(g.initializers[name])
    node = g.producer.get(name)
    if node is not None and node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
        return numpy_helper.to_array(node.attribute[0].t)
    return None


def _head_split(g: _Graph, reshape: onnx.NodeProto, num_heads: int) -> bool:
    """Whether a Reshape splits its last axis into (num_heads, head_dim), its target's last two sizes constant."""
    shape = _constant(g, reshape.input[1])
    if shape is None:
        concat = g.op(reshape.input[1], "Concat")
        if concat is None or len(concat.input) != 4:
            return False
        parts = [_constant(g, i) for i in concat.input[2:]]
        if any(p is None or p.size != 1 for p in parts):
            return False
        shape = np.array([0, 0, *(int(p.reshape(-1)[0]) for p in parts if p is not None)])
    return len(shape) == 4 and int(shape[2]) == num_heads and int(shape[3]) > 0


def _split_heads_source(g: _Graph, name: str, num_heads: int, perm: tuple[int, ...] = (0, 2, 1, 3)) -> str | None:
    """The (B, T, D) tensor that Transpose(Reshape(x), perm) split into num_heads heads, or None."""
    t = g.op(name, "Transpose")
    r = g.op(t.input[0], "Reshape") if t is not None and _perm(t) == list(perm) else None
    return r.input[0] if r is not None and _head_split(g, r, num_heads) else None


def _scale(g: _Graph, mul: onnx.NodeProto) -> float | None:
    """The constant scalar a Mul scales the scores by, or None when it is not one."""
    value = _constant(g, mul.input[1])
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def _mask_int32(model: onnx.ModelProto, mask_input: str, cache: dict[str, str]) -> str:
    if mask_input not in cache:
        name = f"{mask_input}_int32"
        model.graph.node.insert(0, helper.make_node("Cast", [mask_input], [name], name=f"/{name}/Cast",
                                                    to=onnx.TensorProto.INT32))
        cache[mask_input] = name
    return cache[mask_input]


def _zeros(g: _Graph, name: str) -> bool:
    """Whether `name` is all zeros: a constant, or ConstantOfShape of a zero (a bias that masks nothing)."""
    value = _constant(g, name)
    if value is None:
        node = g.op(name, "ConstantOfShape")
        if node is None:
            return False
        value = next((numpy_helper.to_array(a.t) for a in node.attribute if a.name == "value"), np.zeros(1))
    return not np.any(value)


def _padding_mask_input(g: _Graph, bias: str) -> str | None:
    """The graph's (B, S) mask input behind an additive padding bias, following Mul/Sub/Cast/Unsqueeze."""
    stack, seen = [bias], set()
    while stack:
        name = stack.pop()
        if name in g.inputs:
            return name
        node = g.producer.get(name)
        if node is None or name in seen or node.op_type not in ("Mul", "Sub", "Cast", "Unsqueeze", "Add"):
            continue
        seen.add(name)
        stack.extend(node.input)
    return None


def _qkv_bias(model: onnx.ModelProto, name: str, parts: list[np.ndarray | None]) -> str:
    """One (3 D,) initializer of the q, k and v biases, zeros where a projection has none."""
    width = next(p.shape[0] for p in parts if p is not None)
    bias = np.concatenate([np.zeros(width, np.float32) if p is None else p.astype(np.float32) for p in parts])
    model.graph.initializer.append(numpy_helper.from_array(bias, name))
    return name


def fuse_attention(model: onnx.ModelProto, num_heads: int) -> int:
    """Rewrite every matching attention block in place; returns how many were fused."""
    g = _Graph(model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    masks: dict[str, str] = {}
    fused = 0
    for softmax in [n for n in model.graph.node if n.op_type == "Softmax"]:
        add = g.op(softmax.input[0], "Add")
        mul = g.op(add.input[0], "Mul") if add is not None else None
        scores = g.op(mul.input[0], "MatMul") if mul is not None else None
        after = consumers.get(softmax.output[0], [])
        context = after[0] if len(after) == 1 and after[0].op_type == "MatMul" else None
        axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1)
        scale = _scale(g, mul) if mul is not None else None
        if add is None or mul is None or scores is None or context is None or axis not in (-1, 3) or scale is None:
            continue
        t_out = consumers.get(context.output[0], [None])[0]
        reshape_out = consumers.get(t_out.output[0], [None])[0] if t_out is not None else None
        query = _split_heads_source(g, scores.input[0], num_heads)
        if (query is None or t_out is None or _perm(t_out) != [0, 2, 1, 3] or reshape_out is None
                or reshape_out.op_type != "Reshape"):
            continue
        k_node = g.producer.get(scores.input[1])  # K transposed for Q @ K^T
        if k_node is None or k_node.op_type != "Transpose":
            continue
        k_src, v_src = k_node.input[0], context.input[1]
        bias = add.input[1]
        inputs: list[str]
        outputs = [reshape_out.output[0]]
        unidirectional, cross = 0, False
        query, q_bias = g.unbiased(query)
        concat_k, concat_v = g.op(k_src, "Concat"), g.op(v_src, "Concat")
        if concat_k is not None and concat_v is not None:  # decoder self-attention with its cache
            new_k = _split_heads_source(g, concat_k.input[1], num_heads)
            new_v = _split_heads_source(g, concat_v.input[1], num_heads)
            if (new_k is None or new_v is None or _perm(k_node) != [0, 1, 3, 2]
                    or _padding_mask_input(g, bias) is not None):
                continue
            (new_k, k_bias), (new_v, v_bias) = g.unbiased(new_k), g.unbiased(new_v)
            # the graph's additive bias here is the causal mask alone: the kernel applies it itself, past included
            unidirectional = 1
            inputs = [query, new_k, new_v, "", "", "", concat_k.input[0], concat_v.input[0]]
            outputs += [concat_k.output[0], concat_v.output[0]]
        elif k_src in g.inputs and v_src in g.inputs:  # cross-attention on the cached encoder keys and values
            mask = _padding_mask_input(g, bias)
            if mask is None or _perm(k_node) != [0, 1, 3, 2]:
                continue
            k_bias = v_bias = None  # already in the cache
            inputs = [query, k_src, v_src, "", _mask_int32(model, mask, masks)]
            cross = True
        else:  # encoder self-attention: K^T came from one Transpose of the split heads
            reshape_k = g.op(k_src, "Reshape")
            new_v = _split_heads_source(g, v_src, num_heads)
            mask = _padding_mask_input(g, bias)
            if (reshape_k is None or not _head_split(g, reshape_k, num_heads) or _perm(k_node) != [0, 2, 3, 1]
                    or new_v is None or (mask is None and not _zeros(g, bias))):
                continue
            (new_k, k_bias), (new_v, v_bias) = g.unbiased(reshape_k.input[0]), g.unbiased(new_v)
            # no mask where the bias is all zeros (the ViT: every patch sees every other)
            inputs = [query, new_k, new_v, "", *([_mask_int32(model, mask, masks)] if mask is not None else [])]
        biases = [q_bias, k_bias, v_bias]
        if any(b is not None for b in biases):
            inputs[3] = _qkv_bias(model, f"/attention_{fused}/qkv_bias", biases)
        removed = [reshape_out, t_out, context, softmax, add, mul, scores, k_node]
        if cross:  # the heads' merge also ungroups the rows (model/transformer.py): it stays, on the kernel's output
            outputs[0] = reshape_out.input[0] = f"/attention_{fused}/grouped"
            removed.remove(reshape_out)
        model.graph.node.append(helper.make_node(
            "MultiHeadAttention", inputs, outputs, name=f"/attention_{fused}/MultiHeadAttention",
            domain=MS_DOMAIN, num_heads=num_heads, unidirectional=unidirectional, scale=scale))
        for node in removed:
            model.graph.node.remove(node)
        if len(outputs) == 3 and concat_k is not None and concat_v is not None:
            model.graph.node.remove(concat_k)
            model.graph.node.remove(concat_v)
        fused += 1
        g = _Graph(model)
    if fused:
        remove_dead_nodes(model)
        if not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
        from onnxruntime.transformers.onnx_model import OnnxModel

        OnnxModel(model).topological_sort()
    return fused


def remove_dead_nodes(model: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nothing reads, until none is left, then the initializers nothing reads."""
    graph_outputs = {o.name for o in model.graph.output}
    while True:
        used = {i for n in model.graph.node for i in n.input} | graph_outputs
        dead = [n for n in model.graph.node if not any(o in used for o in n.output)]
        if not dead:
            drop_unused_initializers(model)
            return
        for n in dead:
            model.graph.node.remove(n)
