"""A bundle in Hugging Face Optimum's seq2seq layout: `--layout optimum` on export, optimize and quantize.

`ORTModelForSeq2SeqLM.from_pretrained(folder)` loads it with its defaults: `encoder_model.onnx` (`input_ids`,
`attention_mask` -> `last_hidden_state`) and `decoder_model_merged.onnx`, each with its weights in
`<graph>.onnx_data`, beside a `config.json` (Marian's keys: Optimum reads sizes and special tokens from it) and a
`generation_config.json` (the bundle's generation defaults).

The bundle's two graphs are cut again, not exported again, so every variant keeps what its transforms made. Our
encoder ends in the cross-attention projections of every decoder layer; Optimum's ends at the hidden states and
its decoder projects them on the first step. So the encoder is cut at the one tensor that all its cross-attention
outputs are computed from (the hidden states) and the projections move into the decoder, under an If on
`use_cache_branch`: the first step computes them from `encoder_hidden_states`, later steps pass their past through.
The decoder loses its search head (Optimum reads the logits) and takes its past layer by layer (self key, self
value, cross key, cross value), the order Optimum feeds it in.

Before the folder is written, the runtime's tokens on it are checked against the bundle's, greedy and beam. The two
layouts compute some values in other graphs and other shapes (the cross-attention keys and values, per input or per
beam) and load with other fusions: their numbers part in the last bits, so where the bundle itself finds two
choices as good, either may be taken (a near tie, counted); any other difference
refuses the folder (transforms/compare.py).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper

from edgeformer.export.graph_store import reorder
from edgeformer.export.parity import ParityError
from edgeformer.runtime.bundle import as_new_file, atomic_folder, sha256_file
from edgeformer.runtime.encoder_decoder import DECODER, ENCODER, HEAD_INPUTS, HEAD_OUTPUTS
from edgeformer.runtime.optimum import (
    BRANCH,
    CONFIG_FILE,
    ENCODER_FILE,
    GENERATION_FILE,
    HIDDEN,
    MERGED_FILE,
    OURS,
)
from edgeformer.runtime.options import GenerationConfig
from edgeformer.runtime.session import Runtime
from edgeformer.runtime.tokenizer import MarianTokenizer
from edgeformer.transforms.compare import batches, figures, near_tie, plan
from edgeformer.transforms.graph_edits import prune

PASSING = ("Cast", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
CROSS = "cross/"  # the prefix of the moved projections' values in the decoder
SOURCE_INPUTS = ("input_ids", "attention_mask")  # the encoder's; both (batch, src_len), as the decoder's source mask


def _producers(graph: onnx.GraphProto) -> dict[str, int]:
    return {out: i for i, node in enumerate(graph.node) for out in node.output if out}


def _projections(graph: onnx.GraphProto, outputs: list[str], cut: str) -> list[int] | None:
    """The nodes that compute `outputs` from the tensor `cut` (and constants, and the shapes of the graph's inputs),
    in graph order; None if they need anything else of the inputs."""
    produced = _producers(graph)
    inputs = {i.name for i in graph.input}
    needed: set[int] = set()
    todo = list(outputs)
    while todo:
        name = todo.pop()
        if name == cut or not name:
            continue
        if name in inputs:
            return None
        i = produced.get(name)
        if i is None or i in needed:  # an initializer, or already taken
            continue
        node = graph.node[i]
        needed.add(i)
        if node.op_type == "Shape" and node.input[0] in inputs:  # a source's shape is the source mask's
            continue
        todo.extend(node.input)
    return sorted(needed)


def split_encoder(graph: onnx.GraphProto) -> tuple[str, list[int]]:
    """The encoder's hidden states (the latest tensor that every cross-attention output is computed from alone)
    and the nodes that project them. ValueError where there is no such tensor."""
    outputs = [o.name for o in graph.output]
    produced = _producers(graph)
    order = sorted((i, name) for name, i in produced.items())
    for i, name in reversed(order):
        # a cast or a (de)quantization of the hidden states belongs with the projections that read it: cut before
        if name in outputs or graph.node[i].op_type in PASSING:
            continue
        nodes = _projections(graph, outputs, name)
        if nodes:
            return name, nodes
    raise ValueError("the encoder's cross-attention outputs are not computed from one tensor of hidden states")


def _float(name: str, shape: list[Any] | None = None, elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def optimum_graphs(encoder: onnx.ModelProto, decoder: onnx.ModelProto, layers: int, d_model: int
                   ) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Our two graphs (weights loaded) cut again into Optimum's encoder and merged decoder."""
    g = encoder.graph
    hidden, moved = split_encoder(g)
    # the hidden states' type as the graph computes them (float32, or float16 in an fp16 variant)
    inferred = onnx.shape_inference.infer_shapes(encoder, data_prop=False).graph
    hidden_type = next((v.type.tensor_type.elem_type for v in inferred.value_info if v.name == hidden),
                       TensorProto.FLOAT)
    cache_type = g.output[0].type
    cross_outputs = [o.name for o in g.output]  # present.{i}.encoder.key|value
    initializers = {t.name: t for t in g.initializer}
    needed = {n for i in moved for n in g.node[i].input}
    renamed = {hidden: "encoder_hidden_states", **dict.fromkeys(SOURCE_INPUTS, "encoder_attention_mask")}
    for i in moved:
        for name in g.node[i].output:
            renamed.setdefault(name, CROSS + name)
    carried = [t for name, t in initializers.items() if name in needed]
    for t in carried:
        renamed[t.name] = CROSS + t.name
    projection_nodes = []
    for i in moved:
        node = onnx.NodeProto()
        node.CopyFrom(g.node[i])
        node.name = CROSS + (node.name or f"node{i}")
        for names in (node.input, node.output):
            for j, name in enumerate(names):
                names[j] = renamed.get(name, name)
        projection_nodes.append(node)

    # the encoder: its hidden states out, the projections gone
    g.node.append(helper.make_node("Identity", [hidden], [HIDDEN], name="last_hidden_state"))
    del g.output[:]
    g.output.append(_float(HIDDEN, ["batch", "src_len", d_model], hidden_type))
    prune(g)

    # the decoder: the projections under an If, the search head gone, the past layer by layer
    d = decoder.graph
    inputs = {i.name: i for i in d.input}
    if any(name not in inputs for name in ("input_ids", "encoder_attention_mask")) or "past_length" in inputs:
        raise ValueError("the decoder is not one of the two-graph form with a concatenated cache")
    past_cross = [name.replace("present.", "past_key_values.", 1) for name in cross_outputs]
    elem = cache_type.tensor_type.elem_type
    then_branch = helper.make_graph(
        [helper.make_node("Identity", [p], [f"past/{p}"]) for p in past_cross], "past_cross", [],
        [_float(f"past/{p}", None, elem) for p in past_cross])
    else_branch = helper.make_graph(projection_nodes, "cross_projections", [],
                                    [_float(CROSS + o, None, elem) for o in cross_outputs])
    for node in d.node:  # the decoder reads the If's outputs where it read the cross-attention cache
        for j, name in enumerate(node.input):
            if name in past_cross:
                node.input[j] = name.replace("past_key_values.", "present.", 1)
    d.node.insert(0, helper.make_node("If", [BRANCH], cross_outputs, name="cross_attention_cache",
                                      then_branch=then_branch, else_branch=else_branch))
    d.initializer.extend(_renamed(t, renamed[t.name]) for t in carried)
    # Optimum's contract: its inputs and outputs, in its order (it feeds the past by position); the search head goes
    mask_shape = inputs["encoder_attention_mask"].type.tensor_type.shape.dim
    batch, src_len = (dim.dim_param or dim.dim_value for dim in mask_shape)
    d.input.extend([_float("encoder_hidden_states", [batch, src_len, d_model], hidden_type),
                    _float(BRANCH, [1], TensorProto.BOOL)])
    d.output.extend(helper.make_value_info(name, cache_type) for name in cross_outputs)
    for values in (d.input, d.output):
        kept = [v for v in values if v.name not in (*HEAD_INPUTS, *HEAD_OUTPUTS)]
        del values[:]
        values.extend(kept)
    per_layer = [name for i in range(layers) for name in (f"decoder.{i}.key", f"decoder.{i}.value",
                                                          f"encoder.{i}.key", f"encoder.{i}.value")]
    reorder(d.input, ["encoder_attention_mask", "input_ids", "encoder_hidden_states",
                      *(_cache_name("past_key_values", n) for n in per_layer), BRANCH])
    reorder(d.output, ["logits", *(_cache_name("present", n) for n in per_layer)])
    prune(d)
    domains = {o.domain: o.version for o in decoder.opset_import}
    for o in encoder.opset_import:
        if o.domain not in domains:
            decoder.opset_import.append(o)
    return encoder, decoder


def _cache_name(prefix: str, name: str) -> str:
    """("present", "encoder.3.key") -> "present.3.encoder.key"."""
    attention, layer, kind = name.split(".")
    return f"{prefix}.{layer}.{attention}.{kind}"


def _renamed(t: TensorProto, name: str) -> TensorProto:
    copy = TensorProto()
    copy.CopyFrom(t)
    copy.name = name
    return copy


def hugging_face_config(config: dict[str, Any], variant: str) -> dict[str, Any]:
    """config.json for Optimum: Marian's keys, whose model has our structure's sizes and special tokens (Optimum
    runs the graphs, never a PyTorch model of this config)."""
    return {"model_type": "marian", "architectures": ["MarianMTModel"], "is_encoder_decoder": True,
            # Hugging Face's beam search sizes the scores by vocab_size: the target's (the source's is ours below)
            "vocab_size": config["tgt_vocab_size"], "decoder_vocab_size": config["tgt_vocab_size"],
            "d_model": config["d_model"], "encoder_layers": config["n_encoder_layers"],
            "decoder_layers": config["n_decoder_layers"], "encoder_attention_heads": config["n_heads"],
            "decoder_attention_heads": config["n_heads"], "encoder_ffn_dim": config["d_ff"],
            "decoder_ffn_dim": config["d_ff"], "activation_function": config.get("activation", "relu"),
            "max_position_embeddings": config.get("max_positions", 1024),
            "scale_embedding": config.get("scale_embeddings", True),
            "share_encoder_decoder_embeddings": config.get("share_embeddings", False),
            "pad_token_id": config["pad_id"], "eos_token_id": config["eos_id"],
            "decoder_start_token_id": config["bos_id"], "forced_eos_token_id": None, "use_cache": True,
            OURS: {"layout": "optimum", "variant": variant, "config": config}}


def hugging_face_generation(gen: GenerationConfig, config: dict[str, Any]) -> dict[str, Any]:
    """generation_config.json: the bundle's defaults in Hugging Face's terms (runtime/hf_generation.py reads them
    back)."""
    settings: dict[str, Any] = {
        "decoder_start_token_id": config["bos_id"], "eos_token_id": config["eos_id"], "pad_token_id": config["pad_id"],
        "max_length": gen.max_new_tokens + 1, "num_beams": gen.num_beams if gen.strategy == "beam" else 1,
        "length_penalty": gen.length_penalty, "early_stopping": gen.early_stopping,
        "num_return_sequences": gen.num_return_sequences, "do_sample": gen.strategy == "sample"}
    if gen.min_new_tokens:
        settings["min_length"] = gen.min_new_tokens + 1
    if gen.suppress_tokens:
        settings["bad_words_ids"] = [[t] for t in gen.suppress_tokens]
    if gen.forced_eos:
        settings["forced_eos_token_id"] = config["eos_id"]
    if gen.strategy == "sample":
        settings.update(temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p)
    return settings


def check(ours: Runtime, folder: Path, sources: list[list[int]]) -> dict[str, Any]:
    """The runtime's tokens on the new folder against the bundle's: ParityError unless each is the same or a near
    tie (`near_tie`)."""
    theirs = Runtime(folder, threads=2, verify=False)  # written just now, by us
    base = dataclasses.replace(ours.generation, num_return_sequences=1)
    cases = {"greedy": dataclasses.replace(base, strategy="greedy"),
             "beam 4": dataclasses.replace(base, strategy="beam", num_beams=4)}
    # int8 with scales of the whole batch: the layouts compute the cross-attention keys and values over other rows
    # (our encoder over the inputs, Optimum's first step over every beam), so like with like is one input at a time
    alone, bound = plan(ours.path, ours.manifest)
    ties = 0
    for label, gen in cases.items():
        for i, batch in batches(sources, alone):
            for j, (a, b) in enumerate(zip(ours.generate(batch, gen), theirs.generate(batch, gen), strict=True)):
                if a[0].tokens == b[0].tokens:
                    continue
                if not near_tie(ours, batch[j], gen, a[0], b[0], bound):
                    raise ParityError(f"optimum layout: {label}, input {i + j}: {b[0].tokens} in the new layout, "
                                      f"{a[0].tokens} in the bundle, which scores them more than {bound} nats a "
                                      "token apart; nothing was written")
                ties += 1
    return {"inputs": len(sources), "settings": list(cases), **figures(alone, bound, ties)}


def write_optimum(bundle: Path, out: Path, sources: list[list[int]], force: bool = False,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The bundle at `bundle` in Optimum's layout at `out`, checked before it appears there."""
    with atomic_folder(out, force=force) as tmp:
        return write_into(bundle, tmp, sources, log)


def write_into(bundle: Path, tmp: Path, sources: list[list[int]], log: Callable[[str], None] | None = None
               ) -> dict[str, Any]:
    """The bundle in Optimum's layout in the empty folder `tmp` (one that `atomic_folder` gave), checked; the
    check's figures."""
    say = log or (lambda _msg: None)
    rt = Runtime(bundle, threads=2, search="python")
    manifest = rt.manifest
    if manifest.cache != "concat":
        raise ValueError("a bundle whose cache is in buffers (optimize --cache buffer) has no Optimum layout: "
                         "make it with --cache concat")
    config = manifest.config
    say("optimum layout: cutting the graphs again")
    encoder = onnx.load(str(bundle / manifest.graph_files[ENCODER]))
    decoder = onnx.load(str(bundle / manifest.graph_files[DECODER]))
    encoder, decoder = optimum_graphs(encoder, decoder, int(config["n_decoder_layers"]), int(config["d_model"]))
    for proto, name in ((encoder, ENCODER_FILE), (decoder, MERGED_FILE)):
        onnx.save_model(proto, str(tmp / name), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{name}_data")
        as_new_file(tmp / f"{name}_data")
    (tmp / GENERATION_FILE).write_text(json.dumps(hugging_face_generation(rt.generation, config), indent=2))
    if isinstance(rt.tokenizer, MarianTokenizer):  # the files Hugging Face's MarianTokenizer reads
        rt.tokenizer.save(tmp)
        (tmp / "tokenizer.json").unlink()
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "MarianTokenizer", "separate_vocabs": rt.tokenizer.decode_with == "target",
            "eos_token": rt.tokenizer.eos, "unk_token": rt.tokenizer.unk, "pad_token": rt.tokenizer.pad},
            indent=2))
    hf = hugging_face_config(config, manifest.variant)
    if rt.tokenizer is not None:  # ours, described in config.json (tokenizer.json is Hugging Face's name)
        hf[OURS]["tokenizer"] = rt.tokenizer.to_dict()
    hf[OURS]["files"] = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / CONFIG_FILE).write_text(json.dumps(hf, indent=2))
    say(f"optimum layout: checking its tokens against the bundle's on {len(sources)} inputs")
    report = check(rt, tmp, sources)
    hf[OURS]["check"] = report
    (tmp / CONFIG_FILE).write_text(json.dumps(hf, indent=2))
    return report

