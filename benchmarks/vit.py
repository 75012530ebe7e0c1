"""Image classification speed, side by side on the same weights: our ViT bundles (fp32, optimized, int8, int4) against
PyTorch eager (Hugging Face's ViTForImageClassification) and Hugging Face Optimum's ORTModelForImageClassification
(fp32 and its dynamic int8), each run in a process of its own, in interleaved rounds.

    .venv/bin/python benchmarks/vit.py make /tmp/vitb        # a random ViT-B/16 (224x224, 1000 classes), every form
    .venv/bin/python benchmarks/vit.py grid /tmp/vitb --out benchmarks/results/vit-avx2

Each run: one warm-up call, then the median of `--repeats` calls of a batch of random 224x224 RGB images (ours take
uint8 images and preprocess them in numpy, inside the time; PyTorch and Optimum take the preprocessed pixels).
Reports ms per image and images/s; ratios against `--peer` (PyTorch eager fp32) and Optimum int8 within each round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

OURS = {"edgeformer-fp32": "edgeformer-fp32", "edgeformer-fp32-optimized": "edgeformer-opt",
        "edgeformer-int8": "edgeformer-int8", "edgeformer-int4": "edgeformer-int4"}
OPTIMUM = {"optimum-fp32": "optimum-fp32", "optimum-int8": "optimum-int8", "optimum-int8-vnni": "optimum-int8-vnni"}
SYSTEMS = ("torch-fp32", *OURS, *OPTIMUM)
OPTIMUM_INT8 = ("optimum-int8", "optimum-int8-vnni")  # the ratios against each


def make(out: Path, small: bool = False) -> None:
    """A random ViT-B/16 (or a small one, for tests) as Hugging Face saves it, imported and exported by us, optimized
    and quantized (each variant judged against its source), and exported and int8-quantized by Optimum."""
    import torch
    import transformers
    from optimum.onnxruntime import ORTModelForImageClassification, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    from edgeformer.export.onnx_export import export
    from edgeformer.model.importers.vit import import_vit
    from edgeformer.transforms.derive import Judging, optimize, quantize

    size = {"image_size": 32, "patch_size": 8, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 128, "num_labels": 10} if small else {"num_labels": 1000}  # else ViT-B/16's defaults
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(**size)).eval()
    hf = out / "hf"
    model.save_pretrained(str(hf))
    side = model.config.image_size
    transformers.ViTImageProcessor(size={"height": side, "width": side}).save_pretrained(str(hf))
    import_vit(hf, out / "edgeformer-ckpt", force=True)
    judging = Judging(inputs=32)
    export(out / "edgeformer-ckpt", out / "edgeformer-fp32", force=True)
    optimize(out / "edgeformer-fp32", out / "edgeformer-opt", force=True, judging=judging)
    quantize(out / "edgeformer-opt", out / "edgeformer-int8", to="int8", preset="auto", force=True, judging=judging)
    # random weights spread 1000 classes thinly: int4 may miss the top-1 gate here; written anyway, its figures shown
    report = quantize(out / "edgeformer-opt", out / "edgeformer-int4", to="int4", force=True, judging=judging,
                      allow_drop=True)
    print(f"int4 against fp32-optimized on 32 random images: {report.figures}; misses: {report.misses}")
    ORTModelForImageClassification.from_pretrained(str(hf), export=True).save_pretrained(str(out / "optimum-fp32"))
    # Optimum's two x86 forms: avx2 (u8 weights), and avx512_vnni (s8 weights: the u8s8 kernels, fastest on VNNI)
    for name, config in (("optimum-int8", AutoQuantizationConfig.avx2(is_static=False, per_channel=True)),
                         ("optimum-int8-vnni", AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True))):
        ORTQuantizer.from_pretrained(str(out / "optimum-fp32")).quantize(config, save_dir=str(out / name))
    print(f"wrote {out}: hf, edgeformer-{{fp32,opt,int8,int4}}, optimum-{{fp32,int8,int8-vnni}}")


def _pixels(images: np.ndarray, hf: Path) -> Any:
    """The images as Hugging Face's image processor makes them (its rescale, mean and std): our preprocessing, which
    the tests hold equal to ViTImageProcessor's."""
    import torch

    from edgeformer.model.importers.vit import PROCESSOR_DEFAULTS
    from edgeformer.runtime.classifier import preprocess

    p = {**PROCESSOR_DEFAULTS, **json.loads((hf / "preprocessor_config.json").read_text())}
    return torch.from_numpy(preprocess(images, {"rescale": p["rescale_factor"], "mean": p["image_mean"],
                                                "std": p["image_std"]}))


def caller(folder: Path, system: str, images: np.ndarray, threads: int) -> Callable[[], Any]:
    """One call of `system` on the batch."""
    import torch

    torch.set_num_threads(threads)
    if system in OURS:
        from edgeformer.runtime.classifier import Classifier

        rt = Classifier(folder / OURS[system], threads=threads)  # what Runtime(bundle) returns for a ViT
        return lambda: rt.logits(images)
    pixels = _pixels(images, folder / "hf")
    if system in OPTIMUM:
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForImageClassification

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        found = sorted((folder / OPTIMUM[system]).glob("*.onnx"))
        model = ORTModelForImageClassification.from_pretrained(str(folder / OPTIMUM[system]), session_options=options,
                                                               file_name=found[0].name)
        return lambda: model(pixel_values=pixels).logits
    import transformers

    model = transformers.ViTForImageClassification.from_pretrained(str(folder / "hf")).eval()

    def call() -> Any:
        with torch.inference_mode():
            return model(pixel_values=pixels).logits

    return call


