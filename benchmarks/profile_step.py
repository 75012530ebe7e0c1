"""Where the time of a decoding step goes: onnxruntime's profiler by operator, and Python's around the calls.

    .venv/bin/python benchmarks/profile_step.py [--size base|demo] [--optimized]

Decodes 64 tokens at batch 1 from a 32-token source with 2 threads; prints the share of decoder time per
operator type (onnxruntime's profile), and the share of each step spent outside onnxruntime (cProfile).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from edgeformer.export.onnx_export import export
from edgeformer.model.checkpoint import save_checkpoint
from edgeformer.model.config import BASE_SIZE, TransformerConfig
from edgeformer.model.transformer import Transformer
from edgeformer.report.format import table
from edgeformer.runtime.engine import open_session, session_options
from edgeformer.runtime.session import Runtime
from edgeformer.transforms.derive import optimize


def decode(rt: Runtime, new_tokens: int, src_len: int) -> None:
    src = np.random.default_rng(0).integers(4, int(rt.config["src_vocab_size"]), (1, src_len))
    steps = rt.step_model(src, np.ones_like(src), 1)
    tokens = np.array([1])
    for _ in range(new_tokens):
        tokens = steps.log_probs(tokens).argmax(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["base", "demo"], default="base")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--optimized", action="store_true", help="profile the optimized bundle (fused attention)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if args.size == "base":
            torch.manual_seed(0)
            save_checkpoint(Transformer(TransformerConfig(**BASE_SIZE)), Path(tmp) / "ck")
            checkpoint = Path(tmp) / "ck"
        export(checkpoint, Path(tmp) / "fp32")
        bundle = Path(tmp) / "fp32"
        if args.optimized:
            optimize(bundle, Path(tmp) / "optimized")
            bundle = Path(tmp) / "optimized"
        # the decoder on the threads a batch-1 call gets by default, fixed so the profiled session below serves it
        _, decoder_threads = Runtime(bundle, threads=args.threads).decoder(1)
        rt = Runtime(bundle, threads=args.threads, decoder_threads=decoder_threads)
        print(f"decoder threads at batch 1: {decoder_threads or 'onnxruntime default'}")
        decode(rt, 8, 32)  # warm-up

        profiler = cProfile.Profile()
        profiler.enable()
        decode(rt, 64, 32)
        profiler.disable()
        stats = pstats.Stats(profiler)
        total = stats.total_tt  # type: ignore[attr-defined]
        in_ort = sum(v[3] for k, v in stats.stats.items() if "run_with_iobinding" in k[2])  # type: ignore[attr-defined]
        print(f"Python profile of 64 steps: {total * 1e3 / 64:.3f} ms a step, of which onnxruntime "
              f"{in_ort / total:.1%}; the rest is Python and numpy around the calls")
        top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:8]  # type: ignore[attr-defined]
        print(table(["function (own time)", "ms a step"],
                    [[f"{Path(k[0]).name}:{k[2]}", f"{v[2] * 1e3 / 64:.3f}"] for k, v in top]))

        options = session_options(threads=decoder_threads, spin=True, stop_spinning=False)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        rt.sessions["decoder"] = open_session(bundle / "decoder.onnx", options)
        decode(rt, 64, 32)
        trace = json.loads(Path(rt.sessions["decoder"].end_profiling()).read_text())
    by_op: dict[str, float] = defaultdict(float)
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"]
    node_total = sum(by_op.values())
    print(f"\nonnxruntime profile of the decoder, 64 steps: {node_total / 64 / 1e3:.3f} ms of kernels a step")
    print(table(["operator", "share", "ms a step"],
                [[op, f"{t / node_total:.1%}", f"{t / 64 / 1e3:.3f}"]
                 for op, t in sorted(by_op.items(), key=lambda kv: -kv[1])[:10]]))


if __name__ == "__main__":
    main()
