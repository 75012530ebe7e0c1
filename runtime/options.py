"""Generation options, shared by the runtime and the PyTorch reference so that both read the same settings."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from numbers import Integral, Real
from typing import Any

from edgeformer.runtime.errors import InputError

STRATEGIES = ("greedy", "beam", "sample")
INTS = ("max_new_tokens", "min_new_tokens", "num_beams", "num_return_sequences", "top_k")
FLOATS = ("length_penalty", "temperature", "top_p")
FLAGS = ("ignore_eos", "early_stopping", "forced_eos")
MAX_LENGTH_PENALTY = 100  # 1024 tokens ** 100 is still a float; 1e308 is not


def is_int(value: Any) -> bool:
    """A whole number (numpy's too), not a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    """A real number (numpy's too), not a bool, that a float holds: 10**400 is not one."""
    if isinstance(value, bool) or not isinstance(value, Real):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


@dataclass(frozen=True)
class GenerationConfig:
    strategy: str = "greedy"  # greedy | beam | sample
    max_new_tokens: int = 64
    min_new_tokens: int = 0  # EOS is forbidden before this many tokens
    ignore_eos: bool = False  # decode exactly max_new_tokens (benchmarks force equal work this way)
    num_beams: int = 4
    length_penalty: float = 1.0  # beam score = sum of log-probs / length ** length_penalty
    num_return_sequences: int = 1  # n-best size (beam) or samples per input (sample)
    early_stopping: bool = True  # beam: stop an input once it has num_beams finished hypotheses
    suppress_tokens: tuple[int, ...] = ()  # never generated (Marian's pad, which is also the decoder start)
    forced_eos: bool = False  # the last step may only produce EOS (Hugging Face's forced_eos_token_id)
    temperature: float = 1.0
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0  # nucleus: the smallest set of tokens whose probability reaches top_p
    seed: int | None = None

    def __post_init__(self) -> None:
        wrong = [f"{k} must be an integer, not {getattr(self, k)!r}" for k in INTS if not is_int(getattr(self, k))]
        wrong += [f"{k} must be a finite number, not {getattr(self, k)!r}" for k in FLOATS
                  if not is_finite(getattr(self, k))]
        wrong += [f"{k} must be True or False, not {getattr(self, k)!r}" for k in FLAGS
                  if not isinstance(getattr(self, k), bool)]
        if self.seed is not None and (not is_int(self.seed) or self.seed < 0):
            wrong.append(f"seed must be a non-negative integer or None, not {self.seed!r}")
        if not isinstance(self.suppress_tokens, tuple) or not all(is_int(t) and t >= 0 for t in self.suppress_tokens):
            wrong.append(f"suppress_tokens must be a tuple of token ids, not {self.suppress_tokens!r}")
        if wrong:  # the checks below compare values: they need the right types
            raise InputError("invalid generation settings: " + "; ".join(wrong))
        problems = []
        if self.strategy not in STRATEGIES:
            problems.append(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            problems.append(f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                            f"got {self.min_new_tokens}")
        if self.num_beams < 1:
            problems.append(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_return_sequences < 1:
            problems.append(f"num_return_sequences must be >= 1, got {self.num_return_sequences}")
        if self.strategy == "beam" and self.num_return_sequences > self.num_beams:
            problems.append(f"num_return_sequences ({self.num_return_sequences}) cannot exceed "
                            f"num_beams ({self.num_beams})")
        if self.strategy == "greedy" and self.num_return_sequences != 1:
            problems.append("greedy search returns one sequence; use strategy='beam' or 'sample' for more")
        if not -MAX_LENGTH_PENALTY <= self.length_penalty <= MAX_LENGTH_PENALTY:
            problems.append(f"length_penalty must be in [-{MAX_LENGTH_PENALTY}, {MAX_LENGTH_PENALTY}], got "
                            f"{self.length_penalty} (a length to that power must stay a float)")
        if self.temperature <= 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if problems:
            raise InputError("invalid generation settings: " + "; ".join(problems))

    @property
    def rows_per_input(self) -> int:
        """The decoder rows each input takes: its beams, or its samples (greedy: one)."""
        return self.num_beams if self.strategy == "beam" else self.num_return_sequences

    def to_dict(self) -> dict[str, Any]:
        """As JSON holds it (the form from_dict reads)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationConfig:
        """Settings as a bundle's manifest stores them; unknown keys are an error, not ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"unknown generation settings {unknown}; known ones are {sorted(known)}")
        settings: dict[str, Any] = {k: tuple(v) if k == "suppress_tokens" and isinstance(v, list) else v
                                    for k, v in d.items()}
        return cls(**settings)


@dataclass(frozen=True)
class Limits:
    """What one generate call may ask of a Runtime, beyond what the model itself bounds (learned positions).

    The cost of a call grows with the square of the source length (the encoder's attention) and of the tokens
    generated (each step attends to all before it): without a limit one request can hold a core for minutes or ask
    for more memory than the machine has. Raise them for a model that needs more (README: Security)."""

    source_tokens: int = 1024  # tokens of the longest input
    new_tokens: int = 1024  # max_new_tokens
    rows: int = 1024  # inputs x beams (beam search) or x samples: the rows of every decoder step

    def __post_init__(self) -> None:
        bad = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
               if not is_int(getattr(self, f.name)) or getattr(self, f.name) < 1]
        if bad:
            raise InputError(f"limits must be positive integers: {', '.join(bad)}")


@dataclass(frozen=True)
class Hypothesis:
    tokens: list[int]  # generated ids, without the start token and without EOS
    score: float  # beam: length-penalized log-probability; greedy and sample: sum of log-probabilities
