"""Decoding latency of the runtime against PyTorch eager, measured pair by pair on the same weights.

Both systems go through the same harness (the StepModel interface of runtime/search.py): encode once, then
`new_tokens` greedy steps with the KV cache, EOS ignored so that both do the same work. Runs alternate between
the systems so that drift in the machine's speed hits both alike.
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
    per_token_ms: float  # median over runs of (decode time / new tokens)
    per_token_p90_ms: float
    runs: int


def time_decode(make_steps: Callable[[], StepModel], new_tokens: int, bos_id: int) -> tuple[float, float]:
    """One run: (encoder seconds, decode seconds per token)."""
    t0 = time.perf_counter()
    steps = make_steps()
    t1 = time.perf_counter()
    tokens = None
    for _ in range(new_tokens):
        logp = steps.log_probs(np.full(1, bos_id, dtype=np.int64) if tokens is None else tokens)
        tokens = logp.argmax(-1)
    t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) / new_tokens


def compare_latency(systems: dict[str, Callable[[], StepModel]], new_tokens: int, bos_id: int, warmup: int = 2,
                    min_runs: int = 5, max_runs: int = 30, max_seconds: float = 60.0) -> dict[str, Latency]:
    """Interleaved runs until every system's per-token median is stable to 2% (or the budget runs out)."""
    for _ in range(warmup):
        for make in systems.values():
            time_decode(make, new_tokens, bos_id)
    enc: dict[str, list[float]] = {name: [] for name in systems}
    tok: dict[str, list[float]] = {name: [] for name in systems}
    start = time.perf_counter()
    previous: dict[str, float] = {}
    for run in range(max_runs):
        for name, make in systems.items():
            e, t = time_decode(make, new_tokens, bos_id)
            enc[name].append(e)
            tok[name].append(t)
        if run + 1 >= min_runs:
            medians = {n: statistics.median(v) for n, v in tok.items()}
            stable = previous and all(abs(medians[n] - previous[n]) <= 0.02 * medians[n] for n in medians)
            if stable or time.perf_counter() - start > max_seconds:
                break
            previous = medians
    return {name: Latency(statistics.median(enc[name]) * 1e3, statistics.median(tok[name]) * 1e3,
                          float(np.percentile(tok[name], 90)) * 1e3, len(tok[name])) for name in systems}
