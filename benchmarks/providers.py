"""`edgeformer bench --providers all`: every execution provider this machine offers x every bundle variant, in one
run: parity with PyTorch (greedy and beam-4 tokens identical, max log-prob difference per step) and speed (batch 1
greedy ms per token, batch 16 beam 4 tokens/s), each speed ratio taken against the CPU provider's fp32 bundle in
the same round.

    edgeformer bench --providers all [CHECKPOINT] [--rounds 3] [--out benchmarks/results/providers]
    edgeformer bench --providers all --python openvino=/path/to/python   # also what another onnxruntime offers

The parent (this Python, with torch) builds the variants (fp32, fp32-optimized, int8 and int4 from it; int8 static
QDQ and fp16 from the export, in standard operators any provider takes) and PyTorch's reference outputs; every
measurement runs in a child process of its own with the runtime alone (numpy + onnxruntime), so that a Python with
another onnxruntime build (onnxruntime-gpu, onnxruntime-openvino: named by --python, with edgeformer installed
there) measures its providers beside ours. Parity runs with the bundle's own generation settings on both sides.
Speed decodes a fixed length (EOS ignored); rounds interleave every configuration, and each figure is the median
of its rounds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

POINTS = ((1, 1), (16, 4))  # (batch, beams): latency, serving throughput
# parity's searches, over the bundle's own generation settings on both sides (an imported Marian forces EOS...)
SEARCHES: dict[str, dict[str, Any]] = {"greedy": {"strategy": "greedy", "num_return_sequences": 1},
                                       "beam-4": {"strategy": "beam", "num_beams": 4, "num_return_sequences": 1}}
REFERENCE = ("this", "cpu", "fp32")  # (python, choice, variant) the ratios are taken against
# Made from the fp32 export, not the optimized bundle: graphs of standard operators (QDQ int8, as OpenVINO prefers
# it to dynamic int8; fp16, for GPUs and OpenVINO) that any provider can take, where the optimized bundle's fused
# com.microsoft operators are the CPU provider's (and onnxruntime's newest).
PORTABLE: dict[str, dict[str, Any]] = {"int8-static": {"to": "int8", "method": "static"}, "fp16": {"to": "fp16"}}


# -- children: the runtime alone -----------------------------------------------------------------------------------

def child_offers() -> dict[str, Any]:
    """The choices this Python's onnxruntime offers (`edgeformer providers`), and its version."""
    import onnxruntime as ort

    from edgeformer.runtime.engine import provider
    from edgeformer.runtime.survey import offers

    found = [r for r in offers() if r["status"] == "offered"]
    return {"onnxruntime": ort.__version__, "choices": [r["choice"] for r in found],
            "gpu": [r["choice"] for r in found if provider(r["choice"]).gpu],
            "missing": [r for r in offers() if r["status"] != "offered"]}


def _runtime(bundle: Path, choice: str, threads: int) -> Any:
    from edgeformer.runtime.errors import ProviderFallback
    from edgeformer.runtime.session import Runtime

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProviderFallback)  # kept in provider_notes, reported with the figures
        return Runtime(bundle, providers=[choice], threads=threads)


def _placement(rt: Any, choice: str) -> dict[str, Any]:
    from edgeformer.runtime.engine import provider
    from edgeformer.runtime.survey import nodes_text

    return {"runs_on": rt.provider, "nodes": nodes_text(rt.assigned, provider(choice).name),
            "notes": rt.provider_notes}


def child_parity(bundle: Path, choice: str, reference: Path, threads: int) -> dict[str, Any]:
    """The bundle on `choice` against PyTorch's outputs in `reference` (written by `reference_outputs`)."""
    from edgeformer.runtime.search import pad

    ref = np.load(reference)
    sources = json.loads(str(ref["sources"]))
    rt = _runtime(bundle, choice, threads)
    figures: dict[str, Any] = {}
    for name, settings in SEARCHES.items():
        gen = rt.generation_config(**settings, max_new_tokens=int(ref["new_tokens"]))
        want = json.loads(str(ref[name]))
        got = [h[0].tokens for h in rt.generate(sources, gen)]
        figures[f"{name}_identical"] = sum(a == b for a, b in zip(got, want, strict=True)) / len(sources)
    # per step, fed PyTorch's greedy tokens: the first inputs' log-probs against PyTorch's
    forced, want_lp = ref["forced"], ref["log_probs"]  # (n, steps), (n, steps, V)
    n = len(forced)
    ids, mask = pad(sources[:n], int(rt.config["pad_id"]))
    steps = rt.step_model(ids, mask, 1, forced.shape[1])
    tokens = np.full(n, int(rt.config["bos_id"]), dtype=np.int64)
    worst, agree = 0.0, 0
    for t in range(forced.shape[1]):
        lp = steps.log_probs(tokens)
        worst = max(worst, float(np.abs(lp - want_lp[:, t]).max()))
        agree += int((lp.argmax(-1) == want_lp[:, t].argmax(-1)).sum())
        tokens = forced[:, t]
    return {**figures, "max_abs_logprob_diff": worst, "step_agreement": agree / forced.size,
            **_placement(rt, choice)}


