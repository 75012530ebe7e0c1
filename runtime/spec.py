"""What a model family is, as data: its graphs, the file each graph is stored in, every graph's inputs and outputs
with dtype and symbolic shape. The exporter builds its graphs from a family's declaration and writes it into the
bundle's manifest; the runtime reads it back and checks the graphs against it; parity checks and benchmarks feed
the graphs by it. A new family is a module that declares one `Family` and a line in `runtime/families.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from edgeformer.runtime.errors import BundleError

DTYPES = ("int64", "int32", "float32", "float16", "bfloat16")  # those a graph's inputs and outputs may have


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "int64", "float32", "float16"
    shape: tuple[str | int, ...]  # symbolic axis names (an output's may be a sum: "past_len+tgt_len") or sizes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        """ValueError (or KeyError, TypeError) unless `d` is a tensor as to_dict writes it."""
        name, dtype, shape = d["name"], d["dtype"], d["shape"]
        if not isinstance(name, str) or dtype not in DTYPES or not isinstance(shape, list) or any(
                isinstance(a, bool) or not isinstance(a, (str, int)) for a in shape):
            raise ValueError(f"tensor {name!r}: a name, a dtype of {', '.join(DTYPES)} and a list of axes")
        return cls(name, dtype, tuple(shape))


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def signature(self) -> tuple:
        """The names and shapes of the inputs and outputs: what a family declares, whatever a variant's dtypes."""
        return tuple((t.name, t.shape) for t in self.inputs), tuple((t.name, t.shape) for t in self.outputs)

    def check_names(self, inputs: list[str], outputs: list[str], where: object) -> None:
        """Raise BundleError unless a graph's inputs and outputs are exactly these, in this order."""
        if inputs != self.input_names or outputs != self.output_names:
            raise BundleError(f"{where}: the graph's inputs/outputs {inputs} -> {outputs} differ from the declared "
                             f"{self.input_names} -> {self.output_names}")

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}

    @classmethod
    def from_dict(cls, name: str, d: dict[str, Any]) -> GraphSpec:
        return cls(name, tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
                   tuple(TensorSpec.from_dict(t) for t in d["outputs"]))


@dataclass(frozen=True)
class Family:
    """A model family: which graphs a bundle of it holds (in the order they run, each with its file), the symbolic
    axes, every one of them dynamic, and the graphs' tensors for a given model config (config.json as a dict)."""

    name: str
    graph_files: dict[str, str]  # graph name -> file in the bundle
    axes: tuple[str, ...]
    graphs: Callable[..., dict[str, GraphSpec]]  # (config, cache=..., search=...) -> the graphs
    check_config: Callable[[Mapping[str, Any]], list[str]]  # the problems of a config read from a manifest
    caches: tuple[str, ...] = ("concat",)  # the ways a bundle's graphs may pass a cache, the first the exporter's
    searches: tuple[str, ...] = ()  # the searches a bundle may carry in one graph of its own
    # onnxruntime's fusions that run slower than their parts in this family's graphs on the CPU: `optimize` and every
    # CPU session leave them out (README: "Fusions on the CPU")
    cpu_unfused: tuple[str, ...] = ()
