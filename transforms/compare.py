"""How a check compares two searches over the same model computed two ways (the one-graph search and ours, a
layout and the bundle it was cut from): token for token, where the model itself does not find two answers as good.

Two computations of the same model part in the last bits (other graphs, shapes, fusions), and where the model finds
two choices as good within NEAR_TIE either may be taken: a near tie, counted, not refused. onnxruntime's dynamic
int8 scales an activation by its whole batch, so an input's numbers move with the rows beside it, its beams included:
such bundles are compared one input at a time, with a wider bound.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx

from edgeformer.runtime.bundle import Manifest
from edgeformer.runtime.options import GenerationConfig, Hypothesis
from edgeformer.runtime.session import Runtime
from edgeformer.transforms.graph_edits import nodes

# Operators that quantize an activation with one scale for the whole tensor, computed at run time
PER_BATCH_SCALES = frozenset({"DynamicQuantizeLinear", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM"})
# nats a token. With per-batch scales an input's numbers move with the rows beside it, and a beam search prunes
# other beams: on the tests' tiny int8 model, two searches' best answers came 0.03 nats a token apart
NEAR_TIE, NEAR_TIE_PER_BATCH_SCALES = 1e-3, 0.05
BATCH = 32  # inputs a check runs together where rows are not coupled


def couples_rows(folder: Path, manifest: Manifest) -> bool:
    """Whether a bundle's graphs scale an activation by its whole batch (PER_BATCH_SCALES)."""
    for file in set(manifest.graph_files.values()):
        model = onnx.load(str(folder / file), load_external_data=False)
        if any(node.op_type in PER_BATCH_SCALES for node in nodes(model.graph)):
            return True
    return False


def plan(folder: Path, manifest: Manifest) -> tuple[bool, float]:
    """How a bundle's answers are compared: one input at a time or not, and the near-tie bound (nats a token)."""
    alone = couples_rows(folder, manifest)
    return alone, NEAR_TIE_PER_BATCH_SCALES if alone else NEAR_TIE


def figures(alone: bool, bound: float, ties: int) -> dict[str, Any]:
    """What a check records of how it compared."""
    return {"identical_tokens": not ties, "near_ties": ties, "near_tie_nats": bound, "batch": 1 if alone else BATCH}


def batches(sources: list[list[int]], alone: bool) -> Iterator[tuple[int, list[list[int]]]]:
    """(first index, inputs) in batches of BATCH, or one input at a time where `alone`."""
    step = 1 if alone else BATCH
    for i in range(0, len(sources), step):
        yield i, sources[i: i + step]


def near_tie(ref: Runtime, src: list[int], gen: GenerationConfig, ours: Hypothesis, theirs: Hypothesis,
             bound: float = NEAR_TIE) -> bool:
    """Whether `theirs` parts from `ours` (the reference's answer) only where the reference, scoring each alone,
    finds both as good within `bound` nats a token: greedy, the token where they first part (their prefixes score
    the same before it); beam, which may prune a beam on a near tie and end elsewhere, their whole hypotheses, a
    token's log-probability on average (an EOS ends each that stopped before max_new_tokens)."""
    eos = int(ref.config["eos_id"])
    a, b = ([*h.tokens, eos] if len(h.tokens) < gen.max_new_tokens else list(h.tokens) for h in (ours, theirs))
    if gen.strategy == "greedy":
        part = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)) - 1)
        mine, other = (ref.score([src], [t[: part + 1]], gen)[0] for t in (a, b))
    else:
        mine, other = (ref.score([src], [t], gen)[0] / len(t) for t in (a, b))
    return abs(mine - other) <= bound
