"""The encoder-decoder family on the PyTorch side: its graphs as modules, example inputs to trace them with, and
the parity check that runs before a bundle of it is written. The graphs' names, inputs, outputs and axes are the
family's declaration (runtime/encoder_decoder.py); this module only computes them.

Parity: each case encodes a batch of random sources of mixed lengths in both systems, compares the cross-attention
caches, then decodes step by step with the KV cache, comparing the logits at every step; both systems are fed
PyTorch's greedy tokens, so a step's argmax agreeing in both means greedy decoding gives the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from edgeformer.export.evaluation import eval_set
from edgeformer.export.parity import TOLERANCES, ParityError, Tolerance, check_close
from edgeformer.model.checkpoint import load_checkpoint
from edgeformer.model.generate import generate, pad_batch
from edgeformer.model.transformer import Transformer
from edgeformer.runtime.encoder_decoder import (
    DECODER,
    ENCODER,
    HEAD_INPUTS,
    HEAD_OUTPUTS,
    LOGITS_MASK,
    SEARCH_HEAD,
    TOP_IDS,
    TOP_K_INPUT,
    TOP_LOG_PROBS,
    is_self_cache,
    past_for,
)
from edgeformer.runtime.options import GenerationConfig
from edgeformer.runtime.session import Runtime
from edgeformer.runtime.spec import GraphSpec

# Trace with sizes of at least 2 and a non-empty past: torch.export specializes sizes 0 and 1 into constants. The
# decoder's rows are EXAMPLE_GROUP per source, so that its two batch axes are traced as the two sizes they are.
EXAMPLE_BATCH, EXAMPLE_GROUP, EXAMPLE_SRC, EXAMPLE_TGT, EXAMPLE_PAST = 2, 2, 5, 3, 4
# (source lengths of one batch, decoding steps, rows per source): batch 1 with a one-token source, a padded mixed
# batch, then sources whose rows (as beams) share their cross-attention cache, each fed a different token.
PARITY_CASES: tuple[tuple[tuple[int, ...], int, int], ...] = (
    ((1,), 6, 1), ((7, 2, 5), 8, 1), ((16, 16), 6, 1), ((9, 3), 6, 3))


class EncoderGraph(nn.Module):
    """input_ids, attention_mask -> the cross-attention (key, value) of every decoder layer."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.encoder, self.decoder = model.encoder, model.decoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        memory = self.encoder(input_ids, attention_mask)  # (B, S, D)
        return tuple(t for kv in self.decoder.cross_kv(memory) for t in kv)  # each (B, H, S, Dh)


class DecoderGraph(nn.Module):
    """One decoding step (or a whole prefix): logits and the grown self-attention cache. Its inputs are the
    declared ones, in order: tokens, source mask, then layer by layer the self-attention and cross-attention caches
    (key, value each); the tokens and self-attention cache have rows, a whole number per source of the mask and
    cross-attention cache."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.decoder = model.decoder
        self.layers = model.config.n_decoder_layers

    def forward(self, input_ids: Tensor, encoder_attention_mask: Tensor, *caches: Tensor) -> tuple[Tensor, ...]:
        past = [(caches[4 * i], caches[4 * i + 1]) for i in range(self.layers)]  # [(key, value)] per layer
        cross = [(caches[4 * i + 2], caches[4 * i + 3]) for i in range(self.layers)]
        logits, present = self.decoder(input_ids, encoder_attention_mask, cross, past)
        return (logits, *[t for kv in present for t in kv])


def traced(spec: GraphSpec) -> GraphSpec:
    """What torch.export traces of a graph: all of it but the decoder's search head, which `complete` appends."""
    return GraphSpec(spec.name, tuple(t for t in spec.inputs if t.name not in HEAD_INPUTS),
                     tuple(t for t in spec.outputs if t.name not in HEAD_OUTPUTS))


