"""Optimize and quantize: each variant checked against its fp32 source before it is written."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edgeformer.export.parity import ParityError
from edgeformer.model.generate import generate
from edgeformer.runtime.bundle import Manifest
from edgeformer.runtime.encoder_decoder import past_for
from edgeformer.runtime.options import GenerationConfig
from edgeformer.runtime.session import Runtime
from edgeformer.transforms import registry
from edgeformer.transforms.derive import optimize, quantize
from edgeformer.transforms.graph_edits import resolve_keep
from edgeformer.transforms.judge import Gate
from tests.helpers import graph_sessions, random_sources, search_head_feed


@pytest.fixture(scope="module")
def demo_variants(exported, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    _, fp32 = exported("demo")
    root = tmp_path_factory.mktemp("variants")
    paths = {"fp32": fp32}
    optimize(fp32, root / "optimized")
    paths["fp32-optimized"] = root / "optimized"
    for to in ("int8", "int4", "fp16"):
        quantize(fp32, root / to, to=to)
        paths[to] = root / to
    return paths


def bytes_of(bundle: Path) -> int:
    return sum((bundle / f).stat().st_size for f in Manifest.load(bundle).files)


def test_optimized_bundle_fuses_and_matches_pytorch_token_for_token(exported, demo_variants) -> None:
    model, _ = exported("demo")
    manifest = Manifest.load(demo_variants["fp32-optimized"])
    assert manifest.variant == "fp32-optimized" and manifest.offline_optimization == "extended"
    ops = manifest.transforms[0]["graphs"]["decoder"]["operators"]
    # the three residual adds of each decoder layer stay apart from their norms on the CPU (README: "Fusions on the
    # CPU"), where onnxruntime's SkipLayerNormalization runs slower than the two
    assert "SkipLayerNormalization" not in ops and ops["LayerNormalization"] == 2 * 3
    assert manifest.variant_parity["max_abs_logprob_diff"] <= 1e-4
    rt = Runtime(demo_variants["fp32-optimized"])
    src = random_sources(100, model.config.src_vocab_size, seed=4)
    gen = GenerationConfig(strategy="beam", num_beams=3, max_new_tokens=12)
    assert [h[0].tokens for h in rt.generate(src, gen)] == [h[0].tokens for h in generate(model, src, gen)]


@pytest.mark.parametrize(("variant", "max_share"), [("int8", 0.35), ("int4", 0.25), ("fp16", 0.55)])
def test_quantized_bundles_stay_accurate_and_shrink(demo_variants, variant: str, max_share: float) -> None:
    manifest = Manifest.load(demo_variants[variant])
    figures = manifest.variant_parity
    assert manifest.variant == variant and not figures["misses"]
    assert figures["metric"] == "exact_match" and figures["judged_on"]["inputs"] == "built-in task dates, test split"
    assert figures["metric_variant"] >= figures["metric_source"] - 1.0
    if variant == "fp16":
        assert figures["greedy_token_agreement"] >= 0.99 and figures["max_abs_logprob_diff"] <= 2e-2
    assert bytes_of(demo_variants[variant]) <= max_share * bytes_of(demo_variants["fp32"])
    ops = {n.op_type for g in ("encoder.onnx", "decoder.onnx")
           for n in onnx.load(str(demo_variants[variant] / g)).graph.node}
    expected = {"int8": "MatMulInteger", "int4": "MatMulNBits", "fp16": "Cast"}[variant]
    assert expected in ops


def test_optimize_then_quantize_and_quantize_then_optimize(demo_variants, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"  # onnxruntime's shape inference dumps files into the working directory on failure
    work.mkdir()
    monkeypatch.chdir(work)
    report = quantize(demo_variants["fp32-optimized"], tmp_path / "opt-int8", to="int8")
    assert report.variant == "int8" and not report.misses
    report = optimize(demo_variants["int8"], tmp_path / "int8-opt")
    assert report.variant == "int8" and report.figures["against"] == "int8 bundle"
    steps = [(t["step"], t["variant"]) for t in Manifest.load(tmp_path / "int8-opt").transforms]
    assert steps == [("quantize", "int8"), ("optimize", "int8")]
    assert list(work.iterdir()) == []


def test_quantizing_a_quantized_bundle_is_refused(demo_variants, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="already int8"):
        quantize(demo_variants["int8"], tmp_path / "x", to="int4")


def test_a_variant_that_misses_its_target_is_written_only_with_allow_drop(
        demo_variants, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    strict = dataclasses.replace(registry.TRANSFORMS["int4"], gate=Gate(max_logprob_diff=1e-9))
    monkeypatch.setitem(registry.TRANSFORMS, "int4", strict)
    with pytest.raises(ParityError, match="misses its target"):
        quantize(demo_variants["fp32"], tmp_path / "int4", to="int4")
    assert not (tmp_path / "int4").exists()
    report = quantize(demo_variants["fp32"], tmp_path / "int4", to="int4", allow_drop=True)
    assert report.misses
    info = subprocess.run([sys.executable, "-m", "edgeformer.cli", "info", str(tmp_path / "int4")],
                          capture_output=True, text=True, check=True).stdout
    assert "WARNING: written with --allow-drop" in info
    gen = subprocess.run([sys.executable, "-m", "edgeformer.cli", "generate", str(tmp_path / "int4"), "5 mars 1998"],
                         capture_output=True, text=True, check=True)
    assert "misses its target" in gen.stderr


def test_output_projection_can_be_kept_in_full_precision(exported, tmp_path: Path) -> None:
    _, bundle = exported("shared-untied")  # an untied projection: a MatMul with its own weight
    decoder = onnx.load(str(bundle / "decoder.onnx"))
    kept = resolve_keep(decoder, ["output_projection"])
    assert len(kept) == 1
    quantize(bundle, tmp_path / "int8", to="int8", keep=["output_projection"], allow_drop=True)
    nodes = {n.name: n.op_type for n in onnx.load(str(tmp_path / "int8" / "decoder.onnx")).graph.node}
    assert nodes[kept[0]] == "MatMul"
    assert "MatMulInteger" in nodes.values()


@pytest.mark.parametrize("preset", ["avx2", "avx512-vnni"])
def test_the_tied_table_is_int8_for_full_8_bit_presets_and_stays_one_file(exported, tmp_path: Path,
                                                                          preset: str) -> None:
    """u8s8 kernels for every MatMulInteger with a full 8-bit preset, the tied output projection's too: its table,
    which the quantizer stores as uint8, is made int8 with the same values in both graphs, which still share it.
    The avx2 preset (7-bit weights, for kernels that add pairs of u8 x s8 products in int16) keeps it uint8."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgeformer.transforms.options import INT8_PRESETS

    _, bundle = exported("shared-tied")
    quantize(bundle, tmp_path / "int8", to="int8", preset=preset, allow_drop=True)
    manifest = Manifest.load(tmp_path / "int8")
    assert manifest.config["tie_output"] and manifest.config["share_embeddings"]
    table_type = onnx.TensorProto.UINT8 if preset == "avx2" else onnx.TensorProto.INT8
    tables = {}
    for graph in ("encoder", "decoder"):
        model = onnx.load(str(tmp_path / "int8" / f"{graph}.onnx"), load_external_data=False)
        inits = {i.name: i for i in model.graph.initializer}
        made_by = {o: n for n in model.graph.node for o in n.output}
        for node in model.graph.node:
            if node.op_type == "MatMulInteger":
                weight = node.input[1]
                while weight not in inits:  # through the Transpose of the tied table
                    weight = made_by[weight].input[0]
                tied = weight == "decoder.embed.tokens.weight_quantized"
                assert inits[weight].data_type == (table_type if tied else onnx.TensorProto.INT8), node.name
        table = inits["decoder.embed.tokens.weight_quantized"]
        assert table.data_type == table_type and table.data_location == onnx.TensorProto.EXTERNAL
        assert {e.key: e.value for e in table.external_data}["location"] == "shared.weights"
        tables[graph] = onnx.load(str(tmp_path / "int8" / f"{graph}.onnx"))
    assert manifest.transforms[-1]["graphs"]["decoder"]["tied_projection_int8"]
    # the dequantized table, as the embedding's DequantizeLinear gives it, is the one quantize_dynamic made
    plain = tmp_path / "plain.onnx"
    quantize_dynamic(onnx.load(str(bundle / "decoder.onnx")), plain, op_types_to_quantize=["MatMul", "Gather"],
                     weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True},
                     **INT8_PRESETS[preset])
    want = dequantized_table(onnx.load(str(plain)))
    assert np.array_equal(dequantized_table(tables["decoder"]), want)
    assert np.array_equal(dequantized_table(tables["encoder"]), want)


