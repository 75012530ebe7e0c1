"""How each model family is exported and checked on the PyTorch side: the one registry of them. A family's module
computes the graphs that its declaration (runtime/families.py) names; a new family is such a module and one line
here. Modules are imported when asked for, so that no family's code loads unless it is used."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol

import onnx
import onnxruntime as ort
from torch import Tensor, nn

from edgeformer.export.parity import Tolerance
from edgeformer.runtime.spec import GraphSpec

FAMILY_MODULES = {"encoder-decoder": "edgeformer.export.encoder_decoder", "vit": "edgeformer.export.vit"}


class FamilyExport(Protocol):
    def graph_modules(self, model: Any) -> dict[str, nn.Module]:
        """graph name -> a module whose forward takes the graph's traced inputs (`traced`), in order, and returns its
        declared outputs, in order."""
        ...

    def traced(self, spec: GraphSpec) -> GraphSpec:
        """The part of a declared graph that torch.export traces from `graph_modules`' module."""
        ...

    def complete(self, name: str, proto: onnx.ModelProto) -> None:
        """Append, in ONNX operators, the declared inputs, outputs and nodes that the tracer does not make."""
        ...

    def example_inputs(self, model: Any) -> dict[str, tuple[Tensor, ...]]:
        """graph name -> inputs to trace it with (no axis of size 0 or 1: torch.export would fix it)."""
        ...

    def check_parity(self, model: Any, sessions: dict[str, ort.InferenceSession], specs: dict[str, GraphSpec],
                     tolerance: Tolerance) -> dict:
        """Raise ParityError where the graphs' outputs and PyTorch's differ; else the figures for the manifest."""
        ...

    def runtime_parity(self, bundle: Path, checkpoint: Path | str | None = None, n: int = 200,
                       eval: Path | str | None = None, threads: int | None = None) -> dict[str, float | str | int]:
        """A bundle run by the runtime against its checkpoint, as `edgeformer parity` reports it."""
        ...


def family_export(name: str) -> FamilyExport:
    if name not in FAMILY_MODULES:
        raise ValueError(f"no exporter for the model family {name!r}; known: {', '.join(FAMILY_MODULES)}")
    module: Any = importlib.import_module(FAMILY_MODULES[name])
    return module
