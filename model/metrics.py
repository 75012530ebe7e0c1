"""Task metrics over decoded outputs and references, in points (0-100): exact match, and chrF and BLEU through
sacrebleu (the scores translation papers report). One place, for training, parity reports and variant gates."""

from __future__ import annotations

from collections.abc import Sequence

METRICS = ("exact_match", "chrf", "bleu")


def exact_match(outputs: Sequence[str], references: Sequence[str]) -> float:
    """Points of outputs equal to their reference."""
    if len(outputs) != len(references) or not references:
        raise ValueError(f"{len(outputs)} outputs for {len(references)} references")
    return 100.0 * sum(o == r for o, r in zip(outputs, references, strict=True)) / len(references)


def score(metric: str, outputs: Sequence[str], references: Sequence[str]) -> float:
    if metric == "exact_match":
        return exact_match(outputs, references)
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    try:
        import sacrebleu
    except ImportError:
        raise ImportError(f"the {metric} metric needs sacrebleu: pip install sacrebleu "
                          "(or edgeformer[export])") from None
    corpus = sacrebleu.corpus_chrf if metric == "chrf" else sacrebleu.corpus_bleu
    return float(corpus(list(outputs), [list(references)]).score)
