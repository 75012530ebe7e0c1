"""Per-token decoding latency: the fp32 runtime against PyTorch eager with its KV cache, on the same weights.

    .venv/bin/python benchmarks/decode_latency.py                 # Transformer-base, random weights
    .venv/bin/python benchmarks/decode_latency.py --size demo     # the shipped model

Batch 1, 32 source tokens, 64 new tokens forced (EOS ignored), 2 threads for both systems (the runtime's decoder on
its default, one thread for the shipped model's small steps); runs interleaved
in rounds; ratios are medians of the ratios within rounds, with their 95% interval. Writes one JSON record per
system to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from edgeformer.benchmarks.latency import compare_latency, timing_record
from edgeformer.benchmarks.sweep import machine, replace_file
from edgeformer.export.onnx_export import export
from edgeformer.model.checkpoint import load_checkpoint, save_checkpoint
from edgeformer.model.config import BASE_SIZE, TransformerConfig
from edgeformer.model.generate import TorchSteps, pad_batch
from edgeformer.model.transformer import Transformer
from edgeformer.report.format import ratio_text, table
from edgeformer.runtime.engine import CPU
from edgeformer.runtime.search import StepModel
from edgeformer.runtime.session import Runtime
from edgeformer.transforms.derive import build_variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["base", "demo"], default="base")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--src-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--variants", default="fp32,fp32-optimized,int8,int4",
                        help="comma-separated bundle variants to measure beside PyTorch")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.size == "base":
            torch.manual_seed(0)
            model = Transformer(TransformerConfig(**BASE_SIZE)).eval()
            save_checkpoint(model, Path(tmp) / "checkpoint")
            checkpoint: Path | None = Path(tmp) / "checkpoint"
        else:
            model, _ = load_checkpoint()
            checkpoint = None
        start = time.perf_counter()
        result = export(checkpoint, Path(tmp) / "bundle")
        print(f"export: {time.perf_counter() - start:.1f} s, bundle {result.bundle_bytes / 1e6:.1f} MB, "
              f"max |logit diff| {result.parity['max_abs_diff']['decoder']:.2e}")
        bundles: dict[str, Path] = {}
        for variant, (path, report) in build_variants(Path(tmp) / "bundle", tmp, args.variants.split(",")).items():
            bundles[variant] = path
            if report is not None:
                print(f"{variant}: {report.seconds:.1f} s, {report.bundle_bytes / 1e6:.1f} MB "
                      f"({report.bundle_bytes / report.source_bytes:.0%} of its source), greedy agreement "
                      f"{report.figures['greedy_token_agreement']:.2%}")
        src = np.random.default_rng(0).integers(4, model.config.src_vocab_size, args.src_len).tolist()
        ids, mask = pad_batch([src], model.config.pad_id)
        systems: dict[str, Callable[[], StepModel]] = {"pytorch-eager-kv": lambda: TorchSteps(model, ids, mask, 1)}
        sizes = {"pytorch-eager-kv": result.bundle_bytes}
        starts = {"pytorch-eager-kv": 0.0}
        decoder_threads = {"pytorch-eager-kv": args.threads}
        for variant, path in bundles.items():
            start = time.perf_counter()
            rt = Runtime(path, threads=args.threads)
            starts[f"runtime-{variant}"] = time.perf_counter() - start
            print(f"{variant}: session start {starts[f'runtime-{variant}']:.2f} s")
            systems[f"runtime-{variant}"] = partial(rt.step_model, ids.numpy(), mask.numpy(), 1)
            sizes[f"runtime-{variant}"] = rt.manifest.bytes(path)
            decoder_threads[f"runtime-{variant}"] = rt.decoder(1)[1]
        lat = compare_latency(systems, args.new_tokens, model.config.bos_id, reference="pytorch-eager-kv",
                              max_seconds=300)
    described = machine()
    records = [{"model": args.size, "system": name, "provider": CPU if name != "pytorch-eager-kv" else "torch-cpu",
                "batch": 1, "src_len": args.src_len, "new_tokens": args.new_tokens, "threads": args.threads,
                "decoder_threads": decoder_threads[name], "session_start_s": starts[name], **timing_record(v, 1),
                "bundle_bytes": sizes[name], "machine": described} for name, v in lat.items()]
    print(table(["system", "encoder ms", "ms/token", "step p90", "runs", "speed-up per token (95% CI)", "size MB"],
                [[r["system"], f"{r['encoder_ms']:.2f}", f"{r['per_token_ms']:.3f}", f"{r['per_token_p90_ms']:.3f}",
                  r["runs"], ratio_text(r["speedup_vs_pytorch_kv"], *r["speedup_ci95"]),
                  f"{r['bundle_bytes'] / 1e6:.1f}"]
                 for r in records]))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"decode_latency_{args.size}.json"
    replace_file(path, lambda tmp: tmp.write_text(json.dumps(records, indent=2) + "\n"))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
