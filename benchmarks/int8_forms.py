"""Which quantized form runs a decoder step fastest on this CPU, and what each costs in fidelity.

    .venv/bin/python benchmarks/int8_forms.py make OPTIMIZED FOLDER     # each form, judged as `quantize` judges it
    .venv/bin/python benchmarks/int8_forms.py time FOLDER [--rows 64 --past 32 --rounds 5 --out FILE]

`make` quantizes one optimized bundle (for example `edgeformer bench throughput make`'s `edgeformer-opt`) into each
form: int8 with the `avx2` preset (7-bit weights, u8s8 kernels; the tied projection on the uint8 table, u8u8), int8
with the full 8-bit preset (`avx2-8bit`: 8-bit weights, the table int8, every product u8s8) and int4
(`MatMulNBits`, blocks of 32, int8 activations). Each is judged on this CPU against the optimized bundle, so the
figures show what a form's kernels cost here (AVX2 without VNNI can saturate u8s8 sums of full 8-bit weights).
`time` runs one decoder step over `--rows` rows (16 sources of 32 tokens, 4 rows each at 64) after `--past` steps,
each form in a process of its own, the forms in rounds; it reports the median step, the median ratio to the avx2
form within rounds, and each form's gate figures and size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

FORMS: dict[str, dict[str, Any]] = {
    "int8-avx2": {"to": "int8", "preset": "avx2"},
    "int8-8bit": {"to": "int8", "preset": "avx2-8bit"},
    "int4": {"to": "int4"},
}
REFERENCE = "int8-avx2"


def make(optimized: Path, folder: Path) -> None:
    from edgeformer.transforms.derive import quantize

    for form, options in FORMS.items():
        report = quantize(optimized, folder / form, force=True, allow_drop=True, **options)
        print(f"{form}: {report.figures.get('max_abs_logprob_diff')} max |log-prob diff|, "
              f"{report.figures.get('greedy_token_agreement')} greedy agreement", flush=True)


def step(bundle: Path, rows: int, past: int, repeats: int, threads: int) -> float:
    """The median seconds of a decoder step over `rows` rows after `past` steps (the search head's k best)."""
    from edgeformer.runtime.session import Runtime

    rt = Runtime(bundle, threads=threads)
    per_source = 4 if rows % 4 == 0 else 1
    rng = np.random.default_rng(0)
    src = rng.integers(4, int(rt.config["src_vocab_size"]) - 1, (rows // per_source, 32))
    steps = rt.step_model(src, np.ones_like(src), per_source, past + repeats)
    mask = np.zeros(int(rt.config["tgt_vocab_size"]), np.float32)
    tokens = np.full(rows, int(rt.config["bos_id"]), np.int64)
    for _ in range(past):
        tokens = steps.top(tokens, 8, mask)[1][:, 0].astype(np.int64)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = steps.top(tokens, 8, mask)[1][:, 0].astype(np.int64)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed(folder: Path, a: argparse.Namespace) -> None:
    from edgeformer.report.format import table

    runs: dict[str, list[float]] = {form: [] for form in FORMS}
    for _ in range(a.rounds):
        for form in FORMS:
            cmd = [sys.executable, __file__, "step", str(folder / form), "--rows", str(a.rows), "--past",
                   str(a.past), "--repeats", str(a.repeats), "--threads", str(a.threads)]
            runs[form].append(float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout))
    records = []
    for form, seconds in runs.items():
        manifest = json.loads((folder / form / "edgeformer.json").read_text())
        parity = manifest["variant_parity"]
        size = sum(f.stat().st_size for f in (folder / form).iterdir())
        ratios = [r / s for r, s in zip(runs[REFERENCE], seconds, strict=True)]
        records.append({"form": form, "ms_per_step": round(statistics.median(seconds) * 1e3, 2),
                        "ms_all": [round(s * 1e3, 2) for s in seconds],
                        "speed_vs_avx2": round(statistics.median(ratios), 3),
                        "max_abs_logprob_diff": parity["max_abs_logprob_diff"],
                        "greedy_token_agreement": parity["greedy_token_agreement"], "mb": round(size / 1e6, 1)})
    lines = [[r["form"], f"{r['ms_per_step']:.1f}", f"{r['speed_vs_avx2']:.2f}x", f"{r['max_abs_logprob_diff']:.3f}",
              f"{r['greedy_token_agreement']:.1%}", f"{r['mb']:.0f}"] for r in records]
    print(table(["form", "ms a step", f"speed vs {REFERENCE}", "max |log-prob diff|", "greedy agreement", "MB"], lines))
    if a.out:
        from edgeformer.benchmarks.sweep import machine

        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"machine": machine(), "rows": a.rows, "past": a.past, "threads": a.threads,
                                     "rounds": a.rounds, "records": records}, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("make")
    m.add_argument("optimized", type=Path)
    m.add_argument("folder", type=Path)
    for name in ("time", "step"):
        s = sub.add_parser(name)
        s.add_argument("folder", type=Path)
        s.add_argument("--rows", type=int, default=64)
        s.add_argument("--past", type=int, default=32)
        s.add_argument("--repeats", type=int, default=15)
        s.add_argument("--threads", type=int, default=2)
    t = sub.choices["time"]
    t.add_argument("--rounds", type=int, default=5)
    t.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    if a.mode == "make":
        make(a.optimized, a.folder)
    elif a.mode == "step":
        print(step(a.folder, a.rows, a.past, a.repeats, a.threads))
    else:
        timed(a.folder, a)


if __name__ == "__main__":
    main()
