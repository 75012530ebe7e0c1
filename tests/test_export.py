"""Export: graphs with dynamic axes, checked against PyTorch, written atomically, each weight stored once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgeformer.export import parity
from edgeformer.export.encoder_decoder import compare_case
from edgeformer.export.onnx_export import export
from edgeformer.export.parity import TOLERANCES, ParityError
from edgeformer.model.checkpoint import CheckpointError, save_checkpoint
from edgeformer.runtime.bundle import FORMAT_VERSION, MANIFEST_FILE, Manifest
from tests.helpers import graph_sessions, search_head_feed, tiny_model

# (batch, source length): batch 1 and 64, sources of 1 and 500 tokens; every case starts from an empty past.
SHAPE_GRID = [(1, 1), (1, 500), (64, 1), (64, 500), (3, 17)]


@pytest.mark.parametrize(("batch", "src_len"), SHAPE_GRID)
def test_one_bundle_serves_every_shape_like_pytorch(exported, batch: int, src_len: int) -> None:
    model, bundle = exported("post-sinusoidal")
    m = Manifest.load(bundle)
    rng = np.random.default_rng(batch * 1000 + src_len)
    lengths = rng.integers(1, src_len + 1, batch)
    lengths[0] = src_len  # at least one at full length; the others padded
    src = [rng.integers(4, 37, n).tolist() for n in lengths]
    sessions = graph_sessions(bundle)
    r = compare_case(model, sessions, m.graphs, src, steps=3, tolerance=TOLERANCES["fp32"])
    assert r["agree"] == r["tokens"]


def test_decoder_takes_a_whole_prefix_in_one_step(exported) -> None:
    model, bundle = exported("pre-learned-gelu")
    m = Manifest.load(bundle)
    sessions = graph_sessions(bundle)
    src = torch.randint(4, 37, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    tgt = torch.randint(4, 29, (2, 5))
    cross = dict(zip(m.graphs["encoder"].output_names, sessions["encoder"].run(None, {"input_ids": src.numpy(),
                                                                     "attention_mask": mask.numpy()}), strict=True))
    feed = {"input_ids": tgt.numpy(), "encoder_attention_mask": mask.numpy(), **search_head_feed(29, 3)}
    for t in m.graphs["decoder"].inputs:
        if t.name.startswith("past_key_values."):
            feed[t.name] = (cross[t.name.replace("past_key_values", "present")] if ".encoder." in t.name
                            else np.zeros((2, 4, 0, 8), np.float32))
    logits, top, ids = sessions["decoder"].run(["logits", "top_log_probs", "top_ids"], feed)
    with torch.no_grad():
        want = model(src, tgt, mask).numpy()
    assert np.abs(logits - want).max() < 1e-4
    # the search head reads the last position only: its 3 best tokens, best first, as log-probabilities
    best = torch.from_numpy(want[:, -1]).log_softmax(-1).topk(3)
    assert np.array_equal(ids, best.indices.numpy()) and np.abs(top - best.values.numpy()).max() < 1e-4


def test_manifest_declares_names_axes_and_parity(exported) -> None:
    _, bundle = exported("post-sinusoidal")
    d = json.loads((bundle / MANIFEST_FILE).read_text())
    assert d["format_version"] == FORMAT_VERSION == 4 and d["variant"] == "fp32" and d["opset"] >= 17
    dec = d["graphs"]["decoder"]
    names = [t["name"] for t in dec["inputs"]]
    assert names[:2] == ["input_ids", "encoder_attention_mask"]
    assert "past_key_values.1.decoder.value" in names and "past_key_values.0.encoder.key" in names
    assert dec["outputs"][1] == {"name": "present.0.decoder.key", "dtype": "float32",
                                 "shape": ["rows", 4, "past_len+tgt_len", 8]}
    cross = next(t for t in dec["inputs"] if t["name"] == "past_key_values.0.encoder.key")
    assert cross["shape"] == ["batch", 4, "src_len", 8]  # once per source, shared by its rows
    assert d["parity"]["max_abs_diff"]["decoder"] <= 1e-4
    assert d["parity"]["greedy_token_agreement"] == 1.0
    # each graph's weights beside it, where onnxruntime memory-maps them
    assert set(d["files"]) == {"encoder.onnx", "encoder.weights", "decoder.onnx", "decoder.weights"}
    assert d["files"]["decoder.onnx"]["bytes"] == (bundle / "decoder.onnx").stat().st_size
    assert {"torch", "onnx", "onnxruntime"} <= set(d["producer"])
    # the graphs carry exactly the declared names, with symbolic batch and length axes
    graph = onnx.load(str(bundle / "decoder.onnx"), load_external_data=False).graph
    assert [i.name for i in graph.input] == names
    dims = [d.dim_param for d in graph.input[2].type.tensor_type.shape.dim]
    assert dims[0] == "rows" and dims[2] == "past_len"
    assert graph.input[1].type.tensor_type.shape.dim[0].dim_param == "batch"


@pytest.mark.parametrize("variant", ["post-sinusoidal", "shared-untied", "shared-tied", "marian-like"])
def test_no_weight_is_stored_twice(exported, variant: str) -> None:
    model, bundle = exported(variant)
    stored: dict[tuple, np.ndarray] = {}  # each stored tensor once: by its place in a weights file, or inline
    for graph in ("encoder.onnx", "decoder.onnx"):
        for init in onnx.load(str(bundle / graph), load_external_data=False).graph.initializer:
            if init.data_location == onnx.TensorProto.EXTERNAL:
                where = {e.key: e.value for e in init.external_data}
                data = (bundle / where["location"]).read_bytes()[int(where["offset"]):][:int(where["length"])]
                array = np.frombuffer(data, numpy_helper.helper.tensor_dtype_to_np_dtype(init.data_type))
                stored[(where["location"], where["offset"])] = array.reshape(tuple(init.dims))
            else:
                array = numpy_helper.to_array(init)
                assert array.nbytes < 4096  # every weight of a page or more is external, memory-mapped
                stored[(graph, init.name)] = array
    shared = bundle / "shared.weights"
    assert shared.exists() == model.config.share_embeddings  # the table both graphs use, stored once there
    assert sum(p.stat().st_size for p in bundle.glob("*.weights")) <= sum(p.numel() * 4 for p in model.parameters())
    big = [a for a in stored.values() if a.size >= 64]
    contents = [(a.shape, a.tobytes()) for a in big]
    contents += [(a.T.shape, np.ascontiguousarray(a.T).tobytes()) for a in big if a.ndim == 2]
    assert len(contents) == len(set(contents))  # no copy, not even a transposed one


def test_graph_weights_keep_the_pytorch_names(exported) -> None:
    _, bundle = exported("post-sinusoidal")
    names = {i.name for g in ("encoder.onnx", "decoder.onnx") for i in onnx.load(str(bundle / g)).graph.initializer}
    assert {"decoder.embed.tokens.weight", "encoder.layers.0.self_attn.q_proj.bias"} <= names
    assert not any(n.startswith("module.") for n in names)


def test_learned_position_bound_is_recorded(exported) -> None:
    _, bundle = exported("pre-learned-gelu")
    assert Manifest.load(bundle).max_positions == 64
    _, bundle = exported("post-sinusoidal")
    assert Manifest.load(bundle).max_positions is None


def test_failed_parity_check_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_checkpoint(tiny_model(), tmp_path / "ck")
    monkeypatch.setitem(parity.TOLERANCES, "fp32", parity.Tolerance(atol=0.0, rtol=0.0))
    with pytest.raises(ParityError, match=r"graph, output .* exceeds the allowed 0"):
        export(tmp_path / "ck", tmp_path / "bundle")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_existing_bundle_is_replaced_only_with_force(exported, tmp_path: Path) -> None:
    save_checkpoint(tiny_model(), tmp_path / "ck")
    (tmp_path / "bundle").mkdir()
    with pytest.raises(FileExistsError, match="--force"):
        export(tmp_path / "ck", tmp_path / "bundle")


def test_bad_checkpoint_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    save_checkpoint(tiny_model(), tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"not tensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        export(tmp_path / "ck", tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_unwritable_destination_is_a_clear_error(tmp_path: Path) -> None:
    save_checkpoint(tiny_model(), tmp_path / "ck")
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match="cannot write"):
        export(tmp_path / "ck", tmp_path / "file" / "bundle")