def run(folder: Path, system: str, batch: int, threads: int, repeats: int) -> dict[str, Any]:
    from edgeformer.benchmarks.memory import peak_rss_mb

    side = json.loads((folder / "hf" / "config.json").read_text())["image_size"]
    images = np.random.default_rng(0).integers(0, 256, (batch, side, side, 3), dtype=np.uint8)
    call = caller(folder, system, images, threads)
    call()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"system": system, "batch": batch, "threads": threads, "seconds": seconds,
            "ms_per_image": seconds / batch * 1000, "images_per_s": batch / seconds, "peak_rss_mb": peak_rss_mb()}


def grid(folder: Path, systems: list[str], batches: list[int], rounds: int, threads: int, repeats: int,
         out: Path | None, peer: str = "torch-fp32") -> list[dict[str, Any]]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in range(rounds):
        for batch in batches:
            for system in systems:
                cmd = [sys.executable, __file__, "run", str(folder), "--system", system, "--batch", str(batch),
                       "--threads", str(threads), "--repeats", str(repeats)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
                if proc.returncode != 0:
                    print(f"round {r + 1} {system} batch {batch} failed: {proc.stderr.strip().splitlines()[-1:]}")
                    continue
                found = json.loads(proc.stdout.strip().splitlines()[-1])
                found["round"] = r
                runs.setdefault((system, batch), []).append(found)
                print(f"round {r + 1} {system:<26} batch {batch:>3}: {found['ms_per_image']:8.2f} ms/image",
                      flush=True)
    rows = []
    for (system, batch), found in runs.items():
        row: dict[str, Any] = {"system": system, "batch": batch, "threads": threads,
                               "ms_per_image": statistics.median(f["ms_per_image"] for f in found),
                               "images_per_s": statistics.median(f["images_per_s"] for f in found),
                               "rounds_ms_per_image": [round(f["ms_per_image"], 2) for f in found],
                               "peak_rss_mb": max(f["peak_rss_mb"] for f in found)}
        for against in (peer, *OPTIMUM_INT8):  # within rounds: the median of the per-round speed ratios
            other = {f["round"]: f for f in runs.get((against, batch), [])}
            ratios = [other[f["round"]]["ms_per_image"] / f["ms_per_image"] for f in found if f["round"] in other]
            row[f"vs_{against}"] = statistics.median(ratios) if ratios else None
        rows.append(row)
    if out is not None:
        write(rows, out, peer)
    return rows


def write(rows: list[dict[str, Any]], out: Path, peer: str) -> None:
    import matplotlib

    from edgeformer.benchmarks.sweep import machine, replace_file
    from edgeformer.report.format import table

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    replace_file(out / "results.json", lambda p: p.write_text(json.dumps({"machine": machine(), "records": rows},
                                                                         indent=1) + "\n"))

    def ratio(value: float | None) -> str:
        return "" if value is None else f"{value:.2f}x"

    lines = [[r["system"], r["batch"], f"{r['ms_per_image']:.2f}", f"{r['images_per_s']:.1f}",
              *(ratio(r[f"vs_{s}"]) for s in (peer, *OPTIMUM_INT8)), f"{r['peak_rss_mb']:.0f}"] for r in rows]
    replace_file(out / "results.md", lambda p: p.write_text(table(
        ["system", "batch", "ms/image", "images/s", *(f"vs {s}" for s in (peer, *OPTIMUM_INT8)), "peak MB"],
        lines) + "\n"))
    fig, ax = plt.subplots(figsize=(8, 4))
    for system in dict.fromkeys(r["system"] for r in rows):
        points = sorted((r["batch"], r["ms_per_image"]) for r in rows if r["system"] == system)
        ax.plot([b for b, _ in points], [m for _, m in points], marker="o", label=system)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch")
    ax.set_ylabel("ms per image (median of rounds)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    replace_file(out / "ms_per_image.png", lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    print(f"results in {out}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("make")
    m.add_argument("folder", type=Path)
    m.add_argument("--small", action="store_true", help="a 32x32 ViT of two blocks: for tests")
    for name in ("run", "grid"):
        s = sub.add_parser(name)
        s.add_argument("folder", type=Path)
        s.add_argument("--threads", type=int, default=2)
        s.add_argument("--repeats", type=int, default=3)
    r = sub.choices["run"]
    r.add_argument("--system", choices=SYSTEMS, required=True)
    r.add_argument("--batch", type=int, required=True)
    g = sub.choices["grid"]
    g.add_argument("--systems", default=",".join(SYSTEMS))
    g.add_argument("--batches", default="1,8,32")
    g.add_argument("--rounds", type=int, default=3)
    g.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if a.mode == "make":
        make(a.folder, a.small)
    elif a.mode == "run":
        print(json.dumps(run(a.folder, a.system, a.batch, a.threads, a.repeats)))
    else:
        grid(a.folder, a.systems.split(","), [int(b) for b in a.batches.split(",")], a.rounds, a.threads, a.repeats,
             a.out)


if __name__ == "__main__":
    main()
