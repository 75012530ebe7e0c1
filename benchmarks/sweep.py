"""`edgeformer bench`: latency and throughput across variants, providers, batch sizes, lengths and threads,
against PyTorch eager (with and without its KV cache) on the same weights, in one run on one machine.

Each sweep varies one axis around a base point (batch 1, 32 source tokens, 64 new tokens, 2 threads). At every
point all systems run interleaved, warm-up discarded, until their medians are stable (benchmarks/latency.py), and every
ONNX figure gets its ratio to PyTorch with its cache, measured in those same interleaved runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from tqdm import tqdm

from edgeformer.benchmarks.latency import compare_latency, timing_record
from edgeformer.benchmarks.memory import measure
from edgeformer.export.onnx_export import export
from edgeformer.model.checkpoint import load_checkpoint
from edgeformer.model.generate import TorchFullSteps, TorchSteps
from edgeformer.report.format import ratio_text, table
from edgeformer.runtime import engine
from edgeformer.runtime.bundle import Manifest, producer_versions
from edgeformer.runtime.encoder_decoder import ENCODER_DECODER
from edgeformer.runtime.providers import built_in
from edgeformer.runtime.search import StepModel
from edgeformer.runtime.session import Runtime
from edgeformer.transforms.derive import build_variants
from edgeformer.transforms.options import cpu_flags
from edgeformer.transforms.registry import CPU_VARIANTS, TRANSFORMS

TORCH_KV, TORCH_FULL = "pytorch-eager-kv", "pytorch-eager-no-cache"


@dataclass(frozen=True)
class Point:
    batch: int = 1
    src_len: int = 32
    new_tokens: int = 64
    threads: int = 2


SWEEPS: dict[str, Sequence[int]] = {"batch": (1, 4, 16, 64), "src_len": (8, 32, 128, 512),
                                      "new_tokens": (16, 64, 256), "threads": (1, 2)}


def sweep_points(sweeps: Mapping[str, Sequence[int]], base: Point = Point(),
                 repeat_base: bool = False) -> list[tuple[str, Point]]:
    """(axis, point) for the base point and every value of every axis, each point once; with repeat_base, the
    base point again at the end, to see how far two measurements of one configuration differ."""
    points: list[tuple[str, Point]] = [("base", base)]
    for axis, values in sweeps.items():
        points += [(axis, replace(base, **{axis: v})) for v in values if replace(base, **{axis: v}) != base]
    return [*points, ("base-repeat", base)] if repeat_base else points


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        info = Path("/proc/cpuinfo").read_text()
        cpu = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
    present = cpu_flags()
    flags = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "fma") if f in present]
    return {"cpu": cpu, "cores": os.cpu_count(), "flags": flags, "system": platform.platform(),
            "python": platform.python_version(), "providers": ort.get_available_providers(), **producer_versions()}


def configurations(variants: Sequence[str] | None, providers: Sequence[str]) -> list[tuple[str, str]]:
    """(variant, provider) pairs to measure: each variant on each provider, but fp16, a GPU variant, on GPU
    providers only; by default CPU_VARIANTS, and fp16 too where a GPU provider is measured."""
    gpu = [p for p in providers if engine.provider(p).gpu]
    variants = variants or (*CPU_VARIANTS, *([v for v in TRANSFORMS if TRANSFORMS[v].gpu] if gpu else []))
    return [(v, p) for v in variants for p in (gpu if v in TRANSFORMS and TRANSFORMS[v].gpu else providers)]


def bench(checkpoint: Path | str | None = None, variants: Sequence[str] | None = None,
          providers: Sequence[str] | None = None, sweeps: Mapping[str, Sequence[int]] | None = None,
          base: Point = Point(), no_cache_reference: bool = True, max_seconds: float = 20.0,
          repeat_base: bool = True, spin: bool = True, memory: bool = True, decoder_threads: int | None = None,
          out: Path | None = None, progress: bool = True, log: Callable[[str], None] = print) -> list[dict]:
    """Export a checkpoint (the shipped model by default), build its variants, and measure every system at
    every point; with `memory`, each configuration's peak resident memory too, in a process of its own
    (benchmarks/memory.py). Writes results.json, results.md and per_token_latency.png to `out` when given.

    Variants by default: CPU_VARIANTS, and fp16 where a GPU provider is measured; fp16 runs on GPU providers only.
    The runtime's decoder runs on `decoder_threads` at every point; None: the runtime's default (one thread
    for the small steps of a small model, the point's threads otherwise; see Runtime)."""
    model, _ = load_checkpoint(checkpoint)
    if model.family != ENCODER_DECODER.name:
        raise ValueError(f"bench times {ENCODER_DECODER.name} decoding steps; a {model.family} model has none")
    c = model.config
    # every provider built into this onnxruntime (plugin packages: `edgeformer bench --providers all`)
    providers = list(providers or built_in())
    pairs = configurations(variants, providers)
    variants = list(dict.fromkeys(v for v, _ in pairs))
    points = sweep_points(SWEEPS if sweeps is None else sweeps, base, repeat_base)
    records: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        log("building the bundles (export, optimize, quantize the optimized bundle; each checked against its source)")
        export(checkpoint, Path(tmp) / "fp32")
        bundles = {v: path for v, (path, _) in build_variants(Path(tmp) / "fp32", tmp, variants).items()}
        sizes = {v: Manifest.load(p, verify=False).bytes(p) for v, p in bundles.items()}
        runtimes: dict[tuple[str, str, int], tuple[Runtime, float]] = {}
        peaks: dict[str, float] = {}  # one child process per configuration

        def peak_mb(spec: dict[str, Any], p: Point) -> float | None:
            if not memory:
                return None
            spec = {**spec, **asdict(p), "src_vocab_size": c.src_vocab_size, "bos_id": c.bos_id}
            key = json.dumps(spec, sort_keys=True)
            if key not in peaks:
                peaks[key] = measure(spec)["peak_rss_mb"]
            return peaks[key]

        def runtime(variant: str, provider: str, threads: int) -> tuple[Runtime, float]:
            key = (variant, provider, threads)
            if key not in runtimes:
                start = time.perf_counter()
                rt = Runtime(bundles[variant], providers=[provider], threads=threads, spin=spin,
                             decoder_threads=decoder_threads)
                runtimes[key] = (rt, time.perf_counter() - start)
            return runtimes[key]

        rng = np.random.default_rng(0)
        bar = tqdm(points, desc="bench", unit="point", disable=not progress)
        for axis, p in bar:
            bar.set_postfix(axis=axis, batch=p.batch, src=p.src_len, new=p.new_tokens, threads=p.threads)
            torch.set_num_threads(p.threads)
            ids = rng.integers(4, c.src_vocab_size, (p.batch, p.src_len))
            mask = np.ones_like(ids)
            t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
            systems: dict[str, Callable[[], StepModel]] = {TORCH_KV: partial(TorchSteps, model, t_ids, t_mask, 1)}
            if no_cache_reference:
                systems[TORCH_FULL] = partial(TorchFullSteps, model, t_ids, t_mask, 1)
            torch_info = {"variant": "pytorch", "provider": "torch-cpu", "session_start_s": 0.0,
                          "bundle_bytes": sizes["fp32"], "decoder_threads": p.threads}
            info: dict[str, dict] = {TORCH_KV: torch_info, TORCH_FULL: torch_info}
            source = None if checkpoint is None else str(checkpoint)
            memory_specs: dict[str, dict[str, Any]] = {TORCH_KV: {"system": "torch-kv", "checkpoint": source},
                                                       TORCH_FULL: {"system": "torch-no-cache", "checkpoint": source}}
            for v, prov in pairs:
                rt, start_s = runtime(v, prov, p.threads)
                name = f"{v} {rt.provider.removesuffix('ExecutionProvider')}"
                systems[name] = partial(rt.step_model, ids, mask, 1)
                info[name] = {"variant": v, "provider": rt.provider, "session_start_s": start_s,
                              "bundle_bytes": sizes[v], "decoder_threads": rt.decoder(p.batch)[1]}
                memory_specs[name] = {"system": "onnx", "bundle": str(bundles[v]), "provider": prov,
                                      "decoder_threads": decoder_threads}
            lat = compare_latency(systems, p.new_tokens, c.bos_id, reference=TORCH_KV, batch=p.batch,
                                  max_seconds=max_seconds)
            for name, latency in lat.items():
                records.append({"system": name, "sweep": axis, **info[name], **asdict(p),
                                **timing_record(latency, p.batch),
                                "peak_rss_mb": peak_mb(memory_specs[name], p),
                                "model": {"d_model": c.d_model, "layers": [c.n_encoder_layers, c.n_decoder_layers],
                                          "vocab": c.tgt_vocab_size}})
    if out is not None:
        write_results(records, Path(out))
    return records


def _ratio(r: dict) -> str:
    return ratio_text(r["speedup_vs_pytorch_kv"], *r["speedup_ci95"])


def _threads(r: dict) -> str:
    decoder = r["decoder_threads"]
    return str(r["threads"]) if decoder == r["threads"] else f"{r['threads']} (decoder {decoder})"


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def markdown(records: list[dict]) -> str:
    header = ["system", "sweep", "batch", "src", "new", "threads", "encoder ms", "ms/token", "step p50", "step p90",
              "step p99", "tokens/s", "vs PyTorch+KV (95% CI)", "runs", "start s", "size MB", "peak RSS MB"]
    rows = [[r["system"], r["sweep"], r["batch"], r["src_len"], r["new_tokens"], _threads(r),
             f"{r['encoder_ms']:.2f}", f"{r['per_token_ms']:.3f}", f"{r['per_token_p50_ms']:.3f}",
             f"{r['per_token_p90_ms']:.3f}", f"{r['per_token_p99_ms']:.3f}", f"{r['tokens_per_second']:.0f}",
             _ratio(r), r["runs"], f"{r['session_start_s']:.2f}", f"{r['bundle_bytes'] / 1e6:.1f}",
             _mb(r["peak_rss_mb"])] for r in records]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_names = [a for a in ("new_tokens", "batch", "src_len", "threads") if any(r["sweep"] == a for r in records)]
    if not axes_names:  # the base point alone: one bar per system
        fig, ax = plt.subplots(figsize=(7, 3.5))
        base = [r for r in records if r["sweep"] == "base"]
        ax.barh([r["system"] for r in base], [r["per_token_ms"] for r in base])
        ax.set_xlabel("ms per token (median run)")
        fig.tight_layout()
        fig.savefig(path, dpi=110, format="png")
        plt.close(fig)
        return
    fig, axes = plt.subplots(1, len(axes_names), figsize=(4.5 * len(axes_names), 4), squeeze=False)
    for ax, axis in zip(axes[0], axes_names, strict=True):
        for system in dict.fromkeys(r["system"] for r in records):
            pts = sorted((r[axis], r["per_token_ms"]) for r in records
                         if r["system"] == system and r["sweep"] in (axis, "base"))
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=system)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(axis.replace("_", " "))
        ax.set_ylabel("ms per token (median run)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def replace_file(path: Path, write: Callable[[Path], object]) -> None:
    """Write through a temporary file beside `path`, so that a failed write leaves the old file whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_results(records: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    m = machine()
    replace_file(out / "results.json",
                 lambda p: p.write_text(json.dumps({"machine": m, "records": records}, indent=1) + "\n"))
    replace_file(out / "results.md", lambda p: p.write_text(
        f"Machine: {m['cpu']}, {m['cores']} cores, flags {' '.join(m['flags'])}; onnxruntime "
        f"{m.get('onnxruntime')}, torch {m.get('torch')}\n\n" + markdown(records)))
    replace_file(out / "per_token_latency.png", lambda p: plot(records, p))


def summary(records: list[dict]) -> str:
    """The base point, with how far its repeat at the end measured off (the benchmark's own noise), both in
    per-token time and in the ratio to PyTorch."""
    base = [r for r in records if r["sweep"] == "base"]
    repeat = {r["system"]: r for r in records if r["sweep"] == "base-repeat"}

    def off(r: dict, key: str) -> str:
        return f"{abs(repeat[r['system']][key] / r[key] - 1):.1%}" if r["system"] in repeat else "-"

    return table(["system", "ms/token", "step p99", "tokens/s", "vs PyTorch+KV (95% CI)", "start s", "size MB",
                  "peak RSS MB", "repeat: ms/token", "repeat: ratio"],
                 [[r["system"], f"{r['per_token_ms']:.3f}", f"{r['per_token_p99_ms']:.3f}",
                   f"{r['tokens_per_second']:.0f}", _ratio(r), f"{r['session_start_s']:.2f}",
                   f"{r['bundle_bytes'] / 1e6:.1f}", _mb(r["peak_rss_mb"]), off(r, "per_token_ms"),
                   off(r, "speedup_vs_pytorch_kv")] for r in base])
