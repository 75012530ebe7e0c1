"""Decoding latency of step models (the runtime's, PyTorch's), measured pair by pair on the same inputs.

Every system goes through the same harness (the StepModel interface of runtime/search.py): encode once, then
`new_tokens` greedy steps, EOS ignored so that every system does the same work. Runs alternate between the
systems so that drift in the machine's speed hits all alike, and repeat until every median is stable.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgeformer.runtime.search import StepModel


@dataclass(frozen=True)
class Latency:
    encoder_ms: float  # median, encoder + cross-attention cache
    per_token_ms: float  # median over runs of (decode time / new tokens): the figure ratios are made of
    per_token_p50_ms: float  # percentiles over every single step of every run
    per_token_p90_ms: float
    per_token_p99_ms: float
    end_to_end_ms: float  # median of encoder + all steps
    runs: int


def time_decode(make_steps: Callable[[], StepModel], new_tokens: int, bos_id: int, batch: int = 1,
                ) -> tuple[float, list[float]]:
    """One run: (encoder seconds, seconds of each decoding step)."""
    t0 = time.perf_counter()
    steps = make_steps()
    encoder = time.perf_counter() - t0
    tokens = np.full(batch, bos_id, dtype=np.int64)
    step_times = []
    for _ in range(new_tokens):
        t = time.perf_counter()
        tokens = steps.log_probs(tokens).argmax(-1)
        step_times.append(time.perf_counter() - t)
    return encoder, step_times


def compare_latency(systems: dict[str, Callable[[], StepModel]], new_tokens: int, bos_id: int, batch: int = 1,
                    warmup: int = 1, min_runs: int = 10, max_runs: int = 30, max_seconds: float = 60.0,
                    tolerance: float = 0.02, warmup_s: float = 1.0, pause_s: float = 0.02) -> dict[str, Latency]:
    """Interleaved runs until every system's per-token median moves less than `tolerance` from one run to the
    next (after min_runs), or the time budget is spent.

    Warm-up rounds (`warmup`, and more until `warmup_s` has passed) are discarded: after a single one, the first
    point of a benchmark ran 10-50% slower than its repeat at the end. At least 10 runs: at the shipped model's
    size a run takes 10 ms, and with 3 or 4 runs one slow run moved a median by up to 75%. A pause of `pause_s`
    before each run: PyTorch's OpenMP threads spin a while after its last parallel region, and the system that ran
    right after PyTorch (recomputing the prefix) met 4 ms stalls (one scheduler tick) in most of its runs, in four
    benchmarks out of four on 2 cores; in the two benchmarks run with the pause, it met none."""
    start = time.perf_counter()
    rounds = 0
    while rounds < warmup or time.perf_counter() - start < warmup_s:
        for make in systems.values():
            time_decode(make, new_tokens, bos_id, batch)
        rounds += 1
    enc: dict[str, list[float]] = {name: [] for name in systems}
    per_run: dict[str, list[float]] = {name: [] for name in systems}
    steps: dict[str, list[float]] = {name: [] for name in systems}
    start = time.perf_counter()
    previous: dict[str, float] = {}
    for run in range(max_runs):
        for name, make in systems.items():
            time.sleep(pause_s)
            e, s = time_decode(make, new_tokens, bos_id, batch)
            enc[name].append(e)
            per_run[name].append(sum(s) / len(s))
            steps[name].extend(s)
        if run + 1 >= min_runs:
            medians = {n: statistics.median(v) for n, v in per_run.items()}
            stable = previous and all(abs(medians[n] - previous[n]) <= tolerance * medians[n] for n in medians)
            if stable or time.perf_counter() - start > max_seconds:
                break
            previous = medians
    return {name: Latency(encoder_ms=statistics.median(enc[name]) * 1e3,
                          per_token_ms=statistics.median(per_run[name]) * 1e3,
                          per_token_p50_ms=float(np.percentile(steps[name], 50)) * 1e3,
                          per_token_p90_ms=float(np.percentile(steps[name], 90)) * 1e3,
                          per_token_p99_ms=float(np.percentile(steps[name], 99)) * 1e3,
                          end_to_end_ms=statistics.median(e + t * new_tokens for e, t in
                                                          zip(enc[name], per_run[name], strict=True)) * 1e3,
                          runs=len(per_run[name])) for name in systems}
