"""Attention fusion on its own: what it fuses, what it refuses to, and that fused graphs compute what the
unfused ones did (onnxruntime runs both)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from edgeformer.runtime.bundle import Manifest
from edgeformer.runtime.encoder_decoder import is_self_cache
from edgeformer.transforms.fusion import MS_DOMAIN, fuse_attention, remove_dead_nodes
from tests.helpers import search_head_feed, session_of


def feeds(model: onnx.ModelProto, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random inputs for one of our graphs: batch 2, source 5 (the second padded to 3), a past of 4, 1 token."""
    out: dict[str, np.ndarray] = {}
    for i in model.graph.input:
        if i.name in ("attention_mask", "encoder_attention_mask"):
            out[i.name] = np.array([[1] * 5, [1] * 3 + [0] * 2], np.int64)
        elif i.name in ("logits_mask", "top_k"):
            out[i.name] = search_head_feed(model.graph.output[0].type.tensor_type.shape.dim[2].dim_value, 3)[i.name]
        elif i.name == "input_ids":
            out[i.name] = rng.integers(4, 20, (2, 5 if "attention_mask" in [x.name for x in model.graph.input]
                                              else 1))
        else:  # a cache: (B, H, T, Dh)
            dims = [d.dim_value for d in i.type.tensor_type.shape.dim]
            out[i.name] = rng.standard_normal((2, dims[1], 4 if is_self_cache(i.name) else 5, dims[3])
                                              ).astype(np.float32)
    return out


def run(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session_of(model).run(None, inputs)


@pytest.fixture(scope="module")
def graphs(exported) -> tuple[dict[str, onnx.ModelProto], int]:
    _, bundle = exported("post-sinusoidal")
    m = Manifest.load(bundle)
    return {g: onnx.load(str(Path(bundle) / f)) for g, f in m.graph_files.items()}, int(m.config["n_heads"])


def fused_copy(model: onnx.ModelProto, heads: int) -> tuple[onnx.ModelProto, int]:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy, fuse_attention(copy, heads)


@pytest.mark.parametrize(("graph", "blocks"), [("encoder", 2), ("decoder", 4)])
def test_every_attention_block_fuses_and_computes_what_it_did(graphs, graph: str, blocks: int) -> None:
    models, heads = graphs
    fused, count = fused_copy(models[graph], heads)
    assert count == blocks  # encoder: 2 self-attention; decoder: 2 self (with cache) + 2 cross
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("MultiHeadAttention") == blocks and "Softmax" not in ops
    inputs = feeds(models[graph], np.random.default_rng(0))
    for want, got in zip(run(models[graph], inputs), run(fused, inputs), strict=True):
        assert np.abs(want - got).max() < 1e-5


def test_a_softmax_over_another_axis_is_left_alone(graphs) -> None:
    models, heads = graphs
    model = onnx.ModelProto()
    model.CopyFrom(models["encoder"])
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    softmax.attribute[0].i = 2
    _, count = fused_copy(model, heads)
    assert count == 1  # the other layer's block only


def test_a_scale_other_than_the_default_is_carried_into_the_kernel(graphs) -> None:
    models, heads = graphs
    model = onnx.ModelProto()
    model.CopyFrom(models["encoder"])
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    add = next(n for n in model.graph.node if softmax.input[0] in n.output)
    mul = next(n for n in model.graph.node if add.input[0] in n.output)
    model.graph.initializer.append(numpy_helper.from_array(np.array(0.5, np.float32), "custom_scale"))
    mul.input[1] = "custom_scale"
    fused, count = fused_copy(model, heads)
    assert count == 2
    scales = sorted(helper.get_attribute_value(a) for n in fused.graph.node if n.domain == MS_DOMAIN
                    for a in n.attribute if a.name == "scale")
    assert scales[-1] == pytest.approx(0.5) and scales[0] == pytest.approx((32 / heads) ** -0.5)
    inputs = feeds(model, np.random.default_rng(1))
    for want, got in zip(run(model, inputs), run(fused, inputs), strict=True):
        assert np.abs(want - got).max() < 1e-5


def test_heads_split_differently_from_num_heads_are_not_fused(graphs) -> None:
    models, heads = graphs
    for graph in ("encoder", "decoder"):
        _, count = fused_copy(models[graph], heads * 2)
        assert count == 0


def test_dead_nodes_and_the_initializers_only_they_read_are_removed() -> None:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"]), helper.make_node("Mul", ["x", "two"], ["unused"]),
         helper.make_node("Relu", ["unused"], ["also_unused"])], "g", [x], [y],
        [numpy_helper.from_array(np.ones(2, np.float32), name) for name in ("one", "two")])
    model = helper.make_model(graph)
    remove_dead_nodes(model)
    assert [n.op_type for n in model.graph.node] == ["Add"]
    assert [i.name for i in model.graph.initializer] == ["one"]
