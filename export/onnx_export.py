"""Checkpoint -> bundle: `edgeformer export CHECKPOINT OUT`.

Exporter: torch.onnx with dynamo (torch.export), the path PyTorch maintains and defaults to since 2.9; the
TorchScript exporter is deprecated. Opset 18, which onnxruntime supports from 1.14 on.
Graphs (see runtime/spec.py): the encoder emits the cross-attention keys and values of every decoder layer, once
per source; one decoder graph serves every step with a self-attention cache that starts empty.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from onnx.external_data_helper import set_external_data
from torch import Tensor, nn
from torch.export import Dim

from edgeformer.export.parity import check_bundle
from edgeformer.model.checkpoint import atomic_folder, load_checkpoint, load_generation
from edgeformer.model.transformer import Transformer
from edgeformer.runtime.bundle import Manifest
from edgeformer.runtime.spec import (
    BATCH,
    DECODER,
    ENCODER,
    PAST_LEN,
    SRC_LEN,
    TGT_LEN,
    GraphSpec,
    decoder_spec,
    encoder_spec,
)
from edgeformer.runtime.tokenizer import TOKENIZER_FILE

OPSET = 18
EXPORTER = "torch.onnx.export(dynamo=True)"
GRAPH_FILES = {ENCODER: "encoder.onnx", DECODER: "decoder.onnx"}
SHARED_WEIGHTS = "shared.weights"  # weights that both graphs use, stored once
# Trace with sizes of at least 2 and a non-empty past: torch.export specializes sizes 0 and 1 into constants.
EXAMPLE_BATCH, EXAMPLE_SRC, EXAMPLE_TGT, EXAMPLE_PAST = 2, 5, 3, 4
EXTERNAL_DATA_BYTES = 2 << 30  # protobuf's limit; larger graphs keep their weights beside them


class EncoderGraph(nn.Module):
    """input_ids, attention_mask -> the cross-attention (key, value) of every decoder layer."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.encoder, self.decoder = model.encoder, model.decoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        memory = self.encoder(input_ids, attention_mask)  # (B, S, D)
        return tuple(t for kv in self.decoder.cross_kv(memory) for t in kv)  # each (B, H, S, Dh)


