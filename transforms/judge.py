"""Judging a variant against the bundle it came from, before it is written: per-step log-probabilities and greedy
tokens on the inputs of an EvalSet (export/evaluation.py: the user's, the recorded task's, or random ones), and
the task metric of both bundles where the inputs have references. A gate says what a variant must reach."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeformer.export.evaluation import EvalSet
from edgeformer.runtime.search import pad
from edgeformer.runtime.session import Runtime


@dataclass(frozen=True)
class Gate:
    """What a variant must reach against its source bundle."""

    max_logprob_diff: float | None = None  # max |log-probability difference| over every step and token
    min_token_agreement: float | None = None  # share of steps whose greedy token is the source's
    max_metric_drop: float | None = None  # points of the task metric (exact match, chrF, BLEU), where it is known


def judge(source: Path, candidate: Path, inputs: EvalSet, provider: str = "cpu", steps: int = 16) -> dict:
    """The candidate bundle against the bundle it came from, both fed the source's greedy tokens."""
    ref, new = Runtime(source, threads=2), Runtime(candidate, providers=[provider, "cpu"], threads=2)
    # the bundle's own settings, greedy, within what learned positions allow
    gen = ref.generation_config(strategy="greedy", num_return_sequences=1, max_new_tokens=min(
        ref.generation.max_new_tokens, ref.manifest.max_positions or ref.generation.max_new_tokens))
    ref.check_inputs(inputs.sources, gen)
    worst, agree, total = 0.0, 0, 0
    for i in range(0, len(inputs.sources), 50):
        chunk = inputs.sources[i: i + 50]
        ids, mask = pad(chunk, int(ref.config["pad_id"]))
        a, b = ref.step_model(ids, mask, 1), new.step_model(ids, mask, 1)
        tokens = np.full(len(chunk), int(ref.config["bos_id"]), dtype=np.int64)
        for _ in range(steps):
            la, lb = a.log_probs(tokens), b.log_probs(tokens)
            worst = max(worst, float(np.abs(la - lb).max()))
            agree += int((la.argmax(-1) == lb.argmax(-1)).sum())
            total += len(chunk)
            tokens = la.argmax(-1)
    figures: dict = {"against": f"{ref.manifest.variant} bundle", "provider": new.provider,
                     "inputs": len(inputs.sources), "judged_on": inputs.judged_on,
                     "max_abs_logprob_diff": worst, "greedy_token_agreement": agree / total}
    if inputs.metric is not None:
        figures["metric"] = inputs.metric
        figures["metric_source"] = inputs.score(ref.generate(inputs.sources, gen), ref.tokenizer)
        figures["metric_variant"] = inputs.score(new.generate(inputs.sources, gen), new.tokenizer)
    return figures


def misses(gate: Gate, figures: dict) -> list[str]:
    """What the figures miss of the gate, one phrase each; empty when it passes."""
    found = []
    if gate.max_logprob_diff is not None and not figures["max_abs_logprob_diff"] <= gate.max_logprob_diff:
        found.append(f"max |log-prob difference| {figures['max_abs_logprob_diff']:.3g} > {gate.max_logprob_diff}")
    if gate.min_token_agreement is not None and figures["greedy_token_agreement"] < gate.min_token_agreement:
        found.append(f"greedy token agreement {figures['greedy_token_agreement']:.2%} < "
                     f"{gate.min_token_agreement:.0%}")
    if gate.max_metric_drop is not None and "metric" in figures:
        drop = figures["metric_source"] - figures["metric_variant"]
        if drop > gate.max_metric_drop:
            found.append(f"{figures['metric']} drops {drop:.1f} points (allowed {gate.max_metric_drop})")
    return found
