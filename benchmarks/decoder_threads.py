"""When does a decoder step pay for a second thread? One decoder thread against N, side by side, by model and batch.

    .venv/bin/python benchmarks/decoder_threads.py [--threads 2] [--max-seconds 8]

The runtime runs a step on one thread when it reads fewer than SMALL_STEP_WEIGHTS weights over its rows
(runtime/session.py), a figure measured with this script on this project's 2-vCPU machine. Run it on yours to
see where the crossover lies there; pass `decoder_threads` to `Runtime` to override the rule.

For the shipped model and two random models of a few million weights a step, at batch 1, 4, 16 and 64 (32 source
tokens, 32 new tokens forced): per-token latency with the decoder on one thread and on N, in interleaved rounds,
and the speed-up of one thread with its 95% interval. Writes benchmarks/results/decoder_threads.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeformer.benchmarks.latency import compare_latency
from edgeformer.benchmarks.sweep import machine, replace_file
from edgeformer.export.onnx_export import export
from edgeformer.model.checkpoint import save_checkpoint
from edgeformer.model.config import TransformerConfig
from edgeformer.model.transformer import Transformer
from edgeformer.report.format import ratio_text, table
from edgeformer.runtime.session import SMALL_STEP_WEIGHTS, Runtime, step_weights

# name -> the config overrides of a random model (None: the shipped one)
MODELS: dict[str, dict[str, Any] | None] = {
    "shipped": None,
    "d256-2L": {"d_model": 256, "n_encoder_layers": 2, "n_decoder_layers": 2, "d_ff": 512,
                "src_vocab_size": 1000, "tgt_vocab_size": 1000},
    "d256-3L": {"d_model": 256, "n_encoder_layers": 3, "n_decoder_layers": 3, "d_ff": 1024,
                "src_vocab_size": 8000, "tgt_vocab_size": 8000},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--max-seconds", type=float, default=8.0, help="time budget of one comparison")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in MODELS.items():
            checkpoint = None
            if overrides is not None:
                torch.manual_seed(0)
                checkpoint = Path(tmp) / f"{name}-checkpoint"
                save_checkpoint(Transformer(TransformerConfig(n_heads=4, **overrides)), checkpoint)
            bundle = Path(tmp) / name
            export(checkpoint, bundle)
            one, many = Runtime(bundle, threads=args.threads, decoder_threads=1), Runtime(
                bundle, threads=args.threads, decoder_threads=args.threads)
            default = Runtime(bundle, threads=args.threads)
            weights = step_weights(one.config)
            for batch in (int(b) for b in args.batches.split(",")):
                ids = np.random.default_rng(0).integers(4, int(one.config["src_vocab_size"]), (batch, 32))
                mask = np.ones_like(ids)
                systems = {f"{args.threads} threads": partial(many.step_model, ids, mask, 1),
                           "1 thread": partial(one.step_model, ids, mask, 1)}
                lat = compare_latency(systems, 32, int(one.config["bos_id"]), reference=f"{args.threads} threads",
                                      batch=batch, max_seconds=args.max_seconds)
                a, b = lat[f"{args.threads} threads"], lat["1 thread"]
                records.append({"model": name, "step_weights_per_row": weights, "batch": batch,
                                "step_weights": weights * batch, "threads": args.threads,
                                "per_token_ms_many": a.per_token_ms, "per_token_ms_one": b.per_token_ms,
                                "speedup_of_one_thread": b.speedup, "speedup_ci95": [b.speedup_low, b.speedup_high],
                                "runs": b.runs, "default_decoder_threads": default.decoder(batch)[1]})
                print(f"{name} batch {batch}: {ratio_text(b.speedup, b.speedup_low, b.speedup_high)}", flush=True)
    print(f"\nthreshold: one decoder thread below {SMALL_STEP_WEIGHTS / 1e6:.1f}M weights a step")
    print(table(["model", "batch", "weights a step", "ms/token 1 thread", f"ms/token {args.threads} threads",
                 "1 thread's speed-up (95% CI)", "runs", "default"],
                [[r["model"], r["batch"], f"{r['step_weights'] / 1e6:.2f}M", f"{r['per_token_ms_one']:.3f}",
                  f"{r['per_token_ms_many']:.3f}", ratio_text(r["speedup_of_one_thread"], *r["speedup_ci95"]),
                  r["runs"], f"{r['default_decoder_threads']} thread(s)"] for r in records]))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "decoder_threads.json"
    described = machine()
    replace_file(path, lambda p: p.write_text(json.dumps({"machine": described, "records": records}, indent=1)
                                              + "\n"))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
