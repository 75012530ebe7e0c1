"""Why `optimize` leaves some of onnxruntime's fusions out on the CPU: each fused operator against the nodes it
replaces, at the shapes our models run (a ViT-B/16 block at batch 1, a decoder step of 16 inputs x 4 beams, a
Transformer-base encoder), on onnxruntime's CPU provider; and, given an exported bundle, a whole decoder step of it
optimized (fp32, then int8) as `optimize` makes it and with every fusion.

    .venv/bin/python benchmarks/fusions.py [--threads 2] [--rounds 5]
    .venv/bin/python benchmarks/fusions.py --bundle /tmp/tp/edgeformer-fp32 --work /tmp/fusions   # and the steps

Each pair is one small graph per form, timed in alternated rounds in this one process (both sides are
onnxruntime's own kernels, sharing its thread pool settings); the median microseconds of a `run`, and the ratio
fused / unfused within each round (above 1: the fusion is slower). BiasGelu alone is a wash; left unfused, its
bias goes into the int8 MatMul before it. A bundle's steps run each form in a process of its own
(benchmarks/int8_forms.py `step`: 64 rows after 32 steps), alternated. The families' choices are their
`cpu_unfused` (runtime/spec.py); README: "Fusions on the CPU".
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SHAPES = {"ViT-B/16 block, batch 1": (1, 197, 768), "decoder step, 16x4 beams": (64, 1, 512),
          "encoder, 16 x 20 tokens": (16, 20, 512), "decoder step, batch 1": (1, 1, 512)}


def _graph(nodes: list[onnx.NodeProto], inputs: list[str], shape: tuple[int, ...], width: int) -> bytes:
    values = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(shape)) for n in inputs]
    rng = np.random.default_rng(0)
    read = {i for n in nodes for i in n.input}
    weights = [numpy_helper.from_array(rng.random(width, dtype=np.float32), n) for n in ("gamma", "beta", "bias")
               if n in read]
    graph = helper.make_graph(nodes, "g", values, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20),
                                                   helper.make_opsetid("com.microsoft", 1)]).SerializeToString()


def pairs(shape: tuple[int, int, int]) -> dict[str, tuple[bytes, bytes]]:
    """name -> (fused graph, unfused graph) at `shape` (the Gelu pair's width is the feed-forward's, 4x)."""
    d = shape[-1]
    wide = (*shape[:-1], 4 * d)
    ms = "com.microsoft"
    return {
        "SkipLayerNormalization vs Add + LayerNormalization": (
            _graph([helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma", "beta"], ["y"], domain=ms)],
                   ["x", "skip"], shape, d),
            _graph([helper.make_node("Add", ["x", "skip"], ["sum"]),
                    helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1)],
                   ["x", "skip"], shape, d)),
        "BiasGelu vs Add + Gelu": (
            _graph([helper.make_node("BiasGelu", ["x", "bias"], ["y"], domain=ms)], ["x"], wide, 4 * d),
            _graph([helper.make_node("Add", ["x", "bias"], ["biased"]), helper.make_node("Gelu", ["biased"], ["y"])],
                   ["x"], wide, 4 * d)),
    }


def timed(session: ort.InferenceSession, feeds: dict[str, np.ndarray], calls: int) -> float:
    """Microseconds per run, the median of five batches of calls."""
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            session.run(None, feeds)
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def make_forms(fp32: Path, work: Path) -> list[str]:
    """The bundle optimized (fp32, then int8 as the throughput bench makes it) as `optimize` makes it ("unfused")
    and with every fusion ("fused": its family's cpu_unfused emptied while they are made)."""
    from edgeformer.transforms import optimize as made_by
    from edgeformer.transforms.derive import optimize, quantize

    family_of = made_by.get_family
    for form, families in (("unfused", family_of), ("fused", lambda n: dataclasses.replace(family_of(n),
                                                                                            cpu_unfused=()))):
        made_by.get_family = families
        try:
            optimize(fp32, work / f"{form}-fp32", force=True)
            quantize(work / f"{form}-fp32", work / f"{form}-int8", to="int8", preset="auto", force=True)
        finally:
            made_by.get_family = family_of
    return [f"{form}-{p}" for p in ("fp32", "int8") for form in ("fused", "unfused")]


def steps(work: Path, forms: list[str], rounds: int, threads: int) -> None:
    step = Path(__file__).with_name("int8_forms.py")
    ms: dict[str, list[float]] = {f: [] for f in forms}
    for _ in range(rounds):
        for form in forms:
            out = subprocess.run([sys.executable, str(step), "step", str(work / form), "--threads", str(threads)],
                                 capture_output=True, text=True, check=True).stdout
            ms[form].append(float(out) * 1e3)
    print(f"\n{'decoder step, 64 rows after 32 steps':<40} {'fused ms':>9} {'unfused ms':>11}  fused/unfused, "
          "each round")
    for precision in ("fp32", "int8"):
        fused, unfused = ms[f"fused-{precision}"], ms[f"unfused-{precision}"]
        ratios = ", ".join(f"{f / u:.2f}" for f, u in zip(fused, unfused, strict=True))
        print(f"{precision:<40} {statistics.median(fused):9.2f} {statistics.median(unfused):11.2f}  {ratios} "
              f"(median {statistics.median(f / u for f, u in zip(fused, unfused, strict=True)):.2f})")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--bundle", type=Path, default=None, help="an exported encoder-decoder bundle: also its steps")
    p.add_argument("--work", type=Path, default=Path("/tmp/fusions"), help="where --bundle's forms are made")
    a = p.parse_args(argv)
    options = ort.SessionOptions()
    options.intra_op_num_threads = a.threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # each graph as it is written
    print(f"onnxruntime {ort.__version__}, CPUExecutionProvider, {a.threads} threads, {a.rounds} rounds")
    print(f"{'pair':<52} {'where':<26} {'shape':<12} {'fused us':>9} {'unfused us':>11}  fused/unfused, each round")
    for where, shape in SHAPES.items():
        for name, graphs in pairs(shape).items():
            sessions = [ort.InferenceSession(g, options, providers=["CPUExecutionProvider"]) for g in graphs]
            feeds = {i.name: np.random.default_rng(1).random([int(x) for x in i.shape], dtype=np.float32)
                     for i in sessions[0].get_inputs()}
            for s in sessions:
                timed(s, feeds, 10)  # warm-up
            rounds = [[timed(s, feeds, a.calls) for s in sessions] for _ in range(a.rounds)]
            fused, unfused = (statistics.median(r[i] for r in rounds) for i in (0, 1))
            ratios = ", ".join(f"{f / u:.2f}" for f, u in rounds)
            size = "x".join(map(str, shape))
            print(f"{name:<52} {where:<26} {size:<12} {fused:9.1f} {unfused:11.1f}  {ratios}")
    if a.bundle:
        steps(a.work, make_forms(a.bundle, a.work), a.rounds, a.threads)


if __name__ == "__main__":
    main()
