"""The encoder-decoder family (the Transformer of "Attention Is All You Need"), declared as data.

Names follow Hugging Face Optimum's seq2seq convention so that tools that know it also know ours. The encoder
graph emits the cross-attention keys and values of every decoder layer (computed once per source), and one
decoder graph serves every step, the first with an empty past.

Two batch axes: `batch` counts sources (the encoder's inputs, the source mask and cross-attention cache the decoder
reads), `rows` the decoder's rows, a whole multiple of them: each source's beams or samples, next to each other,
share its cross-attention keys and values (model/transformer.py), which are never copied per row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from edgeformer.runtime.spec import Family, GraphSpec, TensorSpec

ENCODER, DECODER = "encoder", "decoder"
BATCH, ROWS, SRC_LEN, TGT_LEN, PAST_LEN, TOP_K = "batch", "rows", "src_len", "tgt_len", "past_len", "k"
# How the decoder's self-attention cache is passed: "concat", each step's present a new tensor, past and the step's
# keys and values concatenated (every exported bundle); "buffer", one preallocated buffer per tensor, up to
# `capacity` positions, that each step reads as its past and writes its new position into, in place (onnxruntime's
# GroupQueryAttention; made by `optimize` for the CPU): the step is told the past's length in `past_length`.
CACHES = ("concat", "buffer")
CAPACITY, PAST_LENGTH = "capacity", "past_length"
# The decoder's search head: what greedy and beam search need of a step, computed in the graph (LogSoftmax, the
# mask added, TopK) so that a step returns k values a row instead of the whole vocabulary. Not traced by
# torch.export: the exporter appends it in ONNX operators (export/encoder_decoder.py, search_head).
LOGITS_MASK, TOP_K_INPUT, TOP_LOG_PROBS, TOP_IDS = "logits_mask", "top_k", "top_log_probs", "top_ids"
HEAD_INPUTS, HEAD_OUTPUTS = (LOGITS_MASK, TOP_K_INPUT), (TOP_LOG_PROBS, TOP_IDS)
SEARCH_HEAD = "search_head/"  # the prefix of its nodes' names (transforms keep them in float32)
# The whole search in one graph (`--search greedy|beam`): onnxruntime's BeamSearch operator (com.microsoft, its
# encoder-decoder form) holding the encoder and decoder as subgraphs, so that any onnxruntime binding generates
# with one run. Greedy is its one-beam form with early stopping. A bundle that has it keeps its two graphs, which
# share its weight files. Sequences start with the decoder start token and end where END fills them (-1: no token).
SEARCH, SEARCHES, END = "search", ("greedy", "beam"), -1
SEARCH_FILE = "search.onnx"


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


def is_self_cache(name: str) -> bool:
    """A decoder input that holds the self-attention cache (empty on the first step)."""
    return name.startswith("past_key_values.") and name.endswith((".decoder.key", ".decoder.value"))


def _cache(names: Callable[[int, str, str], str], layers: int, attention: str, heads: int, head_dim: int,
           length: str, dtype: str) -> list[TensorSpec]:
    batch = ROWS if attention == "decoder" else BATCH  # the self-attention cache is per row, the cross one per source
    return [TensorSpec(names(i, attention, kind), dtype, (batch, heads, length, head_dim))
            for i in range(layers) for kind in ("key", "value")]


def _layer_caches(layers: int, heads: int, head_dim: int, self_length: str, dtype: str) -> list[TensorSpec]:
    """The decoder's past, layer by layer: self-attention key and value, then cross-attention key and value, the
    order in which Optimum's seq2seq models take them (it feeds its caches by position)."""
    own = _cache(past_name, layers, "decoder", heads, head_dim, self_length, dtype)
    cross = _cache(past_name, layers, "encoder", heads, head_dim, SRC_LEN, dtype)
    return [t for i in range(layers) for t in (*own[2 * i: 2 * i + 2], *cross[2 * i: 2 * i + 2])]


def encoder_spec(layers: int, heads: int, head_dim: int, dtype: str = "float32") -> GraphSpec:
    inputs = (TensorSpec("input_ids", "int64", (BATCH, SRC_LEN)),
              TensorSpec("attention_mask", "int64", (BATCH, SRC_LEN)))
    outputs = tuple(_cache(present_name, layers, "encoder", heads, head_dim, SRC_LEN, dtype))
    return GraphSpec(ENCODER, inputs, outputs)