def complete(name: str, proto: onnx.ModelProto) -> None:
    """Append to a traced graph what the tracer does not make: the decoder's search head, logits -> LogSoftmax ->
    + logits_mask -> TopK(top_k) -> the last position, in ONNX operators (onnxruntime's TopK runs on every
    provider). The last position is taken of the k values, not of the logits, which a step would copy whole for
    its one position (README: Export)."""
    if name != DECODER:
        return
    h = onnx.helper
    graph = proto.graph
    last = onnx.numpy_helper.from_array(np.array(-1, np.int64), "search_head.last")
    graph.initializer.append(last)

    def node(label: str, op: str, inputs: list[str], outputs: list[str], **attributes: Any) -> onnx.NodeProto:
        return h.make_node(op, inputs, outputs, name=SEARCH_HEAD + label, **attributes)

    graph.node.extend([  # (rows, tgt_len, V) until TopK, (rows, tgt_len, k) after
        node("LogSoftmax", "LogSoftmax", ["logits"], ["search_head.log_probs"], axis=-1),
        node("Add", "Add", ["search_head.log_probs", LOGITS_MASK], ["search_head.masked"]),
        node("TopK", "TopK", ["search_head.masked", TOP_K_INPUT], ["search_head.top", "search_head.ids"], axis=-1,
             largest=1, sorted=1),
        node("LastLogProbs", "Gather", ["search_head.top", last.name], [TOP_LOG_PROBS], axis=1),  # (rows, k)
        node("LastIds", "Gather", ["search_head.ids", last.name], [TOP_IDS], axis=1),
    ])
    vocab = graph.output[0].type.tensor_type.shape.dim[2]
    graph.input.extend([h.make_tensor_value_info(LOGITS_MASK, onnx.TensorProto.FLOAT, [vocab.dim_value]),
                        h.make_tensor_value_info(TOP_K_INPUT, onnx.TensorProto.INT64, [1])])
    batch = graph.output[0].type.tensor_type.shape.dim[0].dim_param
    graph.output.extend([h.make_tensor_value_info(TOP_LOG_PROBS, onnx.TensorProto.FLOAT, [batch, "k"]),
                         h.make_tensor_value_info(TOP_IDS, onnx.TensorProto.INT64, [batch, "k"])])


def graph_modules(model: Transformer) -> dict[str, nn.Module]:
    return {ENCODER: EncoderGraph(model), DECODER: DecoderGraph(model)}


def example_inputs(model: Transformer) -> dict[str, tuple[Tensor, ...]]:
    c = model.config
    g = torch.Generator().manual_seed(0)
    b, s, t, p = EXAMPLE_BATCH, EXAMPLE_SRC, EXAMPLE_TGT, EXAMPLE_PAST
    rows = b * EXAMPLE_GROUP
    src = torch.randint(3, c.src_vocab_size, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    past = [torch.randn(rows, c.n_heads, p, c.head_dim, generator=g) for _ in range(2 * c.n_decoder_layers)]
    cross = [torch.randn(b, c.n_heads, s, c.head_dim, generator=g) for _ in range(2 * c.n_decoder_layers)]
    tgt = torch.randint(3, c.tgt_vocab_size, (rows, t), generator=g)
    layers = [t for i in range(c.n_decoder_layers) for t in (*past[2 * i: 2 * i + 2], *cross[2 * i: 2 * i + 2])]
    return {ENCODER: (src, mask), DECODER: (tgt, mask, *layers)}


@torch.no_grad()
def compare_case(model: Transformer, sessions: dict[str, ort.InferenceSession], specs: dict[str, GraphSpec],
                 src: Sequence[Sequence[int]], steps: int, tolerance: Tolerance, group: int = 1) -> dict[str, float]:
    """One batch through both systems, `group` decoder rows per source; raises ParityError on the first output
    out of tolerance. PyTorch's decoder reads the cross-attention cache copied to every row, ONNX's once per
    source; row g of each source is fed its g-th best token, so a source's rows differ."""
    cfg = model.config
    where = f"batch of {len(src)} with source lengths {[len(s) for s in src]}, {group} rows each"
    ids, mask = pad_batch([list(s) for s in src], cfg.pad_id)
    cross = model.decoder.cross_kv(model.encoder(ids, mask))
    enc_out = dict(zip(specs[ENCODER].output_names, sessions[ENCODER].run(
        None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}), strict=True))
    torch_cross = [t.numpy() for kv in cross for t in kv]
    enc_diff = 0.0
    for (name, got), want in zip(enc_out.items(), torch_cross, strict=True):
        enc_diff = max(enc_diff, check_close(got, want, tolerance, f"encoder graph, output {name}, {where}"))

    k = min(4, cfg.tgt_vocab_size)
    feed: dict[str, np.ndarray] = {"encoder_attention_mask": mask.numpy(), TOP_K_INPUT: np.array([k], np.int64),
                                   LOGITS_MASK: np.zeros(cfg.tgt_vocab_size, np.float32)}
    feed.update({past_for(name): value for name, value in enc_out.items()})
    rows = len(src) * group
    row_mask, row_cross = mask.repeat_interleave(group, 0), [(k.repeat_interleave(group, 0),
                                                               v.repeat_interleave(group, 0)) for k, v in cross]
    past = model.decoder.empty_past(rows)
    for t in specs[DECODER].inputs:
        if is_self_cache(t.name):
            feed[t.name] = np.zeros((rows, cfg.n_heads, 0, cfg.head_dim), np.float32)
    tokens = torch.full((rows, 1), cfg.bos_id, dtype=torch.long)
    rank = torch.arange(rows) % group  # row g of a source takes its g-th best token
    dec_diff, agree = 0.0, 0
    for step in range(steps):
        logits, past = model.decoder(tokens, row_mask, row_cross, past)
        feed["input_ids"] = tokens.numpy()
        outputs = dict(zip(specs[DECODER].output_names, sessions[DECODER].run(None, feed), strict=True))
        want = logits.numpy()
        dec_diff = max(dec_diff, check_close(outputs["logits"], want, tolerance,
                                             f"decoder graph, output logits, step {step}, {where}"))
        agree += int((outputs["logits"][:, -1].argmax(-1) == want[:, -1].argmax(-1)).sum())
        best = torch.from_numpy(want[:, -1]).log_softmax(-1).topk(k)  # the search head, against PyTorch's
        check_close(outputs[TOP_LOG_PROBS], best.values.numpy(), tolerance,
                    f"decoder graph, output {TOP_LOG_PROBS}, step {step}, {where}")
        if not np.array_equal(outputs[TOP_IDS][:, 0], best.indices[:, 0].numpy()):
            raise ParityError(f"decoder graph, output {TOP_IDS}, step {step}, {where}: the best token differs from "
                              "PyTorch's")
        for name, value in outputs.items():
            if name.startswith("present."):
                feed[past_for(name)] = value
        tokens = logits[:, -1].topk(group).indices[torch.arange(rows), rank][:, None]
    return {ENCODER: enc_diff, DECODER: dec_diff, "agree": agree, "tokens": steps * rows}


