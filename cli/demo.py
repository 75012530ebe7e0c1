"""`edgeformer demo`: the whole path on the model that ships in the package, every figure measured in the run."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import cast

import torch

from edgeformer.benchmarks.latency import compare_latency
from edgeformer.export.encoder_decoder import runtime_parity
from edgeformer.export.onnx_export import export
from edgeformer.model.checkpoint import default_checkpoint, load_checkpoint
from edgeformer.model.generate import TorchSteps, generate, pad_batch
from edgeformer.model.tasks import get_task
from edgeformer.report.format import figure_text, ratio_text, table
from edgeformer.runtime.bundle import Manifest
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
        vit_demo(threads, Path(tmp))
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s")


SHADES = " .:-=+*#%@"  # a pixel's darkness, for digits drawn in text


def vit_demo(threads: int, tmp: Path, shown: int = 6, rounds: int = 5, calls: int = 40) -> None:
    """The second shipped model: a ViT on the built-in digits, exported, its variants, their accuracy, a few digits
    and their labels, and the latency per image against PyTorch."""
    from edgeformer.model.checkpoint import DIGITS_CHECKPOINT
    from edgeformer.model.digits import digits
    from edgeformer.model.vit import ViT
    from edgeformer.runtime.classifier import Classifier, preprocess

    model = cast(ViT, load_checkpoint(DIGITS_CHECKPOINT)[0])
    c = model.config
    print(f"\n7. the second shipped model ({DIGITS_CHECKPOINT}): a Vision Transformer on scikit-learn's handwritten "
          f"digits, {c.image_size}x{c.image_size} in patches of {c.patch_size}, {c.n_layers} blocks of width "
          f"{c.d_model} (the Transformer's encoder layers), {sum(p.numel() for p in model.parameters()):,} parameters")
    result = export(DIGITS_CHECKPOINT, tmp / "digits-fp32")
    built = build_variants(tmp / "digits-fp32", tmp / "digits", CPU_VARIANTS[1:])
    classifiers = {name: Classifier(path, threads=threads) for name, (path, _) in built.items()}
    images, labels = digits("test")
    with torch.no_grad():
        ref = model(torch.from_numpy(preprocess(images, c))).numpy().argmax(-1)
    found = {name: rt.logits(images).argmax(-1) for name, rt in classifiers.items()}
    print(f"   each variant checked against its source on 200 held-out digits before it was written; here all "
          f"{len(images)}:")
    print(table(["system", "size MB", "accuracy", "top-1 = PyTorch's"],
                [["PyTorch", "-", f"{(ref == labels).mean():.2%}", "-"]]
                + [[name, f"{Manifest.load(rt.path, verify=False).bytes(rt.path) / 1e6:.2f}",
                    f"{(found[name] == labels).mean():.2%}", f"{(found[name] == ref).mean():.2%}"]
                   for name, rt in classifiers.items()]))
    print("\n   a few held-out digits, and what each system reads:")
    for row in range(c.image_size):
        print("   " + "   ".join("".join(SHADES[int(v) * (len(SHADES) - 1) // 255] * 2 for v in images[i, row, :, 0])
                                  for i in range(shown)))
    width = 2 * c.image_size + 3
    for name, labels_read in (("label", labels), ("PyTorch", ref), *found.items()):
        print("   " + "".join(f"{labels_read[i]!s:<{width}}" for i in range(shown)) + f"  {name}")
    print(f"\n   latency per image at batch 1, {threads} threads: {rounds} rounds of {calls} calls, medians; ratios "
          "within rounds")
    one = images[:1]
    pixels = torch.from_numpy(preprocess(one, c))

    def torch_call() -> None:
        with torch.inference_mode():
            model(pixels)

    systems: dict[str, Callable[[], object]] = {"PyTorch eager": torch_call}
    systems.update({f"runtime {n}": partial(rt.logits, one) for n, rt in classifiers.items()})
    times: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(rounds):
        for name, call in systems.items():
            call()
            t0 = time.perf_counter()
            for _ in range(calls):
                call()
            times[name].append((time.perf_counter() - t0) / calls * 1000)
    base = times["PyTorch eager"]
    print(table(["system", "ms/image", "vs PyTorch"],
                [[name, f"{sorted(ms)[len(ms) // 2]:.3f}",
                  f"{sorted(b / m for b, m in zip(base, ms, strict=True))[len(ms) // 2]:.2f}x"]
                 for name, ms in times.items()]))
    del result