def decoder_spec(layers: int, heads: int, head_dim: int, vocab: int, dtype: str = "float32",
                 cache: str = "concat") -> GraphSpec:
    buffered = cache == "buffer"
    inputs = (TensorSpec("input_ids", "int64", (ROWS, TGT_LEN)),
              TensorSpec("encoder_attention_mask", "int64", (BATCH, SRC_LEN)),
              *_layer_caches(layers, heads, head_dim, CAPACITY if buffered else PAST_LEN, dtype),
              TensorSpec(LOGITS_MASK, "float32", (vocab,)),  # added to the last step's log-probabilities
              TensorSpec(TOP_K_INPUT, "int64", (1,)),  # k
              *((TensorSpec(PAST_LENGTH, "int64", (1,)),) if buffered else ()))  # positions filled in the buffers
    outputs = (TensorSpec("logits", "float32", (ROWS, TGT_LEN, vocab)),
               *_cache(present_name, layers, "decoder", heads, head_dim,
                       CAPACITY if buffered else f"{PAST_LEN}+{TGT_LEN}", dtype),
               TensorSpec(TOP_LOG_PROBS, "float32", (ROWS, TOP_K)),  # best first; ties: the lower id first
               TensorSpec(TOP_IDS, "int64", (ROWS, TOP_K)))
    return GraphSpec(DECODER, inputs, outputs)


def search_spec(vocab: int, strategy: str) -> GraphSpec:
    """The one-graph search: sources in, sequences out. int32, as onnxruntime's operator takes them; what a greedy
    graph fixes (one beam, one sequence, no length penalty) is not an input."""
    beam = strategy == "beam"
    one = (1,)
    inputs = (TensorSpec("input_ids", "int32", (BATCH, SRC_LEN)),
              TensorSpec("attention_mask", "int32", (BATCH, SRC_LEN)),
              TensorSpec("max_length", "int32", one),  # the start token and the new tokens, EOS included
              TensorSpec("min_length", "int32", one),  # EOS is forbidden while a sequence is shorter
              *((TensorSpec("num_beams", "int32", one), TensorSpec("num_return_sequences", "int32", one),
                 TensorSpec("length_penalty", "float32", one)) if beam else ()),
              TensorSpec("vocab_mask", "int32", (vocab,)))  # 0 for the tokens never to generate
    outputs = (TensorSpec("sequences", "int32", (BATCH, "num_return_sequences", "max_length")),
               TensorSpec("sequences_scores", "float32", (BATCH, "num_return_sequences")))
    return GraphSpec(SEARCH, inputs, outputs)


def graphs(config: Mapping[str, Any], cache: str = "concat", search: str | None = None) -> dict[str, GraphSpec]:
    """The graphs of a model with this config (config.json's fields), its self-attention cache passed as `cache`
    (CACHES), and with `search` (SEARCHES) the one-graph search."""
    layers, heads = int(config["n_decoder_layers"]), int(config["n_heads"])
    head_dim = int(config["d_model"]) // heads
    found = {ENCODER: encoder_spec(layers, heads, head_dim),
             DECODER: decoder_spec(layers, heads, head_dim, int(config["tgt_vocab_size"]), cache=cache)}
    if search is not None:
        found[SEARCH] = search_spec(int(config["tgt_vocab_size"]), search)
    return found


# The largest value each size may have in a manifest: far beyond any model this runtime serves, and small enough
# that building the declared graphs from a manifest stays cheap, whatever a stranger's manifest says.
SIZES = {"src_vocab_size": 1 << 24, "tgt_vocab_size": 1 << 24, "d_model": 1 << 16, "n_heads": 1 << 10,
         "n_encoder_layers": 1 << 10, "n_decoder_layers": 1 << 10, "d_ff": 1 << 20, "max_positions": 1 << 24}
TOKENS = ("pad_id", "bos_id", "eos_id")  # target ids; pad also pads sources
WORDS = {"position": ("sinusoidal", "learned"), "activation": None, "norm": None}  # None: any text


def check_config(config: Mapping[str, Any]) -> list[str]:
    """What is wrong with a config that a bundle's manifest carries, as far as the runtime reads it."""
    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    problems = [f"{k} must be an integer in [1, {most}], not {config.get(k)!r}" for k, most in SIZES.items()
                if not whole(config.get(k)) or not 1 <= config[k] <= most]
    problems += [f"{k} must be a token id, not {config.get(k)!r}" for k in TOKENS
                 if not whole(config.get(k)) or config[k] < 0]
    for key, allowed in WORDS.items():
        if not isinstance(config.get(key), str) or (allowed and config[key] not in allowed):
            problems.append(f"{key} must be " + (" or ".join(allowed) if allowed else "a name") +
                            f", not {config.get(key)!r}")
    if problems:
        return problems
    if config["d_model"] % config["n_heads"]:
        problems.append(f"d_model {config['d_model']} is not divisible by n_heads {config['n_heads']}")
    for key in TOKENS:  # all three are target tokens; pad pads the sources too
        vocab = min(config["src_vocab_size"], config["tgt_vocab_size"]) if key == "pad_id" else config["tgt_vocab_size"]
        if config[key] >= vocab:
            problems.append(f"{key} {config[key]} is outside the vocabulary [0, {vocab})")
    return problems


ENCODER_DECODER = Family(name="encoder-decoder", graph_files={ENCODER: "encoder.onnx", DECODER: "decoder.onnx"},
                         axes=(BATCH, ROWS, SRC_LEN, TGT_LEN, PAST_LEN, TOP_K, CAPACITY), graphs=graphs,
                         check_config=check_config, caches=CACHES, searches=SEARCHES,
                         cpu_unfused=("SkipLayerNormFusion",))
