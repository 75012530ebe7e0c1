"""onnxruntime, in one place: execution providers by name, session options, and the IO binding the decoding loop
drives. Everything else opens sessions through here, so that an onnxruntime upgrade that moves a name breaks
this module alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _state

from edgeformer.runtime.errors import BundleError, InputError
from edgeformer.runtime.providers import (
    CPU,
    CPU_PLACEMENT,
    GPU_MEMORY,
    RECORD_ASSIGNMENT,
    SHORT_NAMES,
    Placement,
    assignment,
    known_names,
)

# What onnxruntime raises: its own classes (plain Exceptions, one per status code) and pybind11's RuntimeError.
ORT_ERRORS: tuple[type[BaseException], ...] = (
    *(v for v in vars(_state).values() if isinstance(v, type) and issubclass(v, Exception)), RuntimeError)



@dataclass(frozen=True)
class Provider:
    name: str  # onnxruntime's
    device: str  # where a step's caches live ("cpu" or "cuda"): outputs bound there stay there
    gpu: bool  # runs fp16 bundles (benchmarks measure fp16 on these only)
    fused_attention: bool  # runs com.microsoft.MultiHeadAttention itself (others hand it back to the CPU)


# What we know of providers beyond their names (runtime/providers.py finds and names them); others: a CPU-memory
# provider without the fused attention kernel.
GPU_PROVIDERS = {"CUDAExecutionProvider", "TensorrtExecutionProvider", "DmlExecutionProvider", "ROCMExecutionProvider",
                 "MIGraphXExecutionProvider", "WebGpuExecutionProvider", "NvTensorRTRTXExecutionProvider"}
FUSED_ATTENTION = {CPU, "CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider"}
OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def provider(name: str) -> Provider:
    """A provider by any name runtime/providers.py takes ('cuda', 'CUDAExecutionProvider', 'openvino:CPU')."""
    if not isinstance(name, str) or not name:
        raise InputError(f"an execution provider is named by a string, not {name!r}")
    base = name.partition(":")[0]
    full = SHORT_NAMES.get(base.lower()) or (base if base.endswith("ExecutionProvider") else None)
    full = full or known_names().get(base.lower())
    if full is None:
        raise InputError(f"unknown execution provider {name!r}; known: {', '.join(sorted(set(SHORT_NAMES)))}")
    return Provider(full, GPU_MEMORY.get(full, "cpu"), gpu=full in GPU_PROVIDERS,
                    fused_attention=full in FUSED_ATTENTION)


def session_options(optimization: str = "all", threads: int | None = None, spin: bool = False,
                    stop_spinning: bool = True, optimized_path: Path | None = None,
                    arena: bool = True) -> ort.SessionOptions:
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
    options.enable_cpu_mem_arena = arena
    return options


def _session(path: Path, options: ort.SessionOptions, placement: Placement,
             cpu_unfused: tuple[str, ...] = ()) -> ort.InferenceSession:
    # without onnxruntime's own fallback, which prints to stdout and retries on the CPU: the next choice is ours
    unfused = list(cpu_unfused) if placement.provider == CPU else []
    return ort.InferenceSession(str(path), options, providers=placement.configure(options), enable_fallback=0,
                                disabled_optimizers=unfused or None)


def open_session(path: Path, options: ort.SessionOptions | None = None, placement: Placement = CPU_PLACEMENT,
                 cpu_unfused: tuple[str, ...] = ()) -> ort.InferenceSession:
    """A session of the graph at `path` where `placement` says, on the CPU without onnxruntime's fusions named in
    `cpu_unfused` (a family's, runtime/spec.py); BundleError if onnxruntime cannot load it."""
    options = options or session_options()
    try:
        return _session(path, options, placement, cpu_unfused)
    except ORT_ERRORS as e:
        raise BundleError(f"{path}: onnxruntime cannot load this graph on {placement.label} ({str(e)[:500]})"
                          ) from None


def open_first(path: Path, make_options: Callable[[], ort.SessionOptions], placements: list[Placement],
               notes: list[str], cpu_unfused: tuple[str, ...] = ()) -> ort.InferenceSession:
    """A session on the first of `placements` that takes the graph. One that fails is dropped from the list (the
    caller's other graphs go where this one went) with a note that says why; the CPU, last, raises. The caller
    holds `placements` and `notes` alone while this runs."""
    while True:
        placement = placements[0]
        options = make_options()
        if placement.provider != CPU:
            options.add_session_config_entry(RECORD_ASSIGNMENT, "1")
        try:
            session = _session(path, options, placement, cpu_unfused)
        except ORT_ERRORS as e:
            if len(placements) == 1:
                raise BundleError(f"{path}: onnxruntime cannot load this graph ({str(e)[:500]})") from None
            placements.pop(0)
            notes.append(f"{placement.label} cannot take {path.name} ({str(e)[:300]}); next: {placements[0].label}")
            continue
        taken = assignment(session)
        note = ""
        if placement.provider and placement.provider not in session.get_providers():
            note = (f"{placement.label}: onnxruntime could not start {placement.provider} for {path.name} (its log "
                    "says why); the CPU provider runs it")
        elif taken and placement.provider and not taken.get(placement.provider):
            note = (f"{placement.label} took none of {path.name}'s {sum(taken.values())} nodes (the CPU provider "
                    "runs them)")
        if note and note not in notes:
            notes.append(note)
        return session


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
    def device(kind: str, device_id: int = 0) -> Any:
        return ort.OrtDevice.make(kind, device_id)._get_c_device()