def child_time(bundle: Path, choice: str, batch: int, beams: int, src_len: int, new_tokens: int, threads: int,
               repeats: int, seed: int = 0) -> dict[str, Any]:
    """Fixed-length generation (EOS ignored) at one point: the median of `repeats` timed calls after a warm-up."""
    rt = _runtime(bundle, choice, threads)
    rng = np.random.default_rng(seed)
    ids = [[int(t) for t in rng.integers(4, int(rt.config["src_vocab_size"]), src_len)] for _ in range(batch)]
    gen = rt.generation_config(strategy="beam" if beams > 1 else "greedy", num_beams=beams,
                               max_new_tokens=new_tokens, num_return_sequences=1, ignore_eos=True)
    rt.generate(ids, gen)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        rt.generate(ids, gen)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"seconds": seconds, "ms_per_token": seconds / new_tokens * 1000,
            "tokens_per_s": batch * new_tokens / seconds, **_placement(rt, choice)}


# -- parent --------------------------------------------------------------------------------------------------------

def build(checkpoint: Path | str | None, folder: Path, log: Callable[[str], None]) -> dict[str, Path]:
    """The variants of the checkpoint, each checked against its source as `edgeformer optimize/quantize` do: the
    CPU's (int8 and int4 from the optimized bundle) and the portable ones (from the export)."""
    from edgeformer.export.onnx_export import export
    from edgeformer.transforms.derive import build_variants, quantize
    from edgeformer.transforms.registry import CPU_VARIANTS

    log("building the variants (export, optimize, quantize; each checked against its source)")
    export(checkpoint, folder / "fp32", force=True)
    bundles = {v: path for v, (path, _) in build_variants(folder / "fp32", folder, CPU_VARIANTS[1:]).items()}
    for name, settings in PORTABLE.items():
        quantize(bundles["fp32"], folder / name, force=True, **settings)
        bundles[name] = folder / name
    return bundles


def reference_outputs(checkpoint: Path | str | None, bundle: Path, out: Path, n: int, steps: int,
                      forced: int) -> None:
    """PyTorch's greedy and beam-4 tokens on n held-out inputs, and its per-step log-probs along its own greedy
    path for the first `forced` of them."""
    import torch

    from edgeformer.export.evaluation import eval_set
    from edgeformer.model.checkpoint import load_checkpoint
    from edgeformer.model.generate import TorchSteps, generate, pad_batch
    from edgeformer.runtime.bundle import Manifest
    from edgeformer.runtime.options import GenerationConfig
    from edgeformer.runtime.tokenizer import load_tokenizer

    model, _ = load_checkpoint(checkpoint)
    manifest = Manifest.load(bundle)
    tokenizer = load_tokenizer(bundle, manifest.files) if manifest.tokenizer else None
    sources = eval_set(manifest.config, tokenizer, manifest.task, None, n).sources
    defaults = GenerationConfig.from_dict(manifest.generation)
    found = {name: generate(model, sources, dataclasses.replace(defaults, **settings, max_new_tokens=steps))
             for name, settings in SEARCHES.items()}
    ids, mask = pad_batch(sources[:forced], model.config.pad_id)
    state = TorchSteps(model, ids, mask, 1)
    tokens = np.full(len(ids), model.config.bos_id, dtype=np.int64)
    log_probs, path = [], []
    with torch.no_grad():
        for _ in range(steps):
            lp = state.log_probs(tokens)
            log_probs.append(lp)
            tokens = lp.argmax(-1)
            path.append(tokens)
    arrays: dict[str, Any] = {"sources": json.dumps(sources), "new_tokens": steps,
                              **{name: json.dumps([h[0].tokens for h in hyps]) for name, hyps in found.items()},
                              "forced": np.stack(path, 1),
                              "log_probs": np.stack(log_probs, 1).astype(np.float32)}
    np.savez(out, **arrays)


