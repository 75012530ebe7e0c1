"""What a variant must reach against the bundle it came from (a gate), and what it missed. How a family's
variants are measured is the family's (transforms/encoder_decoder.py); the figures it returns are these."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from edgeformer.runtime.errors import ProviderFallback
from edgeformer.runtime.providers import require

R = TypeVar("R")


@dataclass(frozen=True)
class Gate:
    """What a variant must reach against its source bundle."""

    max_logprob_diff: float | None = None  # max |log-probability difference| over every step and token
    min_token_agreement: float | None = None  # share of steps whose greedy token is the source's
    max_metric_drop: float | None = None  # points of the task metric (exact match, chrF, BLEU), where it is known


def misses(gate: Gate, figures: dict) -> list[str]:
    """What the figures miss of the gate, one phrase each; empty when it passes."""
    found = []
    if gate.max_logprob_diff is not None and not figures["max_abs_logprob_diff"] <= gate.max_logprob_diff:
        found.append(f"max |log-prob difference| {figures['max_abs_logprob_diff']:.3g} > {gate.max_logprob_diff}")
    if gate.min_token_agreement is not None and figures["greedy_token_agreement"] < gate.min_token_agreement:
        what = figures.get("agreement", "greedy token")  # an image classifier's: top-1
        found.append(f"{what} agreement {figures['greedy_token_agreement']:.2%} < {gate.min_token_agreement:.0%}")
    if gate.max_metric_drop is not None and "metric" in figures:
        drop = figures["metric_source"] - figures["metric_variant"]
        if drop > gate.max_metric_drop:
            found.append(f"{figures['metric']} drops {drop:.1f} points (allowed {gate.max_metric_drop})")
    return found


def on_provider(open_runtime: Callable[[Sequence[str]], R], provider: str) -> tuple[R, dict[str, Any]]:
    """The candidate's runtime, opened on `provider` (the CPU after it), and what the figures record of where it ran:
    for a provider other than the CPU, the one asked, the nodes each graph put on each provider and the notes of what
    fell back. A provider not here is refused before anything opens."""
    asked = require(provider).provider  # "" for a policy: onnxruntime's choice
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProviderFallback)  # a graph the provider cannot take: in the notes
        runtime: Any = open_runtime([provider, "cpu"])
    if provider == "cpu":
        return runtime, {}
    return runtime, {"asked": asked or runtime.provider, "nodes": runtime.assigned, "notes": runtime.provider_notes}
