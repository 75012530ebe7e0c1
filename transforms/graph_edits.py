"""Edits of ONNX graphs that the transforms share: finding the output projection, keeping nodes in full
precision, typing every tensor, untying or quantizing a tied projection, dropping what nothing reads."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgeformer.runtime.bundle import Manifest

OUTPUT_PROJECTION = "output_projection"  # alias for the MatMul that produces the logits
# One graph's transform: (source graph file, graph name, source manifest) -> (new graph, details for the manifest)
GraphTransform = Callable[[Path, str, Manifest], tuple[onnx.ModelProto, dict]]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """onnxruntime's tools log progress and advice on the root logger; keep only their errors, for this call."""
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in ("onnxruntime.quantization",
                                                                      "onnxruntime.transformers"))]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Each tensor's producing node, by the tensor's name."""
    return {o: n for n in model.graph.node for o in n.output}


def logits_matmul(model: onnx.ModelProto) -> onnx.NodeProto | None:
    """The output projection: the MatMul that makes the logits, directly or through Add(bias) (Marian's
    final_logits_bias)."""
    made_by = producers(model)
    inits = {i.name for i in model.graph.initializer}
    node = made_by.get("logits")
    if node is not None and node.op_type == "Add":
        node = next((made_by.get(i) for i in node.input if i not in inits and i in made_by), None)
    return node if node is not None and node.op_type == "MatMul" else None


def resolve_keep(model: onnx.ModelProto, keep: list[str]) -> list[str]:
    """Node names to keep in full precision, from names, operator types, or the alias 'output_projection'."""
    nodes = list(model.graph.node)
    names = set()
    for item in keep:
        if item == OUTPUT_PROJECTION:
            projection = logits_matmul(model)
            names |= {projection.name} if projection is not None else set()
        else:
            matched = {n.name for n in nodes if n.name == item or n.op_type == item}
            names |= matched
    return sorted(names)


def with_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every intermediate tensor typed, com.microsoft operators included, where symbolic inference can."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    # When it cannot type everything, onnxruntime dumps sym_shape_infer_temp.onnx and its weights into the
    # working directory before raising: let that land in a folder that is thrown away.
    cwd = Path.cwd()
    with tempfile.TemporaryDirectory() as scratch:
        os.chdir(scratch)
        try:
            return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
        except Exception:  # an operator it does not know: fall back on the quantizer's DefaultTensorType
            return model
        finally:
            os.chdir(cwd)


def _tied_projection(model: onnx.ModelProto) -> tuple[onnx.NodeProto, onnx.NodeProto, str] | None:
    """(MatMul, Transpose, table) when the logits come from MatMul(x, Transpose(table)): a tied projection."""
    inits = {i.name for i in model.graph.initializer}
    node = logits_matmul(model)
    t = producers(model).get(node.input[1]) if node is not None else None
    if node is not None and t is not None and t.op_type == "Transpose" and t.input[0] in inits:
        return node, t, t.input[0]
    return None


def skip_float16_round_trips(model: onnx.ModelProto) -> int:
    """Where a float32 value goes through Cast(float16) then Cast(float32) (onnxruntime's float16 converter puts
    them between nodes it kept in float32), its readers read the float32 value itself. Returns how many."""
    made_by = producers(model)

    def source(name: str) -> str | None:
        last = made_by.get(name)
        if last is None or last.op_type != "Cast" or last.attribute[0].i != onnx.TensorProto.FLOAT:
            return None
        first = made_by.get(last.input[0])
        if first is None or first.op_type != "Cast" or first.attribute[0].i != onnx.TensorProto.FLOAT16:
            return None
        return first.input[0]

    skipped = 0
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if (found := source(name)) is not None:
                node.input[i] = found
                skipped += 1
    for output in model.graph.output:
        last = made_by.get(output.name)
        if last is not None and (found := source(output.name)) is not None:
            last.input[0] = found  # a float32 -> float32 Cast now: a copy onnxruntime removes
            skipped += 1
    return skipped


MEMCPY = ("MemcpyFromHost", "MemcpyToHost")


def replace_memcpy(model: onnx.ModelProto) -> int:
    """Make Identity of the copies between host and device that onnxruntime's offline optimization for a GPU writes
    into the graph (where it keeps an operator on the CPU): they are onnxruntime's own, no ONNX operator; it removes
    the Identity and puts its copies back where they are needed when it loads the graph. Returns how many."""
    graphs = [model.graph]
    for graph in graphs:  # the bodies of If, Loop and Scan nodes join the list as it is walked
        for node in graph.node:
            for attribute in node.attribute:
                graphs += [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
    copies = [n for graph in graphs for n in graph.node if n.op_type in MEMCPY]
    for copy in copies:
        copy.op_type, copy.domain = "Identity", ""
    return len(copies)


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def prune(graph: onnx.GraphProto) -> None:
    """Drop the nodes whose outputs nothing reads (the graph's outputs, a node, or a node's subgraph), then the
    initializers nothing reads."""
    def read() -> set[str]:
        return {name for node in nodes(graph) for name in node.input} | {t.name for t in graph.output}

    while True:
        names = read()
        dead = [node for node in graph.node if not any(name in names for name in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    names = read()
    for init in [t for t in graph.initializer if t.name not in names]:
        graph.initializer.remove(init)


def nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """The graph's nodes and those of their subgraphs (an If's branches), which may read the graph's values."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for sub in (attribute.g, *attribute.graphs):
                yield from nodes(sub)


