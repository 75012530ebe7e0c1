"""The whole search in one graph: `--search greedy|beam` on export, optimize and quantize.

onnxruntime's BeamSearch operator (com.microsoft) in its encoder-decoder form (`model_type` 1, built for T5 by
onnxruntime's convert_generation.py) holds an encoder subgraph and a decoder subgraph and runs the search inside one
session, so that any onnxruntime binding (C, C++, C#, Java, Node.js, Objective-C) generates without our Python loop.
Our two graphs already have its contract but for names and dtypes: the encoder emits every decoder layer's
cross-attention keys and values, and the decoder takes the caches (in another order) and returns the
logits and the grown cache. Each becomes a subgraph with int32 token and mask inputs cast to ours, the operator's
names (`present_key_cross_{i}`, `past_key_self_{i}`, ...), and the decoder's search head fixed to nothing (the
operator takes the logits); weights stay in the bundle's weight files, a weight both subgraphs read held once by the
main graph. Greedy is the one-beam form with early stopping, which picks each row's best token and ends a row at
EOS, as our greedy search does (onnxruntime's GreedySearch operator has no encoder-decoder form).

Before a bundle with it is written, its tokens are checked against `Runtime.generate` on the same inputs (greedy;
beam 4 with a length penalty; min and max lengths; EOS). Where the operator's rule differs from ours, the check
compares like with like: a beam that reaches max_length is scored by a length that counts the decoder start token
(Hugging Face's rule, ours, counts the new tokens alone), so that reference runs with the operator's rule.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeformer.export.graph_store import reorder
from edgeformer.export.parity import ParityError
from edgeformer.runtime.bundle import Manifest
from edgeformer.runtime.encoder_decoder import (
    DECODER,
    ENCODER,
    END,
    HEAD_OUTPUTS,
    LOGITS_MASK,
    SEARCH,
    SEARCH_FILE,
    SEARCHES,
    TOP_K_INPUT,
)
from edgeformer.runtime.families import get_family
from edgeformer.runtime.options import GenerationConfig
from edgeformer.runtime.session import Runtime
from edgeformer.transforms.compare import batches, figures, near_tie, plan
from edgeformer.transforms.graph_edits import prune

INT64 = "_int64"  # the suffix of a subgraph's int32 input once cast to the int64 our graphs take


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every use and the definition of the value `old` in `graph` (its nodes; not its inputs or outputs)."""
    for node in graph.node:
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                if name == old:
                    names[i] = new


def _int32_input(graph: onnx.GraphProto, name: str, new: str) -> None:
    """The int64 input `name` taken as the int32 input `new`, cast to int64 for the nodes that read it."""
    old = next(t for t in graph.input if t.name == name)
    dims = [d.dim_param or d.dim_value for d in old.type.tensor_type.shape.dim]
    _rename(graph, name, new + INT64)
    where = list(graph.input).index(old)
    graph.input.remove(old)
    graph.input.insert(where, helper.make_tensor_value_info(new, TensorProto.INT32, dims))
    graph.node.insert(0, helper.make_node("Cast", [new], [new + INT64], to=TensorProto.INT64, name=f"search/{new}"))


def _cache_name(name: str, prefix: str) -> str:
    """`past_key_values.3.decoder.key` -> `past_key_self_3`; `present.3.encoder.value` -> `present_value_cross_3`."""
    _, layer, attention, kind = name.split(".")
    return f"{prefix}_{kind}_{'self' if attention == 'decoder' else 'cross'}_{layer}"


def encoder_subgraph(encoder: onnx.GraphProto) -> onnx.GraphProto:
    graph = onnx.GraphProto.FromString(encoder.SerializeToString())
    _int32_input(graph, "input_ids", "encoder_input_ids")
    _int32_input(graph, "attention_mask", "encoder_attention_mask")
    for out in graph.output:
        new = _cache_name(out.name, "present")
        _rename(graph, out.name, new)
        out.name = new
    graph.name = ENCODER
    return graph


def decoder_subgraph(decoder: onnx.GraphProto, vocab: int) -> onnx.GraphProto:
    graph = onnx.GraphProto.FromString(decoder.SerializeToString())
    _int32_input(graph, "input_ids", "input_ids")
    # one token a step: the operator feeds the whole sequence to a decoder whose input_ids has a second axis of any size
    next(t for t in graph.input if t.name == "input_ids").type.tensor_type.shape.dim[1].dim_value = 1
    _int32_input(graph, "encoder_attention_mask", "encoder_attention_mask")
    for inp in graph.input:
        if inp.name.startswith("past_key_values."):
            new = _cache_name(inp.name, "past")
            _rename(graph, inp.name, new)
            inp.name = new
    # the operator takes the self-attention cache of every layer, then the cross-attention one (ours: layer by layer)
    reorder(graph.input, sorted((t.name for t in graph.input),
                                key=lambda n: 2 if "_cross_" in n else 1 if "_self_" in n else 0))
    # the search head is not read: its inputs become constants, its outputs go, and its nodes with them
    fixed: dict[str, np.ndarray] = {LOGITS_MASK: np.zeros(vocab, np.float32), TOP_K_INPUT: np.ones(1, np.int64)}
    for name, value in fixed.items():
        graph.input.remove(next(t for t in graph.input if t.name == name))
        graph.initializer.append(numpy_helper.from_array(value, name))
    for out in [t for t in graph.output if t.name in HEAD_OUTPUTS]:
        graph.output.remove(out)
    for out in graph.output:
        if out.name.startswith("present."):
            new = _cache_name(out.name, "present")
            _rename(graph, out.name, new)
            out.name = new
    prune(graph)
    graph.name = DECODER
    return graph


