"""onnxruntime, in one place: execution providers by name, session options, and the IO binding the decoding loop
drives. Everything else opens sessions through here, so that an onnxruntime upgrade that moves a name breaks
this module alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _state

from edgeformer.runtime.errors import BundleError, InputError

CPU = "CPUExecutionProvider"
# What onnxruntime raises: its own classes (plain Exceptions, one per status code) and pybind11's RuntimeError.
ORT_ERRORS: tuple[type[BaseException], ...] = (
    *(v for v in vars(_state).values() if isinstance(v, type) and issubclass(v, Exception)), RuntimeError)



@dataclass(frozen=True)
class Provider:
    name: str  # onnxruntime's
    device: str  # where a step's caches live ("cpu" or "cuda"): outputs bound there stay there
    gpu: bool  # runs fp16 bundles (benchmarks measure fp16 on these only)
    fused_attention: bool  # runs com.microsoft.MultiHeadAttention itself (others hand it back to the CPU)


# Short names a user types -> onnxruntime's execution providers and what we need to know of each.
PROVIDERS = {
    "cpu": Provider(CPU, "cpu", gpu=False, fused_attention=True),
    "cuda": Provider("CUDAExecutionProvider", "cuda", gpu=True, fused_attention=True),
    "tensorrt": Provider("TensorrtExecutionProvider", "cuda", gpu=True, fused_attention=True),
    "openvino": Provider("OpenVINOExecutionProvider", "cpu", gpu=False, fused_attention=False),
    "coreml": Provider("CoreMLExecutionProvider", "cpu", gpu=False, fused_attention=False),
    "directml": Provider("DmlExecutionProvider", "cpu", gpu=True, fused_attention=False),
    "rocm": Provider("ROCMExecutionProvider", "cpu", gpu=True, fused_attention=True),
    "xnnpack": Provider("XnnpackExecutionProvider", "cpu", gpu=False, fused_attention=False),
    "qnn": Provider("QNNExecutionProvider", "cpu", gpu=False, fused_attention=False),
}
BY_NAME = {p.name: p for p in PROVIDERS.values()}
OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def provider(name: str) -> Provider:
    """A provider by short name ('cuda') or onnxruntime's ('CUDAExecutionProvider')."""
    found = PROVIDERS.get(name.lower()) or BY_NAME.get(name) if isinstance(name, str) else None
    if found is None:
        raise InputError(f"unknown execution provider {name!r}; known: {', '.join(PROVIDERS)}")
    return found


def available() -> list[str]:
    """The compute providers onnxruntime has here, by onnxruntime's names (AzureExecutionProvider, a remote-call
    provider, is not one)."""
    return [p for p in ort.get_available_providers() if p in BY_NAME]


def resolve_providers(requested: Sequence[str] | str) -> list[str]:
    """Map names (short or onnxruntime's; a list, or one comma-separated string) to the available providers, in the
    order asked, CPU last as fallback."""
    if isinstance(requested, str):
        requested = requested.split(",")
    if not isinstance(requested, Sequence) or not all(isinstance(p, str) for p in requested):
        raise InputError(f"providers must be names, such as ['cuda', 'cpu'], not {requested!r}")
    chosen = []
    for name in requested:
        full = provider(name).name
        if full in ort.get_available_providers() and full not in chosen:
            chosen.append(full)
    if CPU not in chosen:
        chosen.append(CPU)
    return chosen


def session_options(optimization: str = "all", threads: int | None = None, spin: bool = False,
                    stop_spinning: bool = True, optimized_path: Path | None = None) -> ort.SessionOptions:
    """Intra-op threads spin for work while a run lasts (spin), and stop when it returns (stop_spinning) or keep
    spinning until the next run: the runtime's encoder stops, its decoder keeps spinning between the steps of a
    generate call, where waking a sleeping thread cost a scheduler tick (README: Benchmarks, "Threads").
    optimized_path: where onnxruntime saves the graph as optimized for the session's provider."""
    if not isinstance(optimization, str):
        raise InputError(f"optimization must be a level's name, not {optimization!r}")
    if optimization not in OPTIMIZATION_LEVELS:
        raise InputError(f"unknown optimization level {optimization!r}; choose one of "
                         f"{', '.join(OPTIMIZATION_LEVELS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.add_session_config_entry("session.force_spinning_stop", "1" if stop_spinning else "0")
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return options


def open_session(path: Path, options: ort.SessionOptions | None = None,
                 providers: Sequence[str] = (CPU,)) -> ort.InferenceSession:
    """A session of the graph at `path`; BundleError if onnxruntime cannot load it."""
    try:
        return ort.InferenceSession(str(path), options or session_options(), providers=list(providers))
    except ORT_ERRORS as e:
        raise BundleError(f"{path}: onnxruntime cannot load this graph ({str(e)[:500]})") from None


def graph_io(session: ort.InferenceSession) -> tuple[list[str], list[str]]:
    """The names of a session's inputs and outputs, in order."""
    return [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]


class StepBinding:
    """One IO binding of a session, driven without onnxruntime's Python wrapper.

    A step of a small model costs little more than the Python around `run`, and the public wrapper checks and
    re-wraps every value on every call, so the loop talks to the pybind objects themselves (README: Runtime).
    Their names (`InferenceSession._sess`, `IOBinding._iobinding`, `OrtValue._ortvalue`,
    `OrtDevice._get_c_device`) are private, unchanged since onnxruntime's early releases, and used nowhere else.
    The methods are the pybind ones, bound once, so a call costs what it did inline."""

    def __init__(self, session: ort.InferenceSession) -> None:
        binding = session.io_binding()._iobinding
        self.bind_input: Callable[[str, Any], None] = binding.bind_input  # (name, numpy array), read in place
        self.bind_value: Callable[[str, Any], None] = binding.bind_ortvalue_input  # (name, raw(value))
        self.bind_output: Callable[[str, Any], None] = binding.bind_output  # (name, device(kind))
        self.bind_value_output: Callable[[str, Any], None] = binding.bind_ortvalue_output  # written in place
        self.clear_outputs: Callable[[], None] = binding.clear_binding_outputs
        self.outputs: Callable[[], Any] = binding.get_outputs  # index them: iterating costs 0.05 ms
        self.run: Callable[[], None] = functools.partial(session._sess.run_with_iobinding, binding, None)

    @staticmethod
    def raw(value: ort.OrtValue) -> Any:
        return value._ortvalue

    @staticmethod
    def device(kind: str) -> Any:
        return ort.OrtDevice.make(kind, 0)._get_c_device()