def _child(python: str, *args: Any, threads: int = 2, timeout: float = 900) -> dict[str, Any]:
    # the same threads for every provider: onnxruntime's by its session options, OpenMP's and ggml's by these
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "ORT_GGML_THREADS": str(threads)}
    try:
        proc = subprocess.run([python, __file__, *map(str, args)], capture_output=True, text=True, env=env,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {timeout:.0f} s"}
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return {"error": lines[-1][:400] if lines else f"exit status {proc.returncode}"}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def compare(checkpoint: Path | str | None = None, pythons: dict[str, str] | None = None, rounds: int = 3,
            points: Sequence[tuple[int, int]] = POINTS, src_len: int = 32, new_tokens: int = 32, threads: int = 2,
            repeats: int = 3, inputs: int = 64, out: Path | None = None, keep: Path | None = None,
            variants: Sequence[str] | None = None, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every (python, choice, variant) at every point, `rounds` times interleaved; parity once each. variants:
    those to measure (default: all that `build` makes; fp32, the reference, always)."""
    pythons = {"this": sys.executable, **(pythons or {})}
    envs = {}
    for label, python in pythons.items():
        found = _child(python, "offers")
        if "error" in found:
            raise ValueError(f"--python {label}={python}: cannot list its providers ({found['error']}); it needs "
                             "numpy, onnxruntime and edgeformer (pip install --no-deps edgeformer there)")
        envs[label] = found
        log(f"{label} ({python}): onnxruntime {found['onnxruntime']}, offers {', '.join(found['choices'])}"
            + "".join(f"; {m['provider']} from {m['from']}: {m['status']}" for m in found["missing"]))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(keep or tmp)
        bundles = build(checkpoint, folder, log)
        unknown = set(variants or ()) - set(bundles)
        if unknown:
            raise ValueError(f"--variants {', '.join(sorted(unknown))}: --providers all measures {', '.join(bundles)}")
        reference = folder / "pytorch_reference.npz"
        log(f"PyTorch's outputs on {inputs} held-out inputs")
        reference_outputs(checkpoint, bundles["fp32"], reference, inputs, 16, min(inputs, 16))
        # another Python adds the providers it has beside the CPU's (this Python's CPU is the reference)
        measured = [v for v in bundles if not variants or v in variants or v == "fp32"]
        configs = [(label, choice, variant) for label, env in envs.items() for choice in env["choices"]
                   if label == "this" or choice != "cpu" for variant in measured]
        records: dict[tuple[str, str, str], dict[str, Any]] = {}
        for label, choice, variant in configs:
            parity = _child(pythons[label], "parity", bundles[variant], choice, reference, threads, threads=threads)
            records[(label, choice, variant)] = {"python": label, "onnxruntime": envs[label]["onnxruntime"],
                                                 "choice": choice, "variant": variant, "parity": parity,
                                                 "points": {}}
            log(f"parity {label} {choice} {variant}: " + (parity.get("error") or (
                f"greedy {parity['greedy_identical']:.0%}, beam-4 {parity['beam-4_identical']:.0%} identical, "
                f"max |log-prob diff| {parity['max_abs_logprob_diff']:.2e}")))
        for r in range(rounds):
            for batch, beams in points:
                for key in configs:
                    if "error" in records[key]["parity"]:  # it did not open: its error is in the table once
                        continue
                    label, choice, variant = key
                    timing = _child(pythons[label], "time", bundles[variant], choice, batch, beams, src_len,
                                    new_tokens, threads, repeats, threads=threads)
                    records[key]["points"].setdefault(f"{batch}x{beams}", []).append(timing)
                    log(f"round {r + 1} {batch}x{beams} {label} {choice} {variant}: " + (timing.get("error") or (
                        f"{timing['ms_per_token']:.2f} ms/token, {timing['tokens_per_s']:.0f} tokens/s")))
    rows = summarize(list(records.values()), REFERENCE if REFERENCE[:2] in {k[:2] for k in records} else configs[0])
    if out is not None:
        write(rows, out, {"threads": threads, "src_len": src_len, "new_tokens": new_tokens, "rounds": rounds,
                          "repeats": repeats, "inputs": inputs, "pythons": pythons, "environments": envs})
    return rows


def summarize(records: list[dict[str, Any]], reference: Sequence[str]) -> list[dict[str, Any]]:
    """Each configuration's median over rounds, and its ratio to the reference's run in the same round (median of
    the per-round ratios)."""
    ref = next((r for r in records if (r["python"], r["choice"], r["variant"]) == tuple(reference)), None)
    for r in records:
        r["speed"] = {}
        for point, runs in r["points"].items():
            ok = [t for t in runs if "error" not in t]
            if not ok:
                r["speed"][point] = {"error": runs[-1]["error"]}
                continue
            against = (ref or {}).get("points", {}).get(point, [])
            ratios = [t["tokens_per_s"] / a["tokens_per_s"] for t, a in zip(runs, against, strict=False)
                      if "error" not in t and "error" not in a]
            r["speed"][point] = {"ms_per_token": statistics.median(t["ms_per_token"] for t in ok),
                                 "tokens_per_s": statistics.median(t["tokens_per_s"] for t in ok),
                                 "rounds_tokens_per_s": [round(t["tokens_per_s"], 1) for t in ok],
                                 "vs_reference": statistics.median(ratios) if ratios else None,
                                 "runs_on": ok[-1]["runs_on"], "nodes": ok[-1]["nodes"]}
    return records


def markdown(rows: list[dict[str, Any]], points: Sequence[str]) -> str:
    from edgeformer.report.format import table

    header = ["python", "provider", "variant", "greedy = PyTorch", "beam-4 = PyTorch", "max |log-prob diff|"]
    for point in points:
        header += [f"{point} ms/token", f"{point} tokens/s", f"{point} vs cpu fp32"]
    header += ["nodes on the provider"]
    lines = []
    for r in rows:
        p = r["parity"]
        line = [r["python"], r["choice"], r["variant"]]
        line += (["error", "", ""] if "error" in p else
                 [f"{p['greedy_identical']:.0%}", f"{p['beam-4_identical']:.0%}", f"{p['max_abs_logprob_diff']:.1e}"])
        for point in points:
            s = r["speed"].get(point, {"error": "not run"})
            line += (["error", "", ""] if "error" in s else
                     [f"{s['ms_per_token']:.2f}", f"{s['tokens_per_s']:.0f}",
                      "" if s["vs_reference"] is None else f"{s['vs_reference']:.2f}x"])
        line.append(p.get("nodes", ""))
        lines.append(line)
    errors = list(dict.fromkeys(  # one line per configuration and cause
        f"- {r['python']} {r['choice']} {r['variant']}: {e.split(' (', 1)[-1][:240]}" for r in rows
        for e in [r["parity"].get("error"), *(s.get("error") for s in r["speed"].values())] if e))
    notes = sorted({f"- {r['python']} {r['choice']} {r['variant']}: {n}" for r in rows
                    for n in r["parity"].get("notes", [])})
    text = table(header, lines) + "\n"
    if errors:
        text += "\nErrors:\n" + "\n".join(errors) + "\n"
    if notes:
        text += "\nNotes:\n" + "\n".join(notes) + "\n"
    return text


def write(rows: list[dict[str, Any]], out: Path, settings: dict[str, Any]) -> None:
    """results.json, results.md and providers.png."""
    import matplotlib

    from edgeformer.benchmarks.sweep import machine, replace_file

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    m = machine()
    points = list(dict.fromkeys(p for r in rows for p in r["speed"]))
    replace_file(out / "results.json", lambda p: p.write_text(
        json.dumps({"machine": m, "settings": settings, "records": rows}, indent=1, default=str) + "\n"))
    replace_file(out / "results.md", lambda p: p.write_text(
        f"Machine: {m['cpu']}, {m['cores']} cores, flags {' '.join(m['flags'])}; {settings['threads']} threads, "
        f"{settings['src_len']} source tokens, {settings['new_tokens']} new tokens (EOS ignored), median of "
        f"{settings['rounds']} rounds; parity on {settings['inputs']} held-out inputs\n\n" + markdown(rows, points)))
    fig, axes = plt.subplots(1, len(points), figsize=(6 * len(points), 0.4 * len(rows) + 1.5), squeeze=False)
    labels = [f"{r['choice']} {r['variant']}" + ("" if r["python"] == "this" else f" ({r['python']})")
              + (" (did not load)" if "error" in r["parity"] else "") for r in rows]
    for ax, point in zip(axes[0], points, strict=True):
        values = [r["speed"].get(point, {}).get("tokens_per_s", 0) for r in rows]
        ax.barh(labels, values)
        ax.set_xlabel(f"tokens/s at batch x beams {point}")
        ax.invert_yaxis()
    fig.tight_layout()
    replace_file(out / "providers.png", lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """The children's entry point (`python benchmarks/providers.py MODE ...`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    mode = args.pop(0)
    if mode == "offers":
        print(json.dumps(child_offers()))
    elif mode == "parity":
        bundle, choice, reference, threads = args
        print(json.dumps(child_parity(Path(bundle), choice, Path(reference), int(threads))))
    elif mode == "time":
        bundle, choice, *numbers = args
        print(json.dumps(child_time(Path(bundle), choice, *map(int, numbers))))
    else:
        raise SystemExit(f"unknown mode {mode!r}: offers, parity or time")


def parse_pythons(items: Sequence[str]) -> dict[str, str]:
    """--python LABEL=PATH, repeatable."""
    out = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise ValueError(f"--python {item!r}: give LABEL=PATH (openvino=.venv-openvino/bin/python)")
        out[label] = path
    return out


if __name__ == "__main__":
    main()