def dequantized_table(model: onnx.ModelProto) -> np.ndarray:
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    name = "decoder.embed.tokens.weight"
    return (inits[f"{name}_quantized"].astype(np.float32) - inits[f"{name}_zero_point"]) * inits[f"{name}_scale"]


def test_bad_quantization_settings_fail_clearly(demo_variants, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown quantization 'int2'"):
        quantize(demo_variants["fp32"], tmp_path / "x", to="int2")
    with pytest.raises(ValueError, match="unknown int8 preset"):
        quantize(demo_variants["fp32"], tmp_path / "x", to="int8", preset="avx9")
    with pytest.raises(ValueError, match="block size must be a power of two"):
        quantize(demo_variants["fp32"], tmp_path / "x", to="int4", block_size=24)


def test_info_shows_fusions_and_variant_figures(demo_variants) -> None:
    out = subprocess.run([sys.executable, "-m", "edgeformer.cli", "info", str(demo_variants["fp32-optimized"])],
                         capture_output=True, text=True, check=True).stdout
    assert "decoder: fused " in out and "GroupQueryAttention x2" in out
    data = json.loads(subprocess.run([sys.executable, "-m", "edgeformer.cli", "info", str(demo_variants["int4"]),
                                      "--json"], capture_output=True, text=True, check=True).stdout)
    assert data["variant"] == "int4" and data["variant_parity"]["metric_variant"] >= 99.0


def test_static_int8_is_calibrated_and_stays_accurate(demo_variants, tmp_path: Path) -> None:
    report = quantize(demo_variants["fp32"], tmp_path / "static", to="int8", method="static", calibration_size=32)
    assert not report.misses and report.figures["metric_variant"] >= report.figures["metric_source"] - 1.0
    ops = {n.op_type for n in onnx.load(str(tmp_path / "static" / "decoder.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format
    settings = Manifest.load(tmp_path / "static").transforms[-1]
    assert settings["method"] == "static-qdq" and settings["graphs"]["decoder"]["calibration_batches"] > 0


def test_static_calibration_takes_the_users_texts(demo_variants, tmp_path: Path) -> None:
    texts = tmp_path / "calibration.txt"
    texts.write_text("5 mars 1998\nThursday, July 4, 2024\n12.10.1961\nthe 3rd of may, 2001\n")
    report = quantize(demo_variants["fp32"], tmp_path / "static", to="int8", method="static", calibration=texts,
                      calibration_size=4, allow_drop=True)
    settings = Manifest.load(tmp_path / "static").transforms[-1]
    assert settings["graphs"]["encoder"]["calibration_batches"] == 1
    assert settings["calibrated_on"].startswith("file calibration.txt")
    assert report.figures["metric_variant"] > 90


@pytest.mark.parametrize("cache", ["concat", "buffer"])
def test_attention_fuses_into_multihead_attention_and_stays_exact(exported, demo_variants, tmp_path: Path,
                                                                   cache: str) -> None:
    model, _ = exported("demo")
    report = optimize(demo_variants["fp32"], tmp_path / "mha", fuse_attention=True, cache=cache)
    assert not report.misses and report.figures["max_abs_logprob_diff"] <= 1e-4
    manifest = Manifest.load(tmp_path / "mha")
    graphs = manifest.transforms[-1]["graphs"]
    assert manifest.cache == cache
    assert graphs["encoder"]["fused_operators"]["MultiHeadAttention"] == 2  # one self-attention a layer
    fused = graphs["decoder"]["fused_operators"]
    if cache == "concat":
        assert fused["MultiHeadAttention"] == 4  # self and cross, two layers
    else:  # the self-attention on the buffers, the cross-attention as it was
        assert fused["GroupQueryAttention"] == 2 and fused["MultiHeadAttention"] == 2
        assert manifest.graphs["decoder"].input_names[-1] == "past_length"
    rt = Runtime(tmp_path / "mha")
    src = random_sources(60, model.config.src_vocab_size, seed=6)
    gen = GenerationConfig(strategy="beam", num_beams=3, max_new_tokens=12)
    assert [h[0].tokens for h in rt.generate(src, gen)] == [h[0].tokens for h in generate(model, src, gen)]


def test_attention_is_fused_and_the_cache_buffered_on_cpu_by_default(demo_variants) -> None:
    manifest = Manifest.load(demo_variants["fp32-optimized"])
    settings = manifest.transforms[-1]
    assert settings["fuse_attention"] is True and manifest.cache == "buffer"
    assert settings["graphs"]["decoder"]["fused_operators"]["GroupQueryAttention"] == 2
    ops = settings["graphs"]["decoder"]["operators"]
    # The causal mask went into the kernels: no Softmax, no Greater. A layer's MatMuls: its self-attention's query,
    # key and value packed in one, its output, the cross-attention's query and output, the feed-forward's two;
    # then the output projection. The Adds left: the positions (2: the past's length, the embedding), per layer the
    # packed q, k, v bias, the feed-forward's first bias and its three residuals' bias and sum (kept apart from
    # their norms on the CPU), the length the step reaches, the search head's mask.
    assert "Softmax" not in ops and "Greater" not in ops
    assert ops["MatMul"] == 2 * 6 + 1 and ops["Add"] <= 8 + 2 * 3 * 2


def test_a_buffered_cache_is_refused_where_it_cannot_be_made(demo_variants, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs the fused attention"):
        optimize(demo_variants["fp32"], tmp_path / "x", fuse_attention=False, cache="buffer")
    with pytest.raises(ValueError, match="unknown cache 'ring'; choose one of concat, buffer"):
        optimize(demo_variants["fp32"], tmp_path / "x", cache="ring")
    with pytest.raises(ValueError, match="passes its cache in buffers, and nothing turns them back"):
        optimize(demo_variants["fp32-optimized"], tmp_path / "x", cache="concat")
    assert not (tmp_path / "x").exists()


def test_a_buffered_cache_grows_and_gives_the_results_of_a_concatenated_one(exported, demo_variants,
                                                                              monkeypatch) -> None:
    import edgeformer.runtime.session as session

    model, _ = exported("demo")
    buffered, concat = Runtime(demo_variants["fp32-optimized"]), Runtime(demo_variants["fp32"])
    assert (buffered.manifest.cache, concat.manifest.cache) == ("buffer", "concat")
    grown: list[int] = []
    grow = session._Steps._grow

    def spy(self):  # type: ignore[no-untyped-def]
        grow(self)
        grown.append(next(iter(self.past.values())).shape[2])

    monkeypatch.setattr(session._Steps, "_grow", spy)
    monkeypatch.setattr(session, "INITIAL_CAPACITY", 3)  # 3 positions, then 6, 12
    src = random_sources(12, model.config.src_vocab_size, seed=4)
    for gen in (GenerationConfig(max_new_tokens=20),
                GenerationConfig(strategy="beam", num_beams=4, num_return_sequences=2, max_new_tokens=20),
                GenerationConfig(strategy="sample", num_return_sequences=3, seed=2, max_new_tokens=20)):
        a, b = buffered.generate(src, gen), concat.generate(src, gen)
        assert [[h.tokens for h in hs] for hs in a] == [[h.tokens for h in hs] for hs in b]
        assert max(abs(x.score - y.score) for p, q in zip(a, b, strict=True)
                   for x, y in zip(p, q, strict=True)) < 1e-4
    assert grown[:2] == [6, 12]  # it grew, twice, what was filled carried over


@pytest.mark.parametrize("variant", ["fp32", "fp32-optimized", "int8"])  # concat, buffers, int8 activations
def test_a_moving_beam_copies_only_the_positions_its_rows_do_not_share(demo_variants, monkeypatch,
                                                                        variant: str) -> None:
    """The same tokens and scores, to the bit, as copying every position of every moved row; fewer copied."""
    import edgeformer.runtime.session as session

    rt = Runtime(demo_variants[variant])
    src = random_sources(6, int(rt.config["src_vocab_size"]), seed=7)
    gen = GenerationConfig(strategy="beam", num_beams=4, num_return_sequences=4, max_new_tokens=24,
                           ignore_eos=True)
    move = session._Steps._move
    counts = {"positions": 0, "shared": 0}

    def counted(self, moved, sources):  # type: ignore[no-untyped-def]
        same = self.lineage[moved] == self.lineage[sources]
        counts["positions"] += same.size
        counts["shared"] += int(np.cumprod(same, axis=1).sum())  # each row's shared prefix
        move(self, moved, sources)

    monkeypatch.setattr(session._Steps, "_move", counted)
    partial = rt.generate(src, gen)

    def everything(self, moved, sources):  # type: ignore[no-untyped-def]
        self.lineage[moved] = -1  # nothing shared: every position written is copied
        move(self, moved, sources)

    monkeypatch.setattr(session._Steps, "_move", everything)
    full = rt.generate(src, gen)
    assert [[(h.tokens, h.score) for h in hs] for hs in partial] == [[(h.tokens, h.score) for h in hs] for hs in full]
    assert 0 < counts["shared"] < counts["positions"]  # what the rows shared was not copied


@pytest.mark.parametrize("name", ["post-sinusoidal", "pre-learned-gelu"])
def test_fused_attention_keeps_the_causal_mask_over_a_past(exported, name: str, tmp_path: Path) -> None:
    """A prefix fed in two chunks (3 tokens, then 2 more over that past) gives PyTorch's logits for all 5."""
    model, bundle = exported(name)
    optimize(bundle, tmp_path / "mha", fuse_attention=True, cache="concat")
    m = Manifest.load(tmp_path / "mha")
    sessions = graph_sessions(tmp_path / "mha")
    src = torch.randint(4, 37, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    tgt = torch.randint(4, 29, (2, 5))
    cross = dict(zip(m.graphs["encoder"].output_names, sessions["encoder"].run(None, {"input_ids": src.numpy(),
                                                                     "attention_mask": mask.numpy()}), strict=True))
    past = {t.name: np.zeros((2, 4, 0, 8), np.float32) for t in m.graphs["decoder"].inputs if ".decoder." in t.name}
    logits = []
    for chunk in (tgt[:, :3], tgt[:, 3:]):
        feed = {"input_ids": chunk.numpy(), "encoder_attention_mask": mask.numpy(), **past,
                **{past_for(n): v for n, v in cross.items()}, **search_head_feed(29)}
        out = dict(zip(m.graphs["decoder"].output_names, sessions["decoder"].run(None, feed), strict=True))
        logits.append(out.pop("logits"))
        past = {past_for(n): v for n, v in out.items() if n.startswith("present.")}
    with torch.no_grad():
        want = model(src, tgt, mask).numpy()
    assert np.abs(np.concatenate(logits, axis=1) - want).max() < 1e-4


def test_optimizing_for_a_missing_provider_is_refused(demo_variants, tmp_path: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="cannot optimize for CUDAExecutionProvider"):
        optimize(demo_variants["fp32"], tmp_path / "x", provider="cuda")


def test_the_host_device_copies_of_a_gpu_optimization_leave_a_valid_graph_that_computes_the_same() -> None:
    """onnxruntime's offline optimization for CUDA writes MemcpyFromHost/ToHost nodes, no ONNX operator: made
    Identity, the graph is valid ONNX and computes the same, graph inputs and outputs copied included."""
    from onnx import helper

    from edgeformer.transforms.graph_edits import replace_memcpy

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])
    z = helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [2])
    graph = helper.make_graph([
        helper.make_node("MemcpyFromHost", ["x"], ["x_on_device"]),
        helper.make_node("Relu", ["x_on_device"], ["r"]),
        helper.make_node("Neg", ["x_on_device"], ["n"]),
        helper.make_node("Add", ["r", "n"], ["s"]),
        helper.make_node("MemcpyToHost", ["s"], ["y"]),
        helper.make_node("MemcpyToHost", ["x"], ["z"]),  # a graph input copied straight to an output
    ], "g", [x], [y, z])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(onnx.checker.ValidationError, match="Memcpy"):
        onnx.checker.check_model(model, full_check=True)
    assert replace_memcpy(model) == 3
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["Identity", "Relu", "Neg", "Add", "Identity", "Identity"]
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    value = np.array([-1.5, 2.0], np.float32)
    out_y, out_z = session.run(["y", "z"], {"x": value})
    np.testing.assert_array_equal(out_y, np.maximum(value, 0) - value)
    np.testing.assert_array_equal(out_z, value)


@pytest.mark.parametrize(("flags", "machine", "presets"), [
    ({"avx2", "fma"}, "x86_64", ("avx2-8bit", "avx2")),
    ({"avx2", "avx512f", "avx512_vnni"}, "x86_64", ("avx512-vnni",)),
    ({"avx2", "avx_vnni"}, "x86_64", ("avx512-vnni",)),
    (set(), "aarch64", ("arm64",)),
])
def test_the_auto_preset_follows_the_cpu(flags: set[str], machine: str, presets: tuple[str, ...]) -> None:
    from edgeformer.transforms.options import INT8_PRESETS, QuantizeOptions, cpu_presets

    assert cpu_presets(flags, machine) == presets
    assert QuantizeOptions(preset="auto").preset in INT8_PRESETS  # resolved to a preset when asked for


def test_auto_falls_back_to_7_bit_weights_when_the_full_8_bits_miss_the_gate(demo_variants, tmp_path: Path,
                                                                             monkeypatch) -> None:
    """On AVX2 alone `auto` tries the full 8 bits first (faster, but their u8s8 sums can saturate), then 7 bits."""
    from edgeformer.transforms import derive, options

    tried: list[str] = []
    made = derive.derive

    def saturating(bundle, out, to, opts, **kwargs):  # type: ignore[no-untyped-def]
        tried.append(opts.preset)
        if opts.preset == "avx2-8bit":
            assert kwargs.get("allow_drop") is False  # a faster preset that misses is never written
            raise ParityError("int8 bundle misses its target against its source bundle: greedy agreement 0.5 < 0.9")
        return made(bundle, out, to, opts, **kwargs)

    monkeypatch.setattr(derive, "cpu_presets", lambda: options.cpu_presets({"avx2", "fma"}, "x86_64"))
    monkeypatch.setattr(derive, "derive", saturating)
    said: list[str] = []
    quantize(demo_variants["fp32-optimized"], tmp_path / "int8", to="int8", preset="auto", log=said.append)
    assert tried == ["avx2-8bit", "avx2"]
    assert Manifest.load(tmp_path / "int8").transforms[-1]["preset"] == "avx2"
    assert any("preset avx2-8bit" in line and "trying preset avx2" in line for line in said)
    tried.clear()  # allow_drop writes a bundle that misses its gate, but only once no faster preset passes
    quantize(demo_variants["fp32-optimized"], tmp_path / "dropped", to="int8", preset="auto", allow_drop=True,
             log=said.append)
    assert tried == ["avx2-8bit", "avx2"]


def test_auto_raises_when_every_preset_misses_the_gate(demo_variants, tmp_path: Path, monkeypatch) -> None:
    from edgeformer.transforms import derive, options

    tried: list[str] = []

    def missing(bundle, out, to, opts, **kwargs):  # type: ignore[no-untyped-def]
        tried.append(opts.preset)
        raise ParityError(f"int8 bundle misses its target ({opts.preset}). Nothing was written; pass --allow-drop")

    monkeypatch.setattr(derive, "cpu_presets", lambda: options.cpu_presets({"avx2", "fma"}, "x86_64"))
    monkeypatch.setattr(derive, "derive", missing)
    with pytest.raises(ParityError, match=r"\(avx2\)"):
        quantize(demo_variants["fp32-optimized"], tmp_path / "int8", to="int8", preset="auto", log=lambda _: None)
    assert tried == ["avx2-8bit", "avx2"] and not (tmp_path / "int8").exists()


def test_every_variant_keeps_the_search_head_in_float32_and_its_answers(demo_variants) -> None:
    """The head's k best of each step equal numpy's top-k of the same bundle's log-probabilities, fp16 too: its
    LogSoftmax, mask Add and TopK are kept out of the conversion."""
    from edgeformer.runtime.search import pad, top_k

    decoder = onnx.load(str(demo_variants["fp16"] / "decoder.onnx"))
    head = [n for n in decoder.graph.node if n.name.startswith("search_head/")]
    produced = {o: n for n in decoder.graph.node for o in n.output}
    assert len(head) == 5 and not any(produced.get(i) is not None and produced[i].op_type == "Cast"
                                      and produced[i].attribute[0].i == onnx.TensorProto.FLOAT16
                                      for n in head for i in n.input)
    for variant in ("fp32", "fp32-optimized", "int8", "int4", "fp16"):
        rt = Runtime(demo_variants[variant])
        ids, mask = pad(random_sources(8, int(rt.config["src_vocab_size"]), seed=1), int(rt.config["pad_id"]))
        a, b = rt.step_model(ids, mask, 1), rt.step_model(ids, mask, 1)
        tokens = np.full(len(ids), int(rt.config["bos_id"]), dtype=np.int64)
        free = np.zeros(a.vocab, np.float32)
        for _ in range(4):
            values, best = a.top(tokens, 3, free)
            want_values, want = top_k(b.log_probs(tokens), 3)
            assert np.array_equal(best, want), variant
            assert np.abs(values - want_values).max() < 1e-5, variant
            tokens = best[:, 0]


def test_a_zero_point_shared_with_another_tensor_keeps_its_table_uint8() -> None:
    """signed_tables shifts a table's zero point by 128: only where that zero point dequantizes nothing else."""
    from onnx import helper

    from edgeformer.transforms.graph_edits import signed_tables

    def model(shared: bool) -> onnx.ModelProto:
        table = onnx.numpy_helper.from_array(np.full((4, 3), 130, np.uint8), "table")
        other = onnx.numpy_helper.from_array(np.full((3, 3), 120, np.uint8), "other")
        scale = onnx.numpy_helper.from_array(np.array(0.5, np.float32), "scale")
        zeros = [onnx.numpy_helper.from_array(np.array(128, np.uint8), n) for n in ("zp", "zp_other")]
        nodes = [helper.make_node("Gather", ["table", "ids"], ["rows"]),
                 helper.make_node("DequantizeLinear", ["rows", "scale", "zp"], ["x"]),
                 helper.make_node("DequantizeLinear", ["other", "scale", "zp" if shared else "zp_other"], ["w"]),
                 helper.make_node("MatMul", ["x", "w"], ["y"])]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [2])],
                                  [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])],
                                  [table, other, scale, *zeros])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])

    alone = model(shared=False)
    assert sorted(signed_tables(alone)) == ["other", "table"]
    assert {i.name: i.data_type for i in alone.graph.initializer}["zp"] == onnx.TensorProto.INT8
    shared = model(shared=True)
    assert signed_tables(shared) == []
    assert all(i.data_type != onnx.TensorProto.INT8 for i in shared.graph.initializer)
