"""Storing ONNX graphs in a bundle: each weight once (within a graph and across graphs), every weight of some size
as external data, every graph checked by onnx.checker as it is saved. onnx and numpy only: the exporter and the
transforms both write through here.

External data is what onnxruntime memory-maps instead of copying: a weight that a kernel prepacks is mapped, packed,
then unmapped, and a table that Gather reads stays on disk but for the rows read. Inline, the same weights sat in
memory twice at load (README: Export).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import set_external_data

SHARED_WEIGHTS = "shared.weights"  # weights that both graphs use, stored once
WEIGHTS_SUFFIX = ".weights"  # a graph's own weights: encoder.onnx -> encoder.weights
EXTERNAL_MIN_BYTES = 4096  # smaller tensors (biases, norms, shapes) stay inside the graph: a page is not worth it
ALIGNMENT = 64  # every tensor in a weights file starts at a multiple of this


def dedupe_initializers(model: onnx.ModelProto) -> int:
    """Store each weight once: an initializer equal to another, or to another's transpose, is replaced by a
    reference to it (or a Transpose node). The exporter's constant folding turns the output projection tied to
    the embedding into a second, transposed copy; this undoes that. Returns the number of bytes saved."""
    graph = model.graph
    seen: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    transposed: dict[str, str] = {}
    keep = []
    saved = 0
    for init in graph.initializer:
        array = numpy_helper.to_array(init)
        if array.size < 64:  # shape constants and the like are not worth the bookkeeping
            keep.append(init)
            continue
        key = (array.dtype.str, array.shape, array.tobytes())
        if key in seen:
            rename[init.name] = seen[key]
            saved += array.nbytes
            continue
        if array.ndim == 2:
            t_key = (array.dtype.str, array.T.shape, np.ascontiguousarray(array.T).tobytes())
            if t_key in seen:
                transposed[init.name] = seen[t_key]
                saved += array.nbytes
                continue
        seen[key] = init.name
        keep.append(init)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    for name, source in transposed.items():
        graph.node.insert(0, onnx.helper.make_node("Transpose", [source], [name], name=f"/{name}/Transpose",
                                                   perm=[1, 0]))
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    return saved


def share_across_graphs(protos: list[onnx.ModelProto], folder: Path) -> list[str]:
    """A weight that two graphs both hold (a source/target embedding shared by encoder and decoder) is written
    once, to SHARED_WEIGHTS, and both graphs refer to it as external data. Returns the names moved."""
    owners: dict[tuple, list[tuple[int, onnx.TensorProto]]] = {}
    for g, proto in enumerate(protos):
        for init in proto.graph.initializer:
            # raw_data as stored: packed 4-bit tensors must stay packed. Typed fields hold small constants only.
            if init.HasField("raw_data") and len(init.raw_data) >= 256:
                owners.setdefault((init.data_type, tuple(init.dims), init.raw_data), []).append((g, init))
    shared = [inits for inits in owners.values() if len({g for g, _ in inits}) > 1]
    if not shared:
        return []
    with open(folder / SHARED_WEIGHTS, "wb") as f:
        for inits in shared:
            _write_external(f, SHARED_WEIGHTS, [init for _, init in inits])
    return [init.name for inits in shared for _, init in inits]


def reorder(values: Any, names: list[str]) -> None:
    """A graph's inputs or outputs (`graph.input`, `graph.output`) in the order of `names`, where they are the same
    set (else left as they are, for the declared names' check to report)."""
    found = {v.name: v for v in values}
    if set(found) != set(names) or list(found) == names:
        return
    ordered = [onnx.ValueInfoProto.FromString(found[n].SerializeToString()) for n in names]
    del values[:]
    values.extend(ordered)


def save_graph(proto: onnx.ModelProto, path: Path) -> None:
    """Write a graph, its weights of EXTERNAL_MIN_BYTES or more beside it in `<name>.weights` (none if it has
    none), and check it."""
    weights = path.with_suffix(WEIGHTS_SUFFIX)
    large = [i for i in proto.graph.initializer if i.HasField("raw_data") and len(i.raw_data) >= EXTERNAL_MIN_BYTES]
    if large:
        with open(weights, "wb") as f:
            for init in large:
                _write_external(f, weights.name, [init])
    onnx.save_model(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def _write_external(f: BinaryIO, location: str, inits: list[onnx.TensorProto]) -> None:
    """Append the data of `inits` (all equal) to `f` once, aligned, and make each of them refer to it."""
    f.write(b"\0" * (-f.tell() % ALIGNMENT))
    offset, data = f.tell(), inits[0].raw_data
    f.write(data)
    for init in inits:
        set_external_data(init, location, offset, len(data))
        init.data_location = onnx.TensorProto.EXTERNAL
        init.ClearField("raw_data")