class DecoderGraph(nn.Module):
    """One decoding step (or a whole prefix): logits and the grown self-attention cache."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.decoder = model.decoder

    def forward(self, input_ids: Tensor, encoder_attention_mask: Tensor, past_self: list[Tensor],
                past_cross: list[Tensor]) -> tuple[Tensor, ...]:
        past = list(zip(past_self[0::2], past_self[1::2], strict=True))  # [(key, value)] per layer
        cross = list(zip(past_cross[0::2], past_cross[1::2], strict=True))
        logits, present = self.decoder(input_ids, encoder_attention_mask, cross, past)
        return (logits, *[t for kv in present for t in kv])


def graph_specs(model: Transformer) -> dict[str, GraphSpec]:
    c = model.config
    return {ENCODER: encoder_spec(c.n_decoder_layers, c.n_heads, c.head_dim),
            DECODER: decoder_spec(c.n_decoder_layers, c.n_heads, c.head_dim, c.tgt_vocab_size)}


def _example_inputs(model: Transformer) -> dict[str, tuple]:
    c = model.config
    g = torch.Generator().manual_seed(0)
    b, s, t, p = EXAMPLE_BATCH, EXAMPLE_SRC, EXAMPLE_TGT, EXAMPLE_PAST
    src = torch.randint(3, c.src_vocab_size, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    cache = (b, c.n_heads, -1, c.head_dim)
    past = [torch.randn(*cache[:2], p, cache[3], generator=g) for _ in range(2 * c.n_decoder_layers)]
    cross = [torch.randn(*cache[:2], s, cache[3], generator=g) for _ in range(2 * c.n_decoder_layers)]
    tgt = torch.randint(3, c.tgt_vocab_size, (b, t), generator=g)
    return {ENCODER: (src, mask), DECODER: (tgt, mask, past, cross)}


def _dynamic_shapes(model: Transformer) -> dict[str, dict]:
    dims = {name: Dim(name) for name in (BATCH, SRC_LEN, TGT_LEN, PAST_LEN)}
    self_kv, cross_kv = {0: dims[BATCH], 2: dims[PAST_LEN]}, {0: dims[BATCH], 2: dims[SRC_LEN]}
    n = 2 * model.config.n_decoder_layers
    return {
        ENCODER: {"input_ids": {0: dims[BATCH], 1: dims[SRC_LEN]},
                  "attention_mask": {0: dims[BATCH], 1: dims[SRC_LEN]}},
        DECODER: {"input_ids": {0: dims[BATCH], 1: dims[TGT_LEN]},
                  "encoder_attention_mask": {0: dims[BATCH], 1: dims[SRC_LEN]},
                  "past_self": [self_kv] * n, "past_cross": [cross_kv] * n},
    }


def dedupe_initializers(model: onnx.ModelProto) -> int:
    """Store each weight once: an initializer equal to another, or to another's transpose, is replaced by a
    reference to it (or a Transpose node). The exporter's constant folding turns the output projection tied to
    the embedding into a second, transposed copy; this undoes that. Returns the number of bytes saved."""
    graph = model.graph
    seen: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    transposed: dict[str, str] = {}
    keep = []
    saved = 0
    for init in graph.initializer:
        array = numpy_helper.to_array(init)
        if array.size < 64:  # shape constants and the like are not worth the bookkeeping
            keep.append(init)
            continue
        key = (array.dtype.str, array.shape, array.tobytes())
        if key in seen:
            rename[init.name] = seen[key]
            saved += array.nbytes
            continue
        if array.ndim == 2:
            t_key = (array.dtype.str, array.T.shape, np.ascontiguousarray(array.T).tobytes())
            if t_key in seen:
                transposed[init.name] = seen[t_key]
                saved += array.nbytes
                continue
        seen[key] = init.name
        keep.append(init)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    for name, source in transposed.items():
        graph.node.insert(0, onnx.helper.make_node("Transpose", [source], [name], name=f"/{name}/Transpose",
                                                   perm=[1, 0]))
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    return saved


def strip_debug_info(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node stack traces and doc strings: for a small model they outweigh its weights."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del model.graph.value_info[:]


def export_graph(module: nn.Module, args: tuple, spec: GraphSpec, dynamic_shapes: dict,
                 opset: int = OPSET) -> onnx.ModelProto:
    # torch.onnx warns about every torchvision operator it cannot register; we use none of them.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, input_names=spec.input_names, output_names=spec.output_names,
                                    dynamic_shapes=dynamic_shapes, dynamo=True, opset_version=opset, verbose=False,
                                    report=False)
    assert program is not None
    proto = program.model_proto
    dedupe_initializers(proto)
    strip_debug_info(proto)
    check_names(proto, spec, spec.name)
    return proto


def share_across_graphs(protos: list[onnx.ModelProto], folder: Path) -> list[str]:
    """A weight that two graphs both hold (a source/target embedding shared by encoder and decoder) is written
    once, to SHARED_WEIGHTS, and both graphs refer to it as external data. Returns the names moved."""
    owners: dict[tuple, list[tuple[int, onnx.TensorProto]]] = {}
    for g, proto in enumerate(protos):
        for init in proto.graph.initializer:
            # raw_data as stored: packed 4-bit tensors must stay packed. Typed fields hold small constants only.
            if init.HasField("raw_data") and len(init.raw_data) >= 256:
                owners.setdefault((init.data_type, tuple(init.dims), init.raw_data), []).append((g, init))
    shared = [inits for inits in owners.values() if len({g for g, _ in inits}) > 1]
    if not shared:
        return []
    moved = []
    with open(folder / SHARED_WEIGHTS, "wb") as f:
        for inits in shared:
            data = inits[0][1].raw_data
            offset = f.tell()
            f.write(data)
            f.write(b"\0" * (-len(data) % 64))  # keep every tensor 64-byte aligned for memory mapping
            for _, init in inits:
                set_external_data(init, SHARED_WEIGHTS, offset, len(data))
                init.data_location = onnx.TensorProto.EXTERNAL
                init.ClearField("raw_data")
                moved.append(init.name)
    return moved


def save_graph(proto: onnx.ModelProto, path: Path) -> None:
    large = sum(i.ByteSize() for i in proto.graph.initializer) > EXTERNAL_DATA_BYTES
    onnx.save_model(proto, str(path), save_as_external_data=large, location=f"{path.name}.data")
    onnx.checker.check_model(str(path), full_check=True)


def check_names(proto: onnx.ModelProto, spec: GraphSpec, where: str) -> None:
    """The graph's inputs and outputs are exactly the declared ones, in the declared order."""
    got_in = [i.name for i in proto.graph.input]
    got_out = [o.name for o in proto.graph.output]
    if got_in != spec.input_names or got_out != spec.output_names:
        raise RuntimeError(f"{where}: exported inputs/outputs {got_in} -> {got_out} differ from the declared "
                           f"{spec.input_names} -> {spec.output_names}")


def producer_versions() -> dict[str, str]:
    versions = {}
    for package in ("edgeformer", "torch", "onnx", "onnxruntime", "onnxscript", "numpy"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return versions


@dataclass(frozen=True)
class ExportResult:
    path: Path
    seconds: float
    bundle_bytes: int
    parity: dict


def export(checkpoint: Path | str | None, out: Path | str, force: bool = False, opset: int = OPSET,
           log: Callable[[str], None] | None = None) -> ExportResult:
    """Export a checkpoint folder (the shipped model when None) to a bundle folder at `out`.

    The graphs are checked (onnx.checker, then onnxruntime against PyTorch) before anything appears at `out`;
    a failed check raises ParityError and leaves nothing behind.
    """
    say = log or (lambda _msg: None)
    start = time.perf_counter()
    model, tokenizer = load_checkpoint(checkpoint)
    specs = graph_specs(model)
    examples, dynamic = _example_inputs(model), _dynamic_shapes(model)
    modules = {ENCODER: EncoderGraph(model), DECODER: DecoderGraph(model)}
    with atomic_folder(Path(out), force=force) as tmp:
        protos = {}
        for name, spec in specs.items():
            say(f"exporting the {name} graph")
            protos[name] = export_graph(modules[name], examples[name], spec, dynamic[name], opset)
        share_across_graphs(list(protos.values()), tmp)
        for name, proto in protos.items():
            save_graph(proto, tmp / GRAPH_FILES[name])
        say("checking the graphs against PyTorch")
        parity = check_bundle(model, tmp, specs, GRAPH_FILES)
        if tokenizer is not None:
            tokenizer.save(tmp)
        manifest = Manifest(config=model.config.to_dict(), graphs=specs, graph_files=GRAPH_FILES, variant="fp32",
                            opset=opset, tokenizer=TOKENIZER_FILE if tokenizer is not None else None,
                            producer=producer_versions(), parity=parity, exporter=EXPORTER,
                            generation=load_generation(checkpoint))
        manifest.save(tmp)
        size = manifest.bytes(tmp)
    return ExportResult(Path(out), time.perf_counter() - start, size, parity)
