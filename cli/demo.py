"""`edgeformer demo`: the whole path on the model that ships in the package, every figure measured in the run."""

from __future__ import annotations

import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from edgeformer.benchmarks.latency import compare_latency
from edgeformer.export.encoder_decoder import runtime_parity
from edgeformer.export.onnx_export import export
from edgeformer.model.checkpoint import default_checkpoint, load_checkpoint
from edgeformer.model.generate import TorchSteps, generate, pad_batch
from edgeformer.model.tasks import get_task
from edgeformer.report.format import figure_text, ratio_text, table
from edgeformer.runtime.session import Runtime
from edgeformer.transforms.derive import build_variants
from edgeformer.transforms.registry import CPU_VARIANTS


def demo(threads: int = 2, examples: int = 8, new_tokens: int = 16) -> None:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    model, tokenizer = load_checkpoint()
    assert tokenizer is not None
    c = model.config
    print(f"1. the shipped model ({default_checkpoint()}): dates in 21 formats and 5 languages -> ISO 8601")
    print(f"   d_model {c.d_model}, {c.n_encoder_layers}+{c.n_decoder_layers} layers, {c.n_heads} heads, "
          f"{model.num_parameters():,} parameters\n")
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "dates-fp32"
        print("2. export to ONNX (encoder + decoder with KV cache), checked against PyTorch before writing")
        result = export(None, bundle, log=lambda msg: print(f"   {msg}...", flush=True))
        print(f"   bundle written in {result.seconds:.1f} s, {result.bundle_bytes / 1e6:.2f} MB\n")

        print("3. parity of the runtime (numpy + onnxruntime) with PyTorch on 200 held-out inputs")
        report = runtime_parity(bundle, threads=threads)
        print(table(["check", "result"], [[k, figure_text(k, v)] for k, v in report.items()]))
        print()

        print("4. faster variants: optimized (fused), then quantized from it; each checked against its source first")
        built = build_variants(bundle, tmp, CPU_VARIANTS[1:])  # each CPU variant past fp32
        paths = {name: path for name, (path, _) in built.items()}
        reports = [r for _, r in built.values() if r is not None]
        print(table(["variant", "size MB", "of fp32", "max |log-prob diff| to source", "greedy agreement",
                     "exact match"],
                    [[r.variant, f"{r.bundle_bytes / 1e6:.2f}", f"{r.bundle_bytes / result.bundle_bytes:.0%}",
                      f"{r.figures['max_abs_logprob_diff']:.1e}", f"{r.figures['greedy_token_agreement']:.1%}",
                      f"{r.figures['metric_variant']:.1f}%"] for r in reports]))
        print()

        runtimes = {name: Runtime(path, threads=threads) for name, path in paths.items()}
        pairs = get_task("dates").pairs(examples, "test", seed=7)
        src = tokenizer.encode_batch([s for s, _ in pairs])
        ref = generate(model, src)
        outputs = {name: rt.generate(src) for name, rt in runtimes.items()}
        print("5. generation, side by side")
        print(table(["input", "expected", "PyTorch", *outputs],
                    [[s, t, tokenizer.decode(ref[i][0].tokens),
                      *[tokenizer.decode(o[i][0].tokens) for o in outputs.values()]]
                     for i, (s, t) in enumerate(pairs)]))
        print()

        _, decoder_threads = next(iter(runtimes.values())).decoder(1)
        print(f"6. decoding latency, batch 1, {new_tokens} new tokens forced, {threads} threads (the runtime's "
              f"decoder: {decoder_threads}, its default at this size)\n"
              "   runs in rounds, medians; ratios within rounds, with their 95% interval")
        ids, mask = pad_batch(src[:1], c.pad_id)
        systems: dict = {"PyTorch eager + KV cache": lambda: TorchSteps(model, ids, mask, 1)}
        for name, rt in runtimes.items():
            systems[f"runtime {name} ({rt.provider.removesuffix('ExecutionProvider')})"] = partial(
                rt.step_model, ids.numpy(), mask.numpy(), 1)
        lat = compare_latency(systems, new_tokens, c.bos_id, reference="PyTorch eager + KV cache", max_seconds=8)
        print(table(["system", "encoder ms", "ms/token", "step p90", "speed-up per token (95% CI)"],
                    [[name, f"{v.encoder_ms:.2f}", f"{v.per_token_ms:.3f}", f"{v.per_token_p90_ms:.3f}",
                      ratio_text(v.speedup, v.speedup_low, v.speedup_high)] for name, v in lat.items()]))
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s")
