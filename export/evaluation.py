"""What a model is judged on: the user's inputs (`--eval FILE`, `--calibration FILE`), the built-in task for a
bundle that records one, or else inputs drawn from the model's own vocabulary and lengths, and then agreement
with the source alone, for want of references. Parity reports and variant gates take their inputs from here and
record in the manifest what they measured on.

A file holds one input a line: text (`source`, or `source<TAB>reference`) for a bundle with a tokenizer, or JSON
(`[12, 7, 30]`, or `{"source": "..." | [ids], "reference": "..." | [ids]}`) for any bundle.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeformer.model.metrics import METRICS, score
from edgeformer.model.tasks import get_task
from edgeformer.runtime.options import Hypothesis
from edgeformer.runtime.tokenizer import Tokenizer

RANDOM_LENGTHS = (2, 32)  # source lengths drawn for a model judged on random inputs
RANDOM_INPUTS = 64  # at most: with no references, agreement over 64 x 16 steps settles; more only costs time


@dataclass(frozen=True)
class EvalSet:
    sources: list[list[int]]
    references: list[str] | None = None  # where they exist: texts, or token ids written as "12 7 30"
    metric: str | None = None  # model/metrics.py; None without references
    judged_on: dict[str, Any] = field(default_factory=dict)  # what goes into the manifest

    def outputs(self, hypotheses: list[list[Hypothesis]], tokenizer: Tokenizer | None) -> list[str]:
        """The best hypothesis of each input as its reference is written."""
        texts = self.judged_on.get("references") == "texts"
        return [tokenizer.decode(h[0].tokens) if texts and tokenizer is not None else ids_text(h[0].tokens)
                for h in hypotheses]

    def score(self, hypotheses: list[list[Hypothesis]], tokenizer: Tokenizer | None) -> float:
        """The metric of these outputs against the references, in points."""
        if self.references is None or self.metric is None:
            raise ValueError("these inputs have no references to score against")
        return score(self.metric, self.outputs(hypotheses, tokenizer), self.references)


def ids_text(ids: list[int]) -> str:
    return " ".join(map(str, ids))


def eval_set(config: dict[str, Any], tokenizer: Tokenizer | None, task: str | None, path: Path | str | None = None,
             n: int = 200, split: str = "test", metric: str | None = None, seed: int = 0) -> EvalSet:
    """The inputs to judge a model with this config on: the file at `path` (its first n inputs), else n of the
    recorded built-in task's `split`, else n random inputs."""
    if metric is not None and metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if n < 1:
        raise ValueError(f"judge on at least one input, not {n}")
    if path is not None:
        return read_eval_file(Path(path), config, tokenizer, n, metric)
    if task is not None and tokenizer is not None:
        t = get_task(task)
        pairs = t.pairs(n, split, seed)
        return EvalSet(tokenizer.encode_batch([s for s, _ in pairs]), [r for _, r in pairs], metric or t.metric,
                       {"inputs": f"built-in task {task}, {split} split", "count": n, "references": "texts",
                        "metric": metric or t.metric})
    sources = random_sources(config, min(n, RANDOM_INPUTS), seed)
    return EvalSet(sources, judged_on={"inputs": "random ids from the model's source vocabulary, lengths "
                                                 f"{RANDOM_LENGTHS[0]}-{RANDOM_LENGTHS[1]}", "count": len(sources),
                                       "references": None, "metric": None})


def random_sources(config: dict[str, Any], n: int, seed: int = 0) -> list[list[int]]:
    """Inputs drawn from the model's own vocabulary (special tokens left out) and lengths."""
    rng = np.random.default_rng(seed)
    specials = {int(config[k]) for k in ("pad_id", "bos_id", "eos_id")}
    vocab = np.array([i for i in range(int(config["src_vocab_size"])) if i not in specials])
    longest = RANDOM_LENGTHS[1]
    if config.get("position") == "learned":
        longest = min(longest, int(config["max_positions"]))
    return [rng.choice(vocab, int(rng.integers(RANDOM_LENGTHS[0], longest + 1))).tolist() for _ in range(n)]


def read_eval_file(path: Path, config: dict[str, Any], tokenizer: Tokenizer | None, n: int,
                   metric: str | None) -> EvalSet:
    try:
        content = path.read_bytes()
        lines = [line for line in content.decode("utf-8").splitlines() if line.strip()][:n]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read it ({e})") from None
    if not lines:
        raise ValueError(f"{path}: no inputs in it; write one input a line")
    sources: list[list[int]] = []
    references: list[str] = []
    kinds = set()
    vocab = int(config["src_vocab_size"])
    for number, line in enumerate(lines, start=1):
        where = f"{path}, line {number}"
        source, reference = _parse_line(line, where)
        if (isinstance(source, str) or isinstance(reference, str)) and tokenizer is None:
            raise ValueError(f"{where}: text, but the bundle has no tokenizer; give token ids as JSON lines "
                             '([12, 7, 30] or {"source": [12, 7, 30], "reference": [5, 9]})')
        ids = tokenizer.encode_batch([source])[0] if isinstance(source, str) and tokenizer else source
        for what, value, bound in (("source", ids, vocab), ("reference", reference, None)):
            if value is not None and not isinstance(value, str) and not _token_ids(value, bound):
                raise ValueError(f"{where}: a {what} is text or a non-empty list of token ids"
                                 + (f" in [0, {bound})" if bound else "") + f", not {json.dumps(value)[:60]}")
        assert isinstance(ids, list)
        sources.append(ids)
        if reference is not None:
            kinds.add("texts" if isinstance(reference, str) else "ids")
            references.append(reference if isinstance(reference, str) else ids_text(reference))
    if references and len(references) != len(sources):
        raise ValueError(f"{path}: {len(references)} of {len(sources)} inputs have a reference; give every input "
                         "one, or none")
    if len(kinds) > 1:
        raise ValueError(f"{path}: references are texts on some lines and token ids on others; use one kind")
    kind = kinds.pop() if kinds else None
    chosen = (metric or ("chrf" if kind == "texts" else "exact_match")) if kind else None
    digest = hashlib.sha256(content).hexdigest()
    return EvalSet(sources, references or None, chosen,
                   {"inputs": f"file {path.name} (sha256 {digest[:16]})", "count": len(sources), "references": kind,
                    "metric": chosen})


def _token_ids(value: object, bound: int | None) -> bool:
    return (isinstance(value, list) and len(value) > 0 and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 and (bound is None or t < bound) for t in value))


def _parse_line(line: str, where: str) -> tuple[str | list[int], str | list[int] | None]:
    stripped = line.strip()
    if stripped.startswith(("[", "{")):
        try:
            item = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
        if isinstance(item, list):
            return item, None
        if not isinstance(item, dict) or "source" not in item:
            raise ValueError(f'{where}: a JSON line is [ids] or {{"source": ..., "reference": ...}}')
        return item["source"], item.get("reference")
    source, _, reference = line.partition("\t")
    return source, (reference if reference else None)
