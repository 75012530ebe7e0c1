"""Checkpoint -> bundle: `edgeformer export CHECKPOINT OUT`.

Exporter: torch.onnx with dynamo (torch.export), the path PyTorch maintains and defaults to since 2.9; the
TorchScript exporter is deprecated. Opset 18, which onnxruntime supports from 1.14 on.
Which graphs, their inputs, outputs and dynamic axes: the model family's declaration (runtime/families.py); the
family's PyTorch side (export/families.py) gives the modules that compute them and the parity check.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn
from torch.export import Dim

from edgeformer.export.families import family_export
from edgeformer.export.graph_store import dedupe_initializers, save_graph, share_across_graphs
from edgeformer.export.parity import check_bundle
from edgeformer.model.checkpoint import load_checkpoint, load_generation, load_task
from edgeformer.runtime.bundle import Manifest, atomic_folder, producer_versions
from edgeformer.runtime.families import get_family
from edgeformer.runtime.spec import GraphSpec
from edgeformer.runtime.tokenizer import TOKENIZER_FILE

OPSET = 18
EXPORTER = "torch.onnx.export(dynamo=True)"


def dynamic_shapes(module: nn.Module, spec: GraphSpec, axes: tuple[str, ...]) -> tuple:
    """torch.export's dynamic shapes for `module`, whose forward takes the graph's declared inputs in order (the
    rest of them as *args, if it has that): every symbolic axis the declaration gives an input is dynamic, a Dim
    named after it, so that the graphs share their axes' names."""
    unknown = {a for t in spec.inputs for a in t.shape if isinstance(a, str) and a not in axes}
    if unknown:
        raise ValueError(f"{spec.name} graph: axes {sorted(unknown)} are not among the family's {list(axes)}")
    dims = [{i: Dim(a) for i, a in enumerate(t.shape) if isinstance(a, str)} for t in spec.inputs]
    shapes: list[Any] = []
    for parameter in inspect.signature(module.forward).parameters.values():
        if parameter.kind is parameter.VAR_POSITIONAL:
            shapes.append(tuple(dims[len(shapes):]))
            break
        shapes.append(dims[len(shapes)])
    return tuple(shapes)


def strip_debug_info(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node stack traces and doc strings: for a small model they outweigh its weights."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del model.graph.value_info[:]


def export_graph(module: nn.Module, args: tuple, spec: GraphSpec, axes: tuple[str, ...],
                 opset: int = OPSET) -> onnx.ModelProto:
    # torch.onnx warns about every torchvision operator it cannot register; we use none of them.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, input_names=spec.input_names, output_names=spec.output_names,
                                    dynamic_shapes=dynamic_shapes(module, spec, axes), dynamo=True, opset_version=opset,
                                    verbose=False, report=False)
    assert program is not None
    proto = program.model_proto
    dedupe_initializers(proto)
    strip_debug_info(proto)
    spec.check_names([i.name for i in proto.graph.input], [o.name for o in proto.graph.output],
                     f"exported {spec.name} graph")
    return proto


@dataclass(frozen=True)
class ExportResult:
    path: Path
    seconds: float
    bundle_bytes: int
    parity: dict
    search: dict | None = None  # the one-graph search the bundle carries (`finish`), with its check's figures


def export(checkpoint: Path | str | None, out: Path | str, force: bool = False, opset: int = OPSET,
           log: Callable[[str], None] | None = None,
           finish: Callable[[Path, Manifest], Manifest] | None = None) -> ExportResult:
    """Export a checkpoint folder (the shipped model when None) to a bundle folder at `out`.

    The graphs are checked (onnx.checker, then onnxruntime against PyTorch) before anything appears at `out`;
    a failed check raises ParityError and leaves nothing behind. finish(folder, manifest): what else the bundle
    gets before it is moved into place (the one-graph search), its manifest saved by it and returned.
    """
    say = log or (lambda _msg: None)
    start = time.perf_counter()
    model, tokenizer = load_checkpoint(checkpoint)
    family = get_family(model.family)
    specs = family.graphs(model.config.to_dict())
    side = family_export(family.name)
    modules, examples = side.graph_modules(model), side.example_inputs(model)
    with atomic_folder(Path(out), force=force) as tmp:
        protos = {}
        for name, spec in specs.items():
            say(f"exporting the {name} graph")
            protos[name] = export_graph(modules[name], examples[name], side.traced(spec), family.axes, opset)
            side.complete(name, protos[name])
            spec.check_names([i.name for i in protos[name].graph.input], [o.name for o in protos[name].graph.output],
                             f"exported {name} graph")
        share_across_graphs(list(protos.values()), tmp)
        for name, proto in protos.items():
            save_graph(proto, tmp / family.graph_files[name])
        say("checking the graphs against PyTorch")
        parity = check_bundle(model, tmp, family, specs)
        if tokenizer is not None:
            tokenizer.save(tmp)
        manifest = Manifest(config=model.config.to_dict(), graphs=specs, graph_files=dict(family.graph_files),
                            variant="fp32", opset=opset, tokenizer=TOKENIZER_FILE if tokenizer is not None else None,
                            producer=producer_versions(), parity=parity, exporter=EXPORTER,
                            generation=load_generation(checkpoint), family=family.name, task=load_task(checkpoint))
        manifest.save(tmp)
        if finish is not None:
            manifest = finish(tmp, manifest)
        size = manifest.bytes(tmp)
    return ExportResult(Path(out), time.perf_counter() - start, size, parity, manifest.search)
