"""`TransformerConfig`: the one description of a model, saved as `config.json` in every checkpoint and bundle."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from edgeformer.runtime.errors import EdgeformerError

ACTIVATIONS = ("relu", "gelu", "silu")
POSITIONS = ("sinusoidal", "learned")
SINUSOIDS = ("interleaved", "halves")
NORMS = ("post", "pre")


# The reference size of our benchmarks: Transformer-base of the paper, with a shared 32k vocabulary.
BASE_SIZE: dict[str, Any] = {"src_vocab_size": 32000, "tgt_vocab_size": 32000, "d_model": 512, "n_heads": 8,
                             "n_encoder_layers": 6, "n_decoder_layers": 6, "d_ff": 2048, "dropout": 0.0,
                             "share_embeddings": True}


class ConfigError(EdgeformerError, ValueError):
    """A config that cannot describe a working model."""


@dataclass(frozen=True)
class TransformerConfig:
    src_vocab_size: int
    tgt_vocab_size: int
    d_model: int = 512
    n_heads: int = 8
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    d_ff: int = 2048
    dropout: float = 0.1
    activation: str = "relu"  # relu (the paper) | gelu (exact, erf) | silu (x * sigmoid(x), Marian's "swish")
    position: str = "sinusoidal"  # sinusoidal (the paper, unbounded) | learned (bounded by max_positions)
    norm: str = "post"  # post: Add & Norm after each sub-layer (the paper) | pre: norm first, final norm at the end
    # Where the sines and cosines sit: interleaved sin, cos, sin, ... (the paper's formula, the PyTorch tutorial)
    # or halves: all sines, then all cosines (Marian, fairseq, tensor2tensor). The same frequencies either way.
    sinusoid: str = "interleaved"
    max_positions: int = 1024  # size of a learned position table; sinusoidal positions ignore it
    scale_embeddings: bool = True  # multiply embeddings by sqrt(d_model), as the paper does
    share_embeddings: bool = False  # source and target share one table (needs one shared vocabulary)
    tie_output: bool = True  # the output projection reuses the target embedding
    output_bias: bool = False  # a bias added to the logits (Marian's final_logits_bias, a tutorial's generator)
    final_norm: bool | None = None  # LayerNorm after the last layer; None: with pre-norm only (nn.Transformer: always)
    layer_norm_eps: float = 1e-5
    pad_id: int = 0
    bos_id: int = 1  # first decoder input (the decoder start token)
    eos_id: int = 2

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def has_final_norm(self) -> bool:
        return self.norm == "pre" if self.final_norm is None else self.final_norm

    def validate(self) -> None:
        problems = []
        for name in ("src_vocab_size", "tgt_vocab_size", "d_model", "n_heads", "n_encoder_layers",
                     "n_decoder_layers", "d_ff", "max_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not problems and self.d_model % self.n_heads:
            problems.append(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}); "
                            f"pick n_heads from {[h for h in range(1, 33) if self.d_model % h == 0]}")
        if not problems and self.position == "sinusoidal" and self.d_model % 2:
            problems.append(f"sinusoidal positions need an even d_model, got {self.d_model}")
        if self.activation not in ACTIVATIONS:
            problems.append(f"unknown activation {self.activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        if self.position not in POSITIONS:
            problems.append(f"unknown position {self.position!r}; choose one of {', '.join(POSITIONS)}")
        if self.sinusoid not in SINUSOIDS:
            problems.append(f"unknown sinusoid layout {self.sinusoid!r}; choose one of {', '.join(SINUSOIDS)}")
        if self.norm not in NORMS:
            problems.append(f"unknown norm placement {self.norm!r}; choose one of {', '.join(NORMS)}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            problems.append("share_embeddings needs one vocabulary: src_vocab_size "
                            f"({self.src_vocab_size}) != tgt_vocab_size ({self.tgt_vocab_size})")
        for name in ("pad_id", "bos_id", "eos_id"):
            value = getattr(self, name)
            if not problems and not 0 <= value < min(self.src_vocab_size, self.tgt_vocab_size):
                problems.append(f"{name} ({value}) is outside the vocabulary")
        if problems:
            raise ConfigError("invalid TransformerConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TransformerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)