def _hoist_shared(encoder: onnx.GraphProto, decoder: onnx.GraphProto) -> list[onnx.TensorProto]:
    """The weights both subgraphs read from one place of one file (a shared embedding table), moved to the main
    graph, where both see it: onnxruntime loads it once."""
    def where(t: onnx.TensorProto) -> tuple:
        return t.name, tuple((e.key, e.value) for e in t.external_data)

    in_encoder = {where(t): t for t in encoder.initializer if t.data_location == TensorProto.EXTERNAL}
    hoisted = []
    for init in [t for t in decoder.initializer if where(t) in in_encoder]:
        hoisted.append(onnx.TensorProto.FromString(init.SerializeToString()))
        decoder.initializer.remove(init)
        encoder.initializer.remove(in_encoder[where(init)])
    return hoisted


def search_graph(bundle: Path, manifest: Manifest, strategy: str, early_stopping: bool) -> onnx.ModelProto:
    """The one-graph search over the bundle's encoder and decoder graphs (read, their weights left where they are)."""
    if strategy not in SEARCHES:
        raise ValueError(f"unknown search {strategy!r}; choose one of {', '.join(SEARCHES)}")
    if manifest.cache != "concat":
        raise ValueError(f"{bundle}: its decoder passes its cache in buffers, which onnxruntime's BeamSearch does not "
                         "take; optimize it with --cache concat for a bundle that carries the search in one graph")
    config, spec = manifest.config, get_family(manifest.family).graphs(manifest.config, search=strategy)[SEARCH]
    vocab = int(config["tgt_vocab_size"])
    encoder, decoder = (onnx.load(str(bundle / manifest.graph_files[g]), load_external_data=False)
                        for g in (ENCODER, DECODER))
    enc, dec = encoder_subgraph(encoder.graph), decoder_subgraph(decoder.graph, vocab)
    shared = _hoist_shared(enc, dec)
    declared = {t.name: t for t in spec.inputs}
    ops = ("input_ids", "max_length", "min_length", "num_beams", "num_return_sequences", "length_penalty",
           "repetition_penalty", "vocab_mask", "", "attention_mask")  # the operator's inputs, in its order
    # what the graph does not take as an input is a constant: a greedy graph's one beam, no repetition penalty
    constants = {"num_beams": np.ones(1, np.int32), "num_return_sequences": np.ones(1, np.int32),
                 "length_penalty": np.zeros(1, np.float32), "repetition_penalty": np.ones(1, np.float32)}
    inits = [numpy_helper.from_array(value, name) for name, value in constants.items() if name not in declared]
    node = helper.make_node(
        "BeamSearch", list(ops), [t.name for t in spec.outputs], domain="com.microsoft", name=SEARCH,
        model_type=1, encoder=enc, decoder=dec, vocab_size=vocab, eos_token_id=int(config["eos_id"]),
        pad_token_id=END, decoder_start_token_id=int(config["bos_id"]), no_repeat_ngram_size=0,
        early_stopping=int(early_stopping))
    dtype = {"int32": TensorProto.INT32, "float32": TensorProto.FLOAT}
    graph = helper.make_graph(
        [node], SEARCH, [helper.make_tensor_value_info(t.name, dtype[t.dtype], list(t.shape)) for t in spec.inputs],
        [helper.make_tensor_value_info(t.name, dtype[t.dtype], list(t.shape)) for t in spec.outputs],
        [*shared, *inits])
    opsets = [o for o in decoder.opset_import if o.domain != "com.microsoft"]
    return helper.make_model(graph, opset_imports=[*opsets, helper.make_opsetid("com.microsoft", 1)],
                             ir_version=decoder.ir_version, producer_name="edgeformer")