def untie_projection(model: onnx.ModelProto) -> None:
    """Give a tied output projection its own (transposed) weight, so that a weight-only quantizer packs it like
    any other MatMul weight. Two quantized copies of the table are still far smaller than one in fp32."""
    tied = _tied_projection(model)
    if tied is None:
        return
    matmul, transpose, table = tied
    array = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == table))
    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array.T), "output_projection.weight"))
    matmul.input[1] = "output_projection.weight"
    model.graph.node.remove(transpose)


def signed_tables(model: onnx.ModelProto) -> list[str]:
    """onnxruntime's quantizer stores a Gather's table as uint8 around zero point 128. Make each such table int8
    (data and zero point less 128: the same values, exactly), so that the tied output projection reading it runs
    onnxruntime's u8s8 kernels, not the far slower u8u8 ones (README: Optimize and quantize). For full 8-bit
    presets only: the `avx2` preset keeps the table uint8, as its u8s8 form would need 7 bits, which cost precision.
    A zero point that also dequantizes another tensor is left alone. Returns the tables changed."""
    inits = {i.name: i for i in model.graph.initializer}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for slot, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, slot))

    def zero_points(table: str) -> set[str] | None:
        """The zero points that dequantize `table` (directly or after its Gather), or None if it is read otherwise."""
        zeros = set()
        for node, slot in readers.get(table, []):
            dequantizers = [node] if node.op_type == "DequantizeLinear" else []
            if node.op_type == "Gather" and slot == 0:
                dequantizers = [n for n, _ in readers.get(node.output[0], [])]
            if slot != 0 or not dequantizers or any(n.op_type != "DequantizeLinear" or len(n.input) < 3
                                                    for n in dequantizers):
                return None
            zeros |= {n.input[2] for n in dequantizers}
        return zeros

    def only_for(zero: str, table: str) -> bool:
        """Whether every reader of `zero` dequantizes `table` or a Gather of it."""
        rows = {n.output[0] for n, slot in readers.get(table, []) if n.op_type == "Gather" and slot == 0}
        return all(n.op_type == "DequantizeLinear" and slot == 2 and n.input[0] in {table, *rows}
                   for n, slot in readers[zero])

    changed = []
    for name, init in inits.items():
        zeros = zero_points(name) if init.data_type == onnx.TensorProto.UINT8 and len(init.dims) == 2 else None
        if not zeros or any(z not in inits or inits[z].data_type != onnx.TensorProto.UINT8 or not only_for(z, name)
                            for z in zeros):
            continue
        for tensor in (init, *(inits[z] for z in sorted(zeros))):
            signed = (numpy_helper.to_array(tensor).astype(np.int16) - 128).astype(np.int8)
            tensor.CopyFrom(numpy_helper.from_array(signed, tensor.name))
        changed.append(name)
    return changed


def quantize_tied_projection_int8(model: onnx.ModelProto) -> bool:
    """After dynamic quantization quantized the embedding's Gather, let the tied output projection read the same
    int8 table: MatMulInteger(quantize(x), Transpose(table_int8)), one table on disk for both uses."""
    inits = {i.name for i in model.graph.initializer}
    made_by = producers(model)
    matmul = logits_matmul(model)
    transpose = made_by.get(matmul.input[1]) if matmul is not None else None
    if matmul is None or transpose is None or transpose.op_type != "Transpose":
        return False
    # The table is either still the float initializer, or (when the quantizer saw it used outside a Gather)
    # a DequantizeLinear of the quantized one, which would dequantize all of it on every step.
    dequantize = made_by.get(transpose.input[0])
    if dequantize is not None and dequantize.op_type == "DequantizeLinear" and dequantize.input[0] in inits:
        q, scale, zero = dequantize.input[:3]
    elif f"{transpose.input[0]}_quantized" in inits:
        table = transpose.input[0]
        q, scale, zero = f"{table}_quantized", f"{table}_scale", f"{table}_zero_point"
    else:
        return False
    x, out = matmul.input[0], matmul.output[0]
    make = onnx.helper.make_node
    nodes = [
        make("Transpose", [q], ["output_projection.weight_quantized"], name="/output_projection/Transpose",
             perm=[1, 0]),
        make("DynamicQuantizeLinear", [x], ["op_x_q", "op_x_scale", "op_x_zero"], name="/output_projection/Quantize"),
        make("MatMulInteger", ["op_x_q", "output_projection.weight_quantized", "op_x_zero", zero], ["op_y_int"],
             name="/output_projection/MatMulInteger"),
        make("Cast", ["op_y_int"], ["op_y"], name="/output_projection/Cast", to=onnx.TensorProto.FLOAT),
        make("Mul", ["op_x_scale", scale], ["op_scale"], name="/output_projection/Scale"),
        make("Mul", ["op_y", "op_scale"], [out], name="/output_projection/Mul"),
    ]
    position = list(model.graph.node).index(matmul)
    model.graph.node.remove(matmul)
    model.graph.node.remove(transpose)
    for offset, node in enumerate(nodes):
        model.graph.node.insert(position - 1 + offset, node)
    used = {i for n in model.graph.node for i in n.input}
    if dequantize is not None and dequantize.output[0] not in used:
        model.graph.node.remove(dequantize)
    drop_unused_initializers(model)
    return True