def check_parity(model: Transformer, sessions: dict[str, ort.InferenceSession], specs: dict[str, GraphSpec],
                 tolerance: Tolerance) -> dict:
    """Every parity case; the figures that go into the manifest."""
    rng = np.random.default_rng(0)
    worst = {ENCODER: 0.0, DECODER: 0.0}
    agree = tokens = 0
    for lengths, steps, group in PARITY_CASES:
        src = [rng.integers(4, model.config.src_vocab_size, n).tolist() for n in lengths]
        r = compare_case(model, sessions, specs, src, steps, tolerance, min(group, model.config.tgt_vocab_size))
        worst = {g: max(worst[g], r[g]) for g in worst}
        agree += int(r["agree"])
        tokens += int(r["tokens"])
    if agree != tokens:
        raise ParityError(f"decoder graph: greedy tokens differ from PyTorch's at {tokens - agree} of {tokens} steps")
    return {"max_abs_diff": worst, "greedy_token_agreement": agree / tokens, "tokens_compared": tokens,
            "cases": [{"source_lengths": list(lengths), "steps": steps, "rows_per_source": group}
                      for lengths, steps, group in PARITY_CASES]}


def runtime_parity(bundle: Path, checkpoint: Path | str | None = None, n: int = 200, eval: Path | str | None = None,
                   threads: int | None = None) -> dict[str, float | str | int]:
    """The bundle run by the runtime against the PyTorch checkpoint: greedy and beam outputs, the task metric
    and per-step logits, on n inputs (export/evaluation.py: `eval`, else the bundle's task, else random ones)."""
    model, _ = load_checkpoint(checkpoint)
    rt = Runtime(bundle, threads=threads)
    inputs = eval_set(rt.config, rt.tokenizer, rt.manifest.task, eval, n)
    src = inputs.sources
    report: dict[str, float | str | int] = {"inputs": len(src), "judged on": inputs.judged_on["inputs"],
                                            "provider": rt.provider}
    for name, gen in (("greedy", GenerationConfig(max_new_tokens=16)),
                      ("beam-4", GenerationConfig(strategy="beam", num_beams=4, max_new_tokens=16))):
        ours, ref = rt.generate(src, gen), generate(model, src, gen)
        report[f"{name} identical to PyTorch"] = sum(
            a[0].tokens == b[0].tokens for a, b in zip(ours, ref, strict=True)) / len(src)
        if name == "greedy" and inputs.metric is not None:
            metric = inputs.metric.replace("_", " ")
            report[f"{metric} (runtime, points)"] = inputs.score(ours, rt.tokenizer)
            report[f"{metric} (PyTorch, points)"] = inputs.score(ref, rt.tokenizer)
    worst = 0.0
    for i in range(0, min(len(src), 64), 16):  # per-step logits on padded batches of 16
        r = compare_case(model, rt.sessions, rt.manifest.graphs, src[i: i + 16], 12, TOLERANCES["fp32"])
        worst = max(worst, r[DECODER])
    report["max |logit diff| per step"] = worst
    return report
