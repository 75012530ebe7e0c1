"""`edgeformer parity BUNDLE`: the bundle, run by the runtime, against the PyTorch checkpoint on task inputs."""

from __future__ import annotations

from pathlib import Path

import torch

from edgeformer.export.parity import TOLERANCES, compare_case
from edgeformer.model.checkpoint import load_checkpoint
from edgeformer.model.generate import generate
from edgeformer.model.tasks import get_task
from edgeformer.runtime.options import GenerationConfig
from edgeformer.runtime.session import Runtime


def compare_runtime(bundle: Path, checkpoint: Path | str | None = None, n: int = 200, task: str = "dates",
                    threads: int | None = None) -> dict[str, float | str]:
    """Greedy and beam outputs, exact-match accuracy and per-step logits, runtime vs PyTorch, on n held-out inputs."""
    model, tokenizer = load_checkpoint(checkpoint)
    if tokenizer is None:
        raise ValueError("parity on task inputs needs a checkpoint with a tokenizer")
    rt = Runtime(bundle, threads=threads)
    pairs = get_task(task).pairs(n, "test")
    src = tokenizer.encode_batch([s for s, _ in pairs])
    report: dict[str, float | str] = {"inputs": n, "provider": rt.provider}
    for name, gen in (("greedy", GenerationConfig(max_new_tokens=16)),
                      ("beam-4", GenerationConfig(strategy="beam", num_beams=4, max_new_tokens=16))):
        ours, ref = rt.generate(src, gen), generate(model, src, gen)
        same = sum(a[0].tokens == b[0].tokens for a, b in zip(ours, ref, strict=True))
        report[f"{name} identical to PyTorch"] = same / n
        if name == "greedy":
            report["exact match (runtime)"] = sum(tokenizer.decode(h[0].tokens) == t
                                                  for h, (_, t) in zip(ours, pairs, strict=True)) / n
            report["exact match (PyTorch)"] = sum(tokenizer.decode(h[0].tokens) == t
                                                  for h, (_, t) in zip(ref, pairs, strict=True)) / n
    worst = 0.0
    with torch.no_grad():
        for i in range(0, min(n, 64), 16):  # per-step logits on padded batches of 16
            r = compare_case(model, rt.sessions["encoder"], rt.sessions["decoder"], rt.manifest.graphs,
                             src[i: i + 16], 12, TOLERANCES["fp32"])
            worst = max(worst, r["decoder"])
    report["max |logit diff| per step"] = worst
    return report


def report_rows(report: dict[str, float | str]) -> list[list[str]]:
    """The report as a person reads it: shares as percentages, the logit difference in scientific notation."""
    def show(key: str, value: float | str) -> str:
        if isinstance(value, str) or key == "inputs":
            return str(value)
        return f"{value:.2%}" if "identical" in key or "exact match" in key else f"{value:.2e}"

    return [[k, show(k, v)] for k, v in report.items()]
