"""Decoding latency of step models (the runtime's, PyTorch's), measured pair by pair on the same inputs.

Every system goes through the same harness (the StepModel interface of runtime/search.py): encode once, then
`new_tokens` greedy steps, EOS ignored so that every system does the same work. Runs alternate between the
systems in rounds, so that drift in the machine's speed hits all alike, and every ratio is the median of the
ratios within rounds. Rounds repeat until every median is known to within a tolerance.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edgeformer.runtime.search import StepModel


@dataclass(frozen=True)
class Latency:
    encoder_ms: float  # median, encoder + cross-attention cache
    per_token_ms: float  # median over runs of (decode time / new tokens)
    per_token_p50_ms: float  # percentiles over every single step of every run
    per_token_p90_ms: float
    per_token_p99_ms: float
    end_to_end_ms: float  # median of encoder + all steps
    runs: int
    speedup: float  # median over rounds of (reference's per-token time / this system's), the same round's runs
    speedup_low: float  # 95% confidence interval of that median
    speedup_high: float
    per_run_ms: tuple[float, ...]  # per-token time of each run, in round order


def timing_record(v: Latency, batch: int) -> dict[str, Any]:
    """One system's figures at one point, under the keys every results file writes and every reader reads."""
    return {**{k: x for k, x in asdict(v).items() if not k.startswith("speedup")},
            "tokens_per_second": batch * 1e3 / v.per_token_ms, "speedup_vs_pytorch_kv": v.speedup,
            "speedup_ci95": [v.speedup_low, v.speedup_high]}


def median_ci(values: Sequence[float], z: float = 1.96) -> tuple[float, float]:
    """95% confidence interval of the median, from order statistics: no assumption about the distribution,
    which matters here, as run times have a floor and a long tail (preemption, the host's other tenants)."""
    x, n = sorted(values), len(values)
    half = z * math.sqrt(n) / 2
    return x[max(0, math.floor(n / 2 - half))], x[min(n - 1, math.ceil(n / 2 + half) - 1)]


def known_within(values: Sequence[float], tolerance: float) -> bool:
    low, high = median_ci(values)
    return high - low <= 2 * tolerance * statistics.median(values)


def time_decode(make_steps: Callable[[], StepModel], new_tokens: int, bos_id: int, batch: int = 1,
                ) -> tuple[float, list[float]]:
    """One run: (encoder seconds, seconds of each decoding step)."""
    t0 = time.perf_counter()
    steps = make_steps()
    encoder = time.perf_counter() - t0
    tokens = np.full(batch, bos_id, dtype=np.int64)
    free = np.zeros(steps.vocab, np.float32)
    step_times = []
    for _ in range(new_tokens):
        t = time.perf_counter()
        tokens = steps.top(tokens, 1, free)[1][:, 0]  # a greedy step, as the search takes it
        step_times.append(time.perf_counter() - t)
    return encoder, step_times


def compare_latency(systems: Mapping[str, Callable[[], StepModel]], new_tokens: int, bos_id: int, reference: str,
                    batch: int = 1, warmup: int = 1, min_runs: int = 10, max_runs: int = 200,
                    max_seconds: float = 60.0, tolerance: float = 0.04, warmup_s: float = 1.0,
                    pause_s: float = 0.06) -> dict[str, Latency]:
    """Rounds of one run per system until, after min_runs, the 95% interval of every median (per-token time,
    and ratio to `reference`) lies within +-tolerance of it, or max_runs or max_seconds is reached.

    Ratios are made within rounds because the machine drifts, partly for all systems at once; an interval, not a
    count of runs, stops the rounds. Warm-up rounds (`warmup`, and more until `warmup_s` has passed) are discarded.
    A pause of `pause_s` before each run lets the threads of the system before stop spinning. The measurements
    behind each choice are in the README (Benchmarks)."""
    if reference not in systems:
        raise ValueError(f"reference {reference!r} is not one of the systems {list(systems)}")
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
    for run in range(max_runs):
        for name, make in systems.items():
            time.sleep(pause_s)
            e, s = time_decode(make, new_tokens, bos_id, batch)
            enc[name].append(e)
            per_run[name].append(sum(s) / len(s))
            steps[name].extend(s)
        ratios = {n: [r / t for r, t in zip(per_run[reference], v, strict=True)] for n, v in per_run.items()}
        if run + 1 >= min_runs and (time.perf_counter() - start > max_seconds or all(
                known_within(per_run[n], tolerance) and known_within(ratios[n], tolerance) for n in systems)):
            break
    intervals = {name: median_ci(ratios[name]) for name in systems}
    return {name: Latency(encoder_ms=statistics.median(enc[name]) * 1e3,
                          per_token_ms=statistics.median(per_run[name]) * 1e3,
                          per_token_p50_ms=float(np.percentile(steps[name], 50)) * 1e3,
                          per_token_p90_ms=float(np.percentile(steps[name], 90)) * 1e3,
                          per_token_p99_ms=float(np.percentile(steps[name], 99)) * 1e3,
                          end_to_end_ms=statistics.median(e + t * new_tokens for e, t in
                                                          zip(enc[name], per_run[name], strict=True)) * 1e3,
                          runs=len(per_run[name]), speedup=statistics.median(ratios[name]),
                          speedup_low=intervals[name][0], speedup_high=intervals[name][1],
                          per_run_ms=tuple(round(t * 1e3, 4) for t in per_run[name])) for name in systems}
