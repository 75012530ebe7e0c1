"""Execution providers: what a user asks for ("cpu", "cuda:0", "openvino:CPU", "auto") turned into how onnxruntime
opens a session, through its device API where a provider comes as a plugin package.

Plugin packages (`onnxruntime-ep-openvino`, `onnxruntime-ep-webgpu`, `onnxruntime-ggml`...) ship a provider library
that onnxruntime loads with `register_execution_provider_library`; the provider then lists the devices it runs on
(`get_ep_devices`) and a session takes one with `SessionOptions.add_provider_for_devices`. The packages are found
among the installed distributions by name and registered once per process, when a request needs more than the CPU.
Providers built into the onnxruntime wheel (onnxruntime-gpu's CUDA and TensorRT, onnxruntime-openvino's OpenVINO,
DirectML, CoreML, QNN) keep their names. A choice that cannot be had here is a note that says which and why; the
next choice is tried, the CPU last.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata as metadata
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import onnxruntime as ort

from edgeformer.runtime.errors import InputError

CPU = "CPUExecutionProvider"
# onnxruntime's policies for "auto:<policy>" ("auto" alone: max_performance)
POLICIES = {name.lower(): value for name, value in ort.OrtExecutionProviderDevicePolicy.__members__.items()}
AUTO_POLICY = "max_performance"
# Short names for the providers built into onnxruntime wheels; any provider is also taken by onnxruntime's name, or by
# that name less "ExecutionProvider" ("webgpu", "ggml").
SHORT_NAMES = {"cpu": CPU, "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
               "openvino": "OpenVINOExecutionProvider", "coreml": "CoreMLExecutionProvider",
               "directml": "DmlExecutionProvider", "rocm": "ROCMExecutionProvider",
               "migraphx": "MIGraphXExecutionProvider", "xnnpack": "XnnpackExecutionProvider",
               "qnn": "QNNExecutionProvider", "webgpu": "WebGpuExecutionProvider",
               "nv-tensorrt-rtx": "NvTensorRTRTXExecutionProvider", "ggml": "ggml"}
LONG_NAMES = {v.lower(): v for v in SHORT_NAMES.values()}  # onnxruntime's names, whatever the case
# Where each comes from, for the message when it is missing
PACKAGES = {"CUDAExecutionProvider": "onnxruntime-gpu", "TensorrtExecutionProvider": "onnxruntime-gpu and TensorRT",
            "OpenVINOExecutionProvider": "onnxruntime-ep-openvino (a plugin: Intel devices) or onnxruntime-openvino "
                                         "(a wheel in place of onnxruntime)",
            "CoreMLExecutionProvider": "onnxruntime on macOS", "DmlExecutionProvider": "onnxruntime-directml (Windows)",
            "QNNExecutionProvider": "onnxruntime-qnn", "WebGpuExecutionProvider": "onnxruntime-ep-webgpu",
            "NvTensorRTRTXExecutionProvider": "onnxruntime-ep-nv-tensorrt-rtx",
            "ROCMExecutionProvider": "onnxruntime-rocm", "MIGraphXExecutionProvider": "onnxruntime-migraphx",
            "ggml": "onnxruntime-ggml (pip install --no-deps onnxruntime-ggml==0.2.0)"}
# Plugin packages not named onnxruntime-ep-*: distribution -> the environment they are quiet in (their own defaults
# trace every call to stderr)
OTHER_PLUGINS = {"onnxruntime-ggml": {"ORT_GGML_LOG": "error"}}
# (module attribute that gives the library's path, attribute that gives the provider names), in the forms seen
LIBRARY_ATTRIBUTES = ("get_library_path", "library_path")
NAME_ATTRIBUTES = ("get_ep_names", "get_ep_name", "EP_NAME")
GPU_MEMORY = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}  # caches stay on the device


@dataclass(frozen=True)
class Plugin:
    """An installed plugin package, and what came of registering it."""
    distribution: str
    version: str
    providers: tuple[str, ...] = ()  # the provider names it declares
    library: str = ""
    problem: str = ""  # why it could not be registered ("" when it was)


@dataclass(frozen=True)
class Device:
    """One device a provider offers (an OrtEpDevice, described)."""
    provider: str
    kind: str  # CPU, GPU, NPU
    vendor: str  # the hardware's
    provider_vendor: str
    version: str  # the provider's, where it says
    index: int  # among this provider's devices
    label: str  # the choice that names it: provider:KIND where the kind is the provider's only one of it, else :index
    handle: Any = field(repr=False, compare=False)


@dataclass(frozen=True)
class Placement:
    """Where a session runs, and how onnxruntime is told: a device of a plugin provider, a policy over all devices,
    or built-in providers by name (with their options)."""
    label: str = field(compare=False)  # as the user asked it ("ggml" and "ggml:CPU" are one placement)
    provider: str  # onnxruntime's name; "" for a policy, which onnxruntime resolves when the session opens
    devices: tuple[Device, ...] = ()
    policy: str = ""
    providers: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()  # (name, options) of built-in providers
    device_id: int = 0  # which of the provider's devices: where its outputs are bound

    def configure(self, options: ort.SessionOptions) -> list[Any] | None:
        """Set `options` for this placement; the providers list InferenceSession takes (None: the options say)."""
        if self.devices:
            options.add_provider_for_devices([d.handle for d in self.devices], {})
            return None
        if self.policy:
            options.set_provider_selection_policy(POLICIES[self.policy])
            return None
        return [(name, dict(opts)) if opts else name for name, opts in self.providers]


CPU_PLACEMENT = Placement("cpu", CPU, providers=((CPU, ()),))


def short(provider: str) -> str:
    """'OpenVINOExecutionProvider' -> 'openvino'."""
    found = next((k for k, v in SHORT_NAMES.items() if v == provider), None)
    return found or provider.removesuffix("ExecutionProvider").lower()


@functools.cache
def installed_plugins() -> tuple[tuple[str, str, str], ...]:
    """(distribution, version, module) of each plugin package installed, found by name."""
    found = {}
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name.startswith("onnxruntime-ep-") or name in OTHER_PLUGINS:
            top = (dist.read_text("top_level.txt") or "").split()
            found[name] = (name, dist.version, top[0] if top else name.replace("-", "_"))
    return tuple(sorted(found.values()))


def _call(module: Any, attributes: Sequence[str]) -> Any:
    for attribute in attributes:
        value = getattr(module, attribute, None)
        if value is not None:
            return value() if callable(value) else value
    raise AttributeError(f"none of {', '.join(attributes)}")


@functools.cache
def plugins() -> tuple[Plugin, ...]:
    """Every installed plugin package, registered with onnxruntime (once per process); a package that cannot be
    is kept with its problem, for the notes."""
    out = []
    for distribution, version, module_name in installed_plugins():
        try:
            for key, value in OTHER_PLUGINS.get(distribution, {}).items():
                os.environ.setdefault(key, value)
            module = importlib.import_module(module_name)
            library = str(_call(module, LIBRARY_ATTRIBUTES))
            names = _call(module, NAME_ATTRIBUTES)
            names = (names,) if isinstance(names, str) else tuple(names)
            if not names:
                raise ValueError("it names no provider")
        except Exception as e:  # a package's own code: whatever it raises, the package is unusable, not the runtime
            out.append(Plugin(distribution, version, problem=f"its module {module_name} does not say which library "
                                                              f"to load ({type(e).__name__}: {str(e)[:200]})"))
            continue
        registered = {d.ep_name for d in ort.get_ep_devices()}
        try:
            ort.register_execution_provider_library(names[0], library)
        except Exception as e:  # onnxruntime's or the library's failure, reported as the package's
            # registered before, by the user or the package's own helper, under this name: fine
            if not (registered & set(names) or "already registered" in str(e)):
                out.append(Plugin(distribution, version, names, library,
                                  problem=f"onnxruntime cannot load {library} ({str(e)[:300]})"))
                continue
        out.append(Plugin(distribution, version, names, library))
    return tuple(out)


def devices(register: bool = True) -> list[Device]:
    """The devices each provider offers here (the CPU provider's among them), plugins registered first."""
    if register:
        plugins()
    found = ort.get_ep_devices()
    kinds = [(d.ep_name, d.device.type.name) for d in found]
    out: list[Device] = []
    for d in found:
        index = sum(o.provider == d.ep_name for o in out)
        kind = d.device.type.name
        label = f"{short(d.ep_name)}:{kind if kinds.count((d.ep_name, kind)) == 1 else index}"
        out.append(Device(d.ep_name, kind, d.device.vendor, d.ep_vendor, dict(d.ep_metadata).get("version", ""),
                          index, label, d))
    return out


def built_in() -> list[str]:
    """The providers compiled into this onnxruntime wheel (AzureExecutionProvider, a remote call, is not one; nor
    are the registered plugins with a device, which onnxruntime lists beside them)."""
    from_plugins = {n for p in plugins() for n in p.providers}
    return [p for p in ort.get_available_providers() if p != "AzureExecutionProvider" and p not in from_plugins]


def known_names() -> dict[str, str]:
    """Every name a provider is taken by here -> onnxruntime's name."""
    names = dict(SHORT_NAMES)
    for p in [*built_in(), *(d.provider for d in devices(register=False)),
              *(n for plugin in plugins() for n in plugin.providers)]:
        names[p.lower()] = p
        names[short(p)] = p
    return names


def _machine() -> str:
    found = ", ".join(f"{d.kind} {d.vendor}" for d in devices(register=False) if d.provider == CPU)
    return found or "no device"


def _resolve(spec: str) -> tuple[Placement | None, str]:
    """One choice -> its placement, or None and why not."""
    name, _, selector = spec.partition(":")
    if name.lower() == "auto":
        policy = selector.lower() or AUTO_POLICY
        if policy not in POLICIES:
            raise InputError(f"{spec!r}: unknown policy {selector!r}; choose auto or auto:<policy>, of "
                             f"{', '.join(POLICIES)}")
        plugins()
        return Placement(spec, "", policy=policy), ""
    provider = SHORT_NAMES.get(name.lower()) or LONG_NAMES.get(name.lower())  # known without registering
    if provider is None:
        names = known_names()
        provider = names.get(name.lower())
        if provider is None:
            known = sorted(set(map(short, names.values())))
            raise InputError(f"unknown execution provider {name!r}; known here: {', '.join(known)} (or auto)")
    if provider == CPU:
        if selector and selector.lower() not in ("cpu", "0"):
            raise InputError(f"{spec!r}: the CPU provider has one device, cpu")
        return CPU_PLACEMENT, ""
    offered = [d for d in devices() if d.provider == provider]
    if offered:
        chosen = [d for d in offered if not selector or selector.lower() in (d.kind.lower(), str(d.index))]
        if not chosen:
            return None, (f"{spec}: {provider} offers {', '.join(d.label for d in offered)} here, none of them "
                          f"{selector!r}")
        return Placement(spec, provider, devices=(chosen[0],), device_id=chosen[0].index), ""
    if provider in built_in():
        options: tuple[tuple[str, str], ...] = ()
        if selector:  # the built-in providers' own option for a device
            options = ((("device_id", selector),) if selector.isdigit() else (("device_type", selector.upper()),))
        listed = getattr(ort.capi._pybind_state, "get_available_openvino_device_ids", None)  # onnxruntime-openvino's
        if provider == SHORT_NAMES["openvino"] and selector and listed and selector.upper() not in listed():
            return None, f"{spec}: {provider} offers {', '.join(listed())} here, not {selector}"
        return Placement(spec, provider, providers=((provider, options), (CPU, ())),
                         device_id=int(selector) if selector.isdigit() else 0), ""
    plugin = next((p for p in plugins() if provider in p.providers or (
        p.problem and p.distribution.removeprefix("onnxruntime-").removeprefix("ep-") == short(provider))), None)
    if plugin is not None and plugin.problem:
        return None, f"{spec}: {plugin.distribution} {plugin.version} is installed, but {plugin.problem}"
    if plugin is not None:
        return None, (f"{spec}: {plugin.distribution} {plugin.version} is installed and registered, but {provider} "
                      f"lists no device on this machine (onnxruntime sees: {_machine()})")
    return None, (f"{spec}: {provider} is not in this onnxruntime ({ort.__version__}: {', '.join(built_in())})"
                  + (f"; it comes with {PACKAGES[provider]}" if provider in PACKAGES else ""))


def placements(requested: Sequence[str] | str) -> tuple[list[Placement], list[str]]:
    """The choices (a list, or one comma-separated string) that can be had here, in the order asked, the CPU last;
    and a note for each that cannot, saying why. An unknown name is an InputError, not a note."""
    if isinstance(requested, str):
        requested = [p.strip() for p in requested.split(",")]
    if (isinstance(requested, (str, bytes)) or not isinstance(requested, Sequence) or not requested
            or not all(isinstance(p, str) and p for p in requested)):
        raise InputError(f"providers must be names, such as ['cuda:0', 'cpu'] or 'auto', not {requested!r}")
    usable: list[Placement] = []
    notes: list[str] = []
    for spec in requested:
        placement, why = _resolve(spec)
        if placement is None:
            if why not in notes:
                notes.append(why)
        elif placement not in usable:
            usable.append(placement)
    if CPU_PLACEMENT not in usable:
        usable.append(CPU_PLACEMENT)
    return usable, notes


def require(spec: str) -> Placement:
    """The placement of one choice; InputError, with the note, where it cannot be had here."""
    if not isinstance(spec, str) or "," in spec:
        raise InputError(f"name one execution provider, not {spec!r}")
    placement, why = _resolve(spec)
    if placement is None:
        raise InputError(why)
    return placement


def caller_level() -> int:
    """The stack level of the first caller outside the runtime, for a warning that points at the user's line."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith("edgeformer.runtime"):
        frame, level = frame.f_back, level + 1
    return level


def assignment(session: ort.InferenceSession) -> dict[str, int]:
    """Nodes each provider runs, of a session opened with RECORD_ASSIGNMENT set ({} where it was not)."""
    counts: dict[str, int] = {}
    with contextlib.suppress(Exception):  # not recorded: onnxruntime says so by raising
        for subgraph in session.get_provider_graph_assignment_info():
            counts[subgraph.ep_name] = counts.get(subgraph.ep_name, 0) + len(subgraph.get_nodes())
    return counts


RECORD_ASSIGNMENT = "session.record_ep_graph_assignment_info"