def attach(folder: Path, manifest: Manifest, strategy: str) -> Manifest:
    """Write the one-graph search into the bundle being built in `folder` (its graphs written) and return its
    manifest, to be saved: the search graph declared, and what it was built with."""
    # greedy is the one-beam search that stops at the first ending; beam stops as the bundle's settings say
    early_stopping = strategy == "greedy" or GenerationConfig.from_dict(manifest.generation).early_stopping
    proto = search_graph(folder, manifest, strategy, early_stopping)
    onnx.save_model(proto, str(folder / SEARCH_FILE))
    onnx.checker.check_model(str(folder / SEARCH_FILE))
    graphs = get_family(manifest.family).graphs(manifest.config, cache=manifest.cache, search=strategy)
    return dataclasses.replace(manifest, graphs=graphs, graph_files={**manifest.graph_files, SEARCH: SEARCH_FILE},
                               search={"strategy": strategy, "early_stopping": early_stopping})


def settings(rt: Runtime, strategy: str) -> list[GenerationConfig]:  # rt: a bundle with a search graph
    """What the check runs: the bundle's defaults, greedy; for a beam graph also beam 4 with a length penalty, and
    min and max lengths that bind. The operator has no rule that forces EOS as the last token (Marian's
    forced_eos_token_id): both searches run without it."""
    assert rt.manifest.search is not None
    base = dataclasses.replace(rt.generation, forced_eos=False, ignore_eos=False, num_return_sequences=1,
                               early_stopping=rt.manifest.search["early_stopping"])
    longest = min(base.max_new_tokens, rt.manifest.max_positions or base.max_new_tokens)
    short = min(longest, 8)  # a max_new_tokens that cuts most sequences short
    cases = []
    if rt.manifest.search["early_stopping"]:  # greedy runs as one beam that stops at its first ending
        cases += [dataclasses.replace(base, strategy="greedy", max_new_tokens=longest),
                  dataclasses.replace(base, strategy="greedy", max_new_tokens=short, min_new_tokens=min(3, short))]
    if strategy == "beam":
        cases += [dataclasses.replace(base, strategy="beam", num_beams=4, length_penalty=0.6, max_new_tokens=longest),
                  dataclasses.replace(base, strategy="beam", num_beams=4, num_return_sequences=2, length_penalty=1.0,
                                      max_new_tokens=short, min_new_tokens=min(2, short))]
    return cases


def check(folder: Path, sources: list[list[int]], log: Any = None) -> dict[str, Any]:
    """The one-graph search against the runtime's own on `sources`, every setting of `settings`: ParityError unless
    every token is the same or a near tie (transforms/compare.py); else the figures for the manifest."""
    rt = Runtime(folder, threads=2, verify=False)  # written just now, by us
    assert rt.manifest.search is not None
    strategy = rt.manifest.search["strategy"]
    cases, worst, compared, ties = settings(rt, strategy), 0.0, 0, 0
    alone, bound = plan(folder, rt.manifest)  # alone: the operator keeps the rows of inputs that ended; we drop them
    for gen in cases:
        for i, chunk in batches(sources, alone):
            ours = rt.generate(chunk, gen, search="python", operator_rules=True)
            graph = rt.generate(chunk, gen, search="graph")
            for j, (a, b) in enumerate(zip(ours, graph, strict=True)):
                for x, y in zip(a, b, strict=True):
                    if x.tokens == y.tokens:
                        worst = max(worst, abs(x.score - y.score))
                    elif near_tie(rt, chunk[j], gen, x, y, bound):
                        ties += 1
                    else:
                        raise ParityError(
                            f"the one-graph {strategy} search gives other tokens than the runtime's search on input "
                            f"{i + j} ({gen.strategy}, {gen.num_beams if gen.strategy == 'beam' else 1} beams, "
                            f"max_new_tokens {gen.max_new_tokens}): {y.tokens} against {x.tokens}, which the runtime "
                            f"scores more than {bound} nats a token apart. Nothing was written")
                compared += len(a)
        if log:
            log(f"search: {gen.strategy} x{gen.num_beams if gen.strategy == 'beam' else 1}, max_new_tokens "
                f"{gen.max_new_tokens}: tokens identical on {len(sources)} inputs"
                + (f", but for {ties} near ties so far" if ties else ""))
    return {"strategy": strategy, "inputs": len(sources), "settings": len(cases), "hypotheses": compared,
            "max_abs_score_diff": worst, **figures(alone, bound, ties)}


def with_search(folder: Path, manifest: Manifest, strategy: str, sources: list[list[int]],
                log: Any = None) -> Manifest:
    """Give the bundle being built in `folder` (its manifest saved) the one-graph search, checked against the
    runtime's own search on `sources` (ParityError, and nothing written, where a token differs); its manifest
    saved again, and returned."""
    (log or (lambda _msg: None))(f"search: building the one-graph {strategy} search")
    with_graph = attach(folder, manifest, strategy)
    with_graph.save(folder)
    figures = check(folder, sources, log)
    with_graph.search = {**(with_graph.search or {}), "check": figures}
    with_graph.write(folder)  # the files are those the save listed and hashed
    return with_graph
