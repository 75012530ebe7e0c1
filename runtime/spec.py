"""The graphs' inputs, outputs and dynamic axes, declared once as data.

The exporter builds its graphs from these declarations and writes them into the bundle's manifest; the runtime
reads them back from the manifest and checks them against the graphs. Names follow Hugging Face Optimum's
seq2seq convention so that tools that know it also know ours.

The design (see DESIGN.md): the encoder graph emits the cross-attention keys and values of every decoder layer
(computed once per source), and one decoder graph serves every step, the first with an empty past.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

ENCODER, DECODER = "encoder", "decoder"
GRAPHS = (ENCODER, DECODER)
# Symbolic axes; each one is dynamic in every graph.
BATCH, SRC_LEN, TGT_LEN, PAST_LEN = "batch", "src_len", "tgt_len", "past_len"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "int64", "float32", "float16"
    shape: tuple[str | int, ...]  # symbolic axis names or fixed sizes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


def past_name(layer: int, attention: str, kind: str) -> str:
    """attention: 'decoder' (self-attention cache) or 'encoder' (cross-attention cache); kind: 'key' | 'value'."""
    return f"past_key_values.{layer}.{attention}.{kind}"


def present_name(layer: int, attention: str, kind: str) -> str:
    return f"present.{layer}.{attention}.{kind}"


def past_for(present: str) -> str:
    """The input that a present output feeds on the next step (or, for the encoder's, on every step)."""
    if not present.startswith("present."):
        raise ValueError(f"{present!r} is not a cache output")
    return "past_key_values." + present[len("present."):]


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx's dynamic_axes for every input and output with a symbolic axis."""
        return {t.name: {i: str(a) for i, a in enumerate(t.shape) if isinstance(a, str)}
                for t in (*self.inputs, *self.outputs)}

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}

    @classmethod
    def from_dict(cls, name: str, d: dict[str, Any]) -> GraphSpec:
        return cls(name, tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
                   tuple(TensorSpec.from_dict(t) for t in d["outputs"]))


def _cache(names: Any, layers: int, attention: str, heads: int, head_dim: int, length: str,
           dtype: str) -> list[TensorSpec]:
    return [TensorSpec(names(i, attention, kind), dtype, (BATCH, heads, length, head_dim))
            for i in range(layers) for kind in ("key", "value")]


def encoder_spec(layers: int, heads: int, head_dim: int, dtype: str = "float32") -> GraphSpec:
    inputs = (TensorSpec("input_ids", "int64", (BATCH, SRC_LEN)),
              TensorSpec("attention_mask", "int64", (BATCH, SRC_LEN)))
    outputs = tuple(_cache(present_name, layers, "encoder", heads, head_dim, SRC_LEN, dtype))
    return GraphSpec(ENCODER, inputs, outputs)


def decoder_spec(layers: int, heads: int, head_dim: int, vocab: int, dtype: str = "float32") -> GraphSpec:
    inputs = (TensorSpec("input_ids", "int64", (BATCH, TGT_LEN)),
              TensorSpec("encoder_attention_mask", "int64", (BATCH, SRC_LEN)),
              *_cache(past_name, layers, "decoder", heads, head_dim, PAST_LEN, dtype),
              *_cache(past_name, layers, "encoder", heads, head_dim, SRC_LEN, dtype))
    outputs = (TensorSpec("logits", "float32", (BATCH, TGT_LEN, vocab)),
               *_cache(present_name, layers, "decoder", heads, head_dim, f"{PAST_LEN}+{TGT_LEN}", dtype))
    return GraphSpec(DECODER, inputs, outputs)
