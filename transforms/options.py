"""The transforms' options, as dataclasses with their allowed values in constants the command line's choices
reuse. Light on purpose (no onnx, no torch): the command line builds its parser from them."""

from __future__ import annotations

import contextlib
import platform
from dataclasses import dataclass, field
from pathlib import Path

from edgeformer.export.evaluation import EvalSet
from edgeformer.runtime.encoder_decoder import CACHES
from edgeformer.runtime.engine import OPTIMIZATION_LEVELS

OFFLINE_LEVELS = tuple(level for level in OPTIMIZATION_LEVELS if level != "disable")


@dataclass(frozen=True)
class OptimizeOptions:
    level: str = "extended"  # onnxruntime's level saved offline; "all" adds layout changes tied to the machine
    provider: str = "cpu"  # the execution provider the graphs are optimized for
    fuse_attention: bool | None = None  # None: where the provider runs the fused kernel
    cache: str | None = None  # the decoder's self-attention cache, "concat" or "buffer"; None: buffer on the CPU

    def __post_init__(self) -> None:
        if self.level not in OFFLINE_LEVELS:
            raise ValueError(f"unknown optimization level {self.level!r}; choose one of {', '.join(OFFLINE_LEVELS)}")
        if self.cache not in (None, *CACHES):
            raise ValueError(f"unknown cache {self.cache!r}; choose one of {', '.join(CACHES)}")


# int8 presets: what suits each instruction set (onnxruntime's quantization guide). On AVX2 and AVX-512 without
# VNNI, u8s8 products can saturate, so `avx2` keeps weights in 7 bits (reduce_range); VNNI and ARM64 dot products do
# not. `avx2-8bit` takes the full 8 bits there anyway: faster, at some precision (README: Optimize and quantize).
INT8_PRESETS = {
    "avx2": {"reduce_range": True, "per_channel": True},
    "avx2-8bit": {"reduce_range": False, "per_channel": True},
    "avx512-vnni": {"reduce_range": False, "per_channel": True},
    "arm64": {"reduce_range": False, "per_channel": True},
}
AUTO = "auto"  # `quantize`: this CPU's presets, fastest first, the first that passes its gate (`cpu_presets`)


def cpu_flags() -> set[str]:
    """The instruction-set flags of this CPU, as Linux's /proc/cpuinfo lists them (none elsewhere)."""
    with contextlib.suppress(OSError, StopIteration):
        info = Path("/proc/cpuinfo").read_text().splitlines()
        return set(next(line for line in info if line.startswith("flags")).split())
    return set()


def cpu_presets(flags: set[str] | None = None, machine: str | None = None) -> tuple[str, ...]:
    """The int8 presets `auto` tries on this CPU, fastest first. With VNNI (AVX-512 or AVX) or on ARM64, full 8
    bits. On AVX2 alone, full 8 bits ran faster (the tied projection on u8s8 kernels), though their u8 x s8 sums
    can saturate: then 7-bit weights if the full 8 bits miss the gate."""
    machine = (machine or platform.machine()).lower()
    if machine in ("arm64", "aarch64"):
        return ("arm64",)
    if flags is None:
        flags = cpu_flags()
    return ("avx512-vnni",) if flags & {"avx512_vnni", "avx_vnni"} else ("avx2-8bit", "avx2")


INT8_METHODS = ("dynamic", "static")


@dataclass(frozen=True)
class QuantizeOptions:
    preset: str = "avx2"  # int8: one of INT8_PRESETS
    method: str = "dynamic"  # int8: one of INT8_METHODS
    block_size: int = 32  # int4
    keep: list[str] = field(default_factory=list)  # node names, operator types or OUTPUT_PROJECTION, kept in fp32
    calibration: EvalSet | None = None  # int8 static: the inputs to calibrate activation ranges on

    def __post_init__(self) -> None:
        if self.preset == AUTO:
            object.__setattr__(self, "preset", cpu_presets()[0])
        if self.preset not in INT8_PRESETS:
            raise ValueError(f"unknown int8 preset {self.preset!r}; choose one of {AUTO}, {', '.join(INT8_PRESETS)}")
        if self.method not in INT8_METHODS:
            raise ValueError(f"unknown int8 method {self.method!r}; choose one of {', '.join(INT8_METHODS)}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"int4 block size must be a power of two >= 16, got {self.block_size}")
