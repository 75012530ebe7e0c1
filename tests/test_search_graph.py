"""The whole search in one graph (`--search`): onnxruntime's BeamSearch operator over the bundle's two graphs gives
the runtime's own tokens, is checked before it is written, travels with optimize and quantize, and is data a
stranger's bundle cannot turn against the reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeformer.runtime.bundle import Manifest
from edgeformer.runtime.errors import BundleError, InputError
from edgeformer.runtime.options import GenerationConfig
from edgeformer.runtime.session import Runtime
from tests.helpers import copy_bundle, edit_manifest, random_sources, relist

pytest.importorskip("onnx")


def with_search(bundle: Path, where: Path, strategy: str = "beam", name: str = "search") -> Path:
    from edgeformer.transforms.search import with_search as attach

    folder = copy_bundle(bundle, where, name)
    manifest = Manifest.load(folder)
    attach(folder, manifest, strategy, random_sources(8, int(manifest.config["src_vocab_size"]), seed=3))
    return folder


SETTINGS = [
    GenerationConfig(strategy="greedy", max_new_tokens=12),
    GenerationConfig(strategy="greedy", max_new_tokens=5, min_new_tokens=3),
    GenerationConfig(strategy="beam", num_beams=4, length_penalty=0.6, max_new_tokens=12),
    GenerationConfig(strategy="beam", num_beams=3, num_return_sequences=2, length_penalty=1.5, max_new_tokens=4,
                     min_new_tokens=2),
]


@pytest.mark.parametrize("variant", ["post-sinusoidal", "marian-like"])
def test_the_one_graph_search_gives_the_runtimes_tokens_greedy_and_beam(exported, tmp_path, variant) -> None:
    _, bundle = exported(variant)
    folder = with_search(bundle, tmp_path)
    rt = Runtime(folder, threads=2)
    sources = random_sources(24, int(rt.config["src_vocab_size"]), seed=11)
    for gen in SETTINGS:
        graph = rt.generate(sources, gen, search="graph")
        ours = rt.generate(sources, gen, search="python", operator_rules=True)
        assert [[h.tokens for h in hyps] for hyps in graph] == [[h.tokens for h in hyps] for hyps in ours], gen
        assert np.allclose([h.score for hyps in graph for h in hyps], [h.score for hyps in ours for h in hyps],
                           atol=1e-4), gen
        # what max_new_tokens and min_new_tokens ask holds in the graph's sequences too
        assert all(len(h.tokens) <= gen.max_new_tokens for hyps in graph for h in hyps)
        assert all(len(h.tokens) >= gen.min_new_tokens for hyps in graph for h in hyps)


def test_a_greedy_search_graph_takes_no_beam_settings_and_runs_greedy_alone(exported, tmp_path) -> None:
    _, bundle = exported("post-sinusoidal")
    rt = Runtime(with_search(bundle, tmp_path, "greedy"), threads=2)
    names = rt.manifest.graphs["search"].input_names
    assert "num_beams" not in names and "length_penalty" not in names
    sources = random_sources(8, int(rt.config["src_vocab_size"]), seed=5)
    gen = GenerationConfig(strategy="greedy", max_new_tokens=10)
    graph, ours = rt.generate(sources, gen, search="graph"), rt.generate(sources, gen, search="python")
    assert [h[0].tokens for h in graph] == [h[0].tokens for h in ours]
    assert np.allclose([h[0].score for h in graph], [h[0].score for h in ours], atol=1e-4)  # sums of log-probs
    with pytest.raises(InputError, match="strategy 'beam'"):
        rt.generate(sources, GenerationConfig(strategy="beam"), search="graph")


def test_the_runtime_opens_one_session_and_the_two_graphs_only_for_what_the_graph_cannot_run(exported,
                                                                                            tmp_path) -> None:
    _, bundle = exported("post-sinusoidal")
    rt = Runtime(with_search(bundle, tmp_path), threads=2)
    assert rt.search_session is not None and rt._sessions is None
    sources = random_sources(4, int(rt.config["src_vocab_size"]), seed=2)
    rt.generate(sources, GenerationConfig(strategy="beam", max_new_tokens=6))
    assert rt._sessions is None  # the graph ran it
    sampled = GenerationConfig(strategy="sample", seed=1, max_new_tokens=6)
    with pytest.raises(InputError, match="strategy 'sample'"):
        rt.generate(sources, sampled, search="graph")
    assert len(rt.generate(sources, sampled)) == 4  # "auto": the Python search over the two graphs
    assert rt._sessions is not None
    assert len(list(rt.stream(sources[0], GenerationConfig(max_new_tokens=4)))) <= 4


def test_a_search_graph_whose_tokens_differ_is_not_written(exported, tmp_path, monkeypatch) -> None:
    from edgeformer.export.parity import ParityError
    from edgeformer.transforms import search
    from edgeformer.transforms.derive import optimize

    _, bundle = exported("post-sinusoidal")
    built = search.search_graph

    def wrong_start(*args, **kwargs):  # a graph that starts decoding from another token
        proto = built(*args, **kwargs)
        for attr in proto.graph.node[0].attribute:
            if attr.name == "decoder_start_token_id":
                attr.i += 1
        return proto

    monkeypatch.setattr(search, "search_graph", wrong_start)
    with pytest.raises(ParityError, match="other tokens"):
        optimize(bundle, tmp_path / "out", search="beam")
    assert not (tmp_path / "out").exists()


def test_optimize_and_quantize_carry_the_search_graph_and_its_check(exported, tmp_path) -> None:
    from edgeformer.transforms.derive import optimize, quantize

    _, bundle = exported("post-sinusoidal")
    optimized = tmp_path / "opt"
    optimize(with_search(bundle, tmp_path), optimized)  # the source's search, carried without being asked
    m = Manifest.load(optimized)
    assert m.search is not None and m.search["strategy"] == "beam" and m.cache == "concat"
    quantize(optimized, tmp_path / "int8", to="int8", search="greedy")
    q = Manifest.load(tmp_path / "int8")
    assert q.search is not None and q.search["strategy"] == "greedy"
    assert q.search["check"]["inputs"] > 0 and q.search["check"]["near_ties"] <= 1


def test_a_search_graph_that_reads_weights_outside_the_bundle_is_refused(exported, tmp_path) -> None:
    import onnx

    _, bundle = exported("shared-tied")
    folder = with_search(bundle, tmp_path)
    proto = onnx.load(str(folder / "search.onnx"), load_external_data=False)
    decoder = next(a.g for a in proto.graph.node[0].attribute if a.name == "decoder")
    external = next(t for t in decoder.initializer if t.external_data)
    next(e for e in external.external_data if e.key == "location").value = "../../secret.weights"
    onnx.save_model(proto, str(folder / "search.onnx"))
    relist(folder, "search.onnx")
    with pytest.raises(BundleError, match=r"secret\.weights"):
        Runtime(folder)


def test_a_manifest_with_an_unknown_search_is_refused(exported, tmp_path) -> None:
    _, bundle = exported("post-sinusoidal")
    folder = with_search(bundle, tmp_path)
    edit_manifest(folder, lambda d: d["search"].update(strategy="sample"))
    with pytest.raises(BundleError, match="search must give a strategy"):
        Manifest.load(folder)
    with pytest.raises(InputError, match="no one-graph search"):
        Runtime(bundle, search="graph")


NODE_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "node"


def node_skip_reason() -> str | None:
    import shutil

    if shutil.which("node") is None:
        return "node is not on this machine"
    if not (NODE_EXAMPLE / "node_modules" / "onnxruntime-node").is_dir():
        return "onnxruntime-node is not installed in examples/node (scripts/setup.sh installs it where npm is)"
    return None


@pytest.mark.skipif(node_skip_reason() is not None, reason=str(node_skip_reason()))
def test_node_translates_the_shipped_model_as_the_runtime_does(exported, tmp_path) -> None:
    import json
    import subprocess

    _, bundle = exported("demo")
    folder = with_search(bundle, tmp_path)
    rt = Runtime(folder, threads=2, search="python")
    texts = ["3 March 2021", "July 4, 1999", "12/25/1987", "the 1st of May 2030"]
    for beams in (1, 4):
        gen = rt.generation_config(strategy="beam" if beams > 1 else "greedy", num_beams=beams)
        ours = rt.generate(rt.tokenize(texts), gen, operator_rules=True)
        run = subprocess.run(["node", str(NODE_EXAMPLE / "translate.mjs"), str(folder), "--beams", str(beams),
                              "--max-new-tokens", str(gen.max_new_tokens), *texts],
                             capture_output=True, text=True, timeout=120, check=False)
        assert run.returncode == 0, run.stderr
        lines = [json.loads(line) for line in run.stdout.splitlines()]
        assert [line["tokens"] for line in lines] == [h[0].tokens for h in ours]
        assert [line["output"] for line in lines] == [rt.tokenizer.decode(h[0].tokens) for h in ours]
        assert np.allclose([line["score"] for line in lines], [h[0].score for h in ours], atol=1e-4)


def test_a_cache_in_buffers_and_a_search_graph_are_refused_together_and_none_drops_the_graph(exported,
                                                                                             tmp_path) -> None:
    from edgeformer.transforms.derive import optimize, quantize

    _, bundle = exported("post-sinusoidal")
    with pytest.raises(ValueError, match="--cache concat"):
        optimize(bundle, tmp_path / "opt", cache="buffer", search="beam")
    optimize(with_search(bundle, tmp_path), tmp_path / "plain", search="none")  # the source's graph left out
    plain = Manifest.load(tmp_path / "plain")
    assert plain.search is None and "search" not in plain.graph_files and plain.cache == "buffer"
    with pytest.raises(ValueError, match="in buffers"):
        quantize(tmp_path / "plain", tmp_path / "int8", to="int8", search="greedy")
    assert not (tmp_path / "opt").exists() and not (tmp_path / "int8").exists()


def test_int8_scales_an_input_by_its_batch_so_the_check_runs_its_inputs_alone(exported, tmp_path) -> None:
    """onnxruntime's dynamic int8 quantizes an activation with one scale for the whole batch, so an input's scores
    move with the inputs beside it; the operator keeps the rows of inputs that ended, our search drops them. The
    one-graph check runs such a bundle's inputs one at a time, a float bundle's in batches."""
    from edgeformer.transforms.compare import couples_rows
    from edgeformer.transforms.derive import quantize

    _, bundle = exported("post-sinusoidal")
    quantize(bundle, tmp_path / "int8", to="int8", search="beam")
    int8 = Runtime(tmp_path / "int8")
    assert couples_rows(int8.path, int8.manifest) and not couples_rows(bundle, Manifest.load(bundle))
    assert int8.manifest.search is not None and int8.manifest.search["check"]["batch"] == 1
    src = random_sources(16, 37, seed=5)
    gen = GenerationConfig(strategy="greedy", max_new_tokens=8)
    for rt, coupled in ((int8, True), (Runtime(bundle), False)):
        alone = [rt.generate([s], gen, search="python")[0][0].score for s in src]
        together = [h[0].score for h in rt.generate(src, gen, search="python")]
        assert np.allclose(alone, together, atol=1e-5) != coupled
