"""Hostile and careless input, through the Python API and the CLI: every case is refused with an error of a
documented type (runtime/errors.py) whose message names the problem; a bundle never makes us read a file outside
it; an abandoned stream stops; an interrupted or concurrent write leaves nothing half-done. The property tests at
the end feed random manifests and random inputs and check that nothing else ever escapes."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeformer.runtime.bundle import MANIFEST_FILE, Manifest, atomic_folder
from edgeformer.runtime.errors import BundleError, EdgeformerError, InputError, LimitError, WriteError
from edgeformer.runtime.options import GenerationConfig, Limits
from edgeformer.runtime.session import Runtime
from edgeformer.runtime.tokenizer import CharTokenizer, CharVocab
from tests.helpers import DATA, copy_bundle, edgeformer, edit_manifest, relist

SINUSOIDAL, LEARNED = DATA / "post-sinusoidal", DATA / "pre-learned-gelu"
SHORT = GenerationConfig(max_new_tokens=4)


@pytest.fixture(scope="module")
def rt() -> Runtime:
    return Runtime(SINUSOIDAL, threads=1)


@pytest.fixture(scope="module")
def small_rt() -> Runtime:
    """Limits low enough that no random call runs long."""
    return Runtime(SINUSOIDAL, threads=1, limits=Limits(source_tokens=16, new_tokens=12, rows=16))


# -- inputs and settings through the Python API ------------------------------------------------------------------

@pytest.mark.parametrize(("src", "error", "message"), [
    (None, InputError, "inputs must be a list of token-id sequences, not NoneType"),
    ("5 6 7", InputError, "use translate"),
    (42, InputError, "not int"),
    ([[5.0, 6.0]], InputError, "5.0, not an integer token id; floats are not truncated"),
    ([[5, "6"]], InputError, "'6', not an integer token id"),
    ([[[5, 6]]], InputError, r"\[5, 6\], not an integer token id"),
    ([[True, 5]], InputError, "True, not an integer token id"),
    ([np.array([[5, 6]])], InputError, "1-D array of integer token ids, not 2-D"),
    ([np.array([5.0, 6.0])], InputError, "1-D array of integer token ids, not 1-D float64"),
    ([[5, 2**70]], InputError, "outside the source vocabulary"),
    ([[5, -1]], InputError, r"input 0 has token ids \[-1\] outside the source vocabulary \[0, 37\)"),
    ([], InputError, "no inputs"),
    ([[5], []], InputError, "input 1 is empty"),
    ([[5], None], InputError, "input 1 must be a sequence of token ids, not NoneType"),
    ([[5] * 1025], LimitError, "input 0 has 1025 tokens, above this runtime's limit of 1024"),
])
def test_bad_inputs_are_refused_by_name(rt: Runtime, src: Any, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        rt.generate(src, SHORT)


@pytest.mark.parametrize(("settings_", "message"), [
    ({"temperature": math.nan}, "temperature must be a finite number, not nan"),
    ({"length_penalty": math.inf}, "length_penalty must be a finite number, not inf"),
    ({"top_p": math.nan}, "top_p must be a finite number"),
    ({"top_p": 10**400}, "top_p must be a finite number"),
    ({"strategy": "beam", "length_penalty": 1e308}, r"length_penalty must be in \[-100, 100\]"),
    ({"max_new_tokens": 5.0}, "max_new_tokens must be an integer, not 5.0"),
    ({"max_new_tokens": True}, "max_new_tokens must be an integer, not True"),
    ({"strategy": "best"}, "unknown strategy 'best'"),
    ({"strategy": "beam", "num_beams": 0}, "num_beams must be >= 1"),
    ({"seed": -1}, "seed must be a non-negative integer"),
    ({"suppress_tokens": [1]}, "suppress_tokens must be a tuple of token ids"),
    ({"top_k": -1}, "top_k must be >= 0"),
    ({"early_stopping": "yes"}, "early_stopping must be True or False"),
    ({"min_new_tokens": 9, "max_new_tokens": 4}, r"min_new_tokens must be in \[0, max_new_tokens=4\]"),
    ({"temperature": 0.0, "strategy": "sample"}, "temperature must be > 0"),
])
def test_bad_settings_are_refused_by_name(settings_: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        GenerationConfig(**settings_)


@pytest.mark.parametrize(("call", "error", "message"), [
    (lambda rt: rt.generate([[5]], GenerationConfig(max_new_tokens=1025)), LimitError,
     "max_new_tokens=1025 is above this runtime's limit of 1024"),
    (lambda rt: rt.generate([[5]] * 300, GenerationConfig(strategy="beam", num_beams=4)), LimitError,
     "300 inputs x 4 beams or samples are 1200 rows, above this runtime's limit of 1024"),
    (lambda rt: rt.generate([[5]], {"strategy": "beam"}), InputError, "settings must be a GenerationConfig"),
    (lambda rt: rt.generate([[5]], GenerationConfig(suppress_tokens=(99,))), InputError,
     r"suppress_tokens \[99\] reach outside the target vocabulary"),
    (lambda rt: rt.generate([[5]], GenerationConfig(suppress_tokens=tuple(range(29)))), InputError,
     "suppress_tokens leave no token to generate"),
    (lambda rt: rt.generate(np.array(5), SHORT), InputError, "inputs must be a list of token-id sequences"),
    (lambda rt: rt.generate([np.array(5)], SHORT), InputError, "input 0 must be a sequence of token ids"),
    (lambda rt: rt.generation_config(beams=4), InputError, "unexpected keyword argument 'beams'"),
    (lambda rt: rt.stream([5], GenerationConfig(strategy="beam")), InputError, "streaming yields one sequence"),
    (lambda rt: rt.stream([5], GenerationConfig(strategy="sample", num_return_sequences=2)), InputError,
     "num_return_sequences=1"),
    (lambda rt: rt.stream([5, 99]), InputError, "outside the source vocabulary"),  # at the call, not at next()
    (lambda rt: rt.translate(["a date"]), InputError, "carries no tokenizer"),
    (lambda rt: Runtime(None), InputError, "bundle must be a folder's path, not NoneType"),
])
def test_bad_calls_are_refused_by_name(rt: Runtime, call: Any, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        call(rt)


def test_learned_positions_bound_sources_and_new_tokens() -> None:
    rt = Runtime(LEARNED, threads=1)
    with pytest.raises(LimitError, match="input 1 has 65 tokens, more than this model's 64 learned positions"):
        rt.generate([[5], [5] * 65], SHORT)
    with pytest.raises(LimitError, match="max_new_tokens=65 exceeds this model's 64 learned positions"):
        rt.generate([[5]], GenerationConfig(max_new_tokens=65))


@pytest.mark.parametrize(("options", "message"), [
    ({"threads": 0}, "threads=0: give a number of threads in"),
    ({"threads": "2"}, "threads='2': give a number of threads"),
    ({"providers": ["tpu"]}, "unknown execution provider 'tpu'"),
    ({"providers": None}, "providers must be names"),
    ({"optimization": "max"}, "unknown optimization level 'max'"),
    ({"optimization": ["all"]}, "optimization must be a level's name"),
    ({"threads": 2**31}, r"threads=2147483648: give a number of threads in \[1, 1024\]"),
    ({"limits": {"source_tokens": 5}}, "limits must be a Limits, not dict"),
    ({"limits": Limits(source_tokens=5)}, None),  # a positive control: limits are the caller's to set
])
def test_bad_runtime_options_are_refused_by_name(options: dict, message: str | None) -> None:
    if message is None:
        Runtime(SINUSOIDAL, **options)
        return
    with pytest.raises(InputError, match=message):
        Runtime(SINUSOIDAL, **options)


def test_limits_are_positive_integers_and_can_be_raised() -> None:
    with pytest.raises(InputError, match="limits must be positive integers: source_tokens=0"):
        Limits(source_tokens=0)
    rt = Runtime(SINUSOIDAL, threads=1, limits=Limits(source_tokens=2000, new_tokens=2000))
    assert len(rt.generate([[5] * 1500], GenerationConfig(max_new_tokens=2))[0][0].tokens) <= 2


def test_empty_text_is_refused_not_answered(tmp_path: Path) -> None:
    bundle = with_char_tokenizer(tmp_path)
    rt = Runtime(bundle, threads=1)
    assert isinstance(rt.translate(["2021"], SHORT)[0], str)
    for texts, message in (([""], "text 0 is empty"), (["a", "  "], "text 1 is empty"), (["a", 5], "text 1 is a int"),
                           ("abc", "texts must be a list of strings")):
        with pytest.raises(InputError, match=message):
            rt.translate(texts, SHORT)


def with_char_tokenizer(tmp_path: Path) -> Path:
    bundle = copy_bundle(SINUSOIDAL, tmp_path, "with-tokenizer")
    CharTokenizer(CharVocab("0123456789-abcdefghijklmnopqrstuvw"), CharVocab("0123456789-abcdefghijklmnopqrs")).save(
        bundle)
    relist(bundle, "tokenizer.json")
    edit_manifest(bundle, lambda d: d.update(tokenizer="tokenizer.json"))
    return bundle


# -- streams -------------------------------------------------------------------------------------------------------

def test_leaving_a_stream_stops_the_search(rt: Runtime) -> None:
    forced = GenerationConfig(max_new_tokens=64, ignore_eos=True)
    threads = threading.active_count()
    stream = rt.stream([5, 6, 7], forced)
    first = [next(stream) for _ in range(3)]
    stream.close()  # what leaving a for loop over it does once nothing refers to it
    assert next(stream, None) is None, "a closed stream yields nothing more"
    assert first == rt.generate([[5, 6, 7]], forced)[0][0].tokens[:3]
    assert threading.active_count() == threads, "a stream must not run in a thread of its own"


def test_a_script_that_breaks_out_of_a_stream_exits_cleanly(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        from edgeformer.runtime.options import GenerationConfig
        from edgeformer.runtime.session import Runtime
        rt = Runtime({str(SINUSOIDAL)!r})
        for token in rt.stream([5, 6, 7], GenerationConfig(max_new_tokens=64, ignore_eos=True)):
            break
        print("left", token)
    """)
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.startswith("left") and "terminate called" not in out.stderr


def test_a_large_call_gives_its_memory_back(tmp_path: Path) -> None:
    """The encoder's attention over a long source takes hundreds of MB once; its arena returns them."""
    script = textwrap.dedent(f"""
        import os
        from edgeformer.runtime.options import GenerationConfig, Limits
        from edgeformer.runtime.session import Runtime
        def rss(): return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') >> 20
        rt = Runtime({str(SINUSOIDAL)!r}, threads=1, limits=Limits(source_tokens=4000))
        rt.generate([[5] * 8], GenerationConfig(max_new_tokens=2))
        before = rss()
        rt.generate([[5] * 4000], GenerationConfig(max_new_tokens=2))
        print(before, rss())
    """)
    if not Path("/proc/self/statm").exists():
        pytest.skip("measures resident memory through /proc (Linux)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after = map(int, out.stdout.split())
    assert after - before < 150, f"{after - before} MB kept after a 4,000-token call (its attention alone is ~500 MB)"


# -- tampered and malicious bundles ----------------------------------------------------------------------------

def _set(*path: Any) -> Any:
    """An edit that sets the manifest field at path[:-1] (keys and indices) to path[-1]."""
    *keys, value = path

    def edit(d: Any) -> None:
        for key in keys[:-1]:
            d = d[key]
        d[keys[-1]] = value
    return edit


def _drop_graph(d: dict) -> None:
    del d["graphs"]["decoder"]


def _rename_input(d: dict) -> None:
    d["graphs"]["decoder"]["inputs"][0]["name"] = "tokens"


@pytest.mark.parametrize(("edit", "message"), [
    (_set("graphs", "encoder", "file", "../outside/encoder.onnx"), "'../outside/encoder.onnx' is not a plain file"),
    (_set("graphs", "encoder", "file", "/etc/passwd"), "'/etc/passwd' is not a plain file name"),
    (_set("graphs", "encoder", "file", ".."), "'..' is not a plain file name"),
    (_set("files", {"../../x": {"sha256": "0", "bytes": 1}}), "listed file '../../x' is not a plain file name"),
    (_set("tokenizer", "../tokenizer.json"), "the tokenizer is '../tokenizer.json'; a bundle's tokenizer is"),
    (_set("tokenizer", "tokenizer.json"), "tokenizer.json is not among the listed files"),
    (lambda d: [], "the manifest must be dict, not list"),
    (_set("format_version", "3"), "format version '3' is not supported"),
    (_set("format_version", 2), "format version 2 is not supported by this runtime, which reads version 4"),
    (_set("family", "swin"), "unknown model family 'swin'"),
    (_set("family", "vit"), "image_size must be a positive integer"),  # a known family, a config not of it
    (_set("cache", "ring"), "cache 'ring' is not one a encoder-decoder bundle may have"),
    (_set("cache", "buffer"), "the decoder graph's declared inputs and outputs are not those"),
    (_set("family", 3), "family must be str, not int"),
    (_set("config", "d_model", "32"), r"d_model must be an integer in \[1, 65536\], not '32'"),
    (_set("config", "n_decoder_layers", 10**9), r"n_decoder_layers must be an integer in \[1, 1024\]"),
    (_set("config", "n_heads", 5), "d_model 32 is not divisible by n_heads 5"),
    (_set("config", "pad_id", 999), "pad_id 999 is outside the vocabulary"),
    (_set("config", "position", "rotary"), "position must be sinusoidal or learned, not 'rotary'"),
    (_set("config", None), "config must be dict, not NoneType"),
    (_drop_graph, "a encoder-decoder bundle has the graphs encoder, decoder; this manifest declares encoder"),
    (_rename_input, "the decoder graph's declared inputs and outputs are not those"),
    (_set("graphs", "decoder", "inputs", "input_ids"), "graph decoder's inputs or outputs"),
    (_set("graphs", "decoder", "outputs", 0, "dtype", "complex128"), "graph decoder's inputs or outputs"),
    (_set("files", "encoder.onnx", "0" * 64), "files.encoder.onnx must be dict, not str"),
    (_set("files", "encoder.onnx", "bytes", 5), r"encoder.onnx: \d+ bytes, the manifest records 5"),
    (_set("files", "encoder.onnx", "sha256", "0" * 64), "encoder.onnx: sha256 does not match"),
    (_set("variant_parity", {"misses": "all"}), "variant_parity.misses must be list, not str"),
    (_set("transforms", [3]), "each transform must be dict, not int"),
    (_set("transforms", [{"step": "optimize"}]), "an optimize step's level must be str, not NoneType"),
    (_set("opset", None), "opset must be int"),
    (_set("generation", {"temperature": "hot"}), "bad generation defaults"),
    (_set("generation", {"beam_width": 4}), r"unknown generation settings \['beam_width'\]"),
    (_set("generation", {"top_p": 10**400}), "top_p must be a finite number"),
    (_set("format_version", 3.0), "format version 3.0 is not supported"),
    (_set("task", ["dates"]), "task must be str or NoneType"),
])
def test_a_tampered_manifest_is_refused_by_name(tmp_path: Path, edit: Any, message: str) -> None:
    bundle = copy_bundle(SINUSOIDAL, tmp_path)
    edit_manifest(bundle, edit)
    with pytest.raises(BundleError, match=message):
        Runtime(bundle)


@pytest.mark.parametrize(("text", "message"), [
    ("{", "not valid JSON"),
    ('{"format": NaN}', "NaN is not a number JSON allows"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
])
def test_a_manifest_that_is_not_json_is_refused(tmp_path: Path, text: str | bytes, message: str) -> None:
    bundle = copy_bundle(SINUSOIDAL, tmp_path)
    (bundle / MANIFEST_FILE).write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(BundleError, match=message):
        Manifest.load(bundle)


def test_a_huge_manifest_is_not_read(tmp_path: Path) -> None:
    bundle = copy_bundle(SINUSOIDAL, tmp_path)
    with open(bundle / MANIFEST_FILE, "r+b") as f:
        f.truncate(1 << 30)  # sparse: 1 GB that nothing should read
    with pytest.raises(BundleError, match="more than a manifest can be"):
        Manifest.load(bundle)


def test_a_listed_file_is_size_checked_before_it_is_hashed(tmp_path: Path) -> None:
    bundle = copy_bundle(SINUSOIDAL, tmp_path)
    with open(bundle / "big.bin", "wb") as f:
        f.truncate(50 << 30)  # sparse 50 GB: hashing it would take minutes
    edit_manifest(bundle, _set("files", "big.bin", {"sha256": "0" * 64, "bytes": 10}))
    start = time.perf_counter()
    with pytest.raises(BundleError, match=r"big\.bin: 53687091200 bytes, the manifest records 10"):
        Manifest.load(bundle)
    assert time.perf_counter() - start < 5


def test_a_symlink_out_of_the_bundle_is_refused_though_its_hash_matches(tmp_path: Path) -> None:
    bundle = copy_bundle(SINUSOIDAL, tmp_path)
    outside = tmp_path / "outside.onnx"
    (bundle / "encoder.onnx").rename(outside)
    (bundle / "encoder.onnx").symlink_to(outside)
    with pytest.raises(BundleError, match=r"encoder\.onnx: leads outside the bundle"):
        Runtime(bundle)
    (bundle / MANIFEST_FILE).rename(tmp_path / "manifest.json")
    (bundle / MANIFEST_FILE).symlink_to(tmp_path / "manifest.json")
    with pytest.raises(BundleError, match=r"edgeformer\.json: leads outside the bundle"):
        Manifest.load(bundle)


def test_a_listed_fifo_is_refused_without_being_opened(tmp_path: Path) -> None:
    bundle = copy_bundle(SINUSOIDAL, tmp_path)
    os.mkfifo(bundle / "pipe")  # opening it for reading would block for ever
    edit_manifest(bundle, _set("files", "pipe", {"sha256": "0" * 64, "bytes": 0}))
    with pytest.raises(BundleError, match="pipe: not a regular file"):
        Manifest.load(bundle)


def test_an_unlisted_file_in_the_folder_is_never_read(tmp_path: Path) -> None:
    bundle = copy_bundle(SINUSOIDAL, tmp_path)
    (bundle / "tokenizer.json").write_text("not json")  # a tokenizer the manifest does not name
    assert Runtime(bundle).tokenizer is None


def test_a_tokenizer_reads_only_listed_files(tmp_path: Path) -> None:
    bundle = with_char_tokenizer(tmp_path)
    (bundle / "tokenizer.json").write_text(json.dumps({"kind": "marian", "decode_with": "source"}))
    relist(bundle, "tokenizer.json")
    with pytest.raises(BundleError, match=r"a marian tokenizer reads source\.spm, target\.spm, vocab\.json, which the "
                                          "bundle does not list"):
        Runtime(bundle)


def test_a_graph_that_is_not_onnx_is_refused_by_name(tmp_path: Path) -> None:
    bundle = copy_bundle(SINUSOIDAL, tmp_path)
    (bundle / "decoder.onnx").write_bytes(b"\x08\x07" + os.urandom(64))
    relist(bundle, "decoder.onnx")
    with pytest.raises(BundleError, match=r"decoder\.onnx: (not an ONNX graph|onnxruntime cannot load this graph)"):
        Runtime(bundle)


@pytest.mark.parametrize(("location", "listed", "message"), [
    ("../secret.bin", False, "reads external data from '../secret.bin', which is not a file the manifest lists"),
    ("/etc/passwd", False, "reads external data from '/etc/passwd'"),
    ("weights.bin", False, "reads external data from 'weights.bin', which is not a file the manifest lists"),
    ("weights.bin", True, None),  # listed and hashed: loads, and generates what the graph with inline weights did
])
def test_external_data_is_read_only_from_listed_files(tmp_path: Path, rt: Runtime, location: str, listed: bool,
                                                      message: str | None) -> None:
    onnx = pytest.importorskip("onnx")

    bundle = copy_bundle(SINUSOIDAL, tmp_path)
    model = onnx.load(str(bundle / "encoder.onnx"))
    weight = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    if not location.startswith("/"):
        (bundle / location).write_bytes(weight.raw_data)
    _external(weight, location)
    (bundle / "encoder.onnx").write_bytes(model.SerializeToString())
    relist(bundle, "encoder.onnx", *(["weights.bin"] if listed else []))
    if message is None:
        assert Runtime(bundle).generate([[5, 6, 7]], SHORT) == rt.generate([[5, 6, 7]], SHORT)
        return
    with pytest.raises(BundleError, match=message):
        Runtime(bundle, verify=False)  # no hashing asked for: the paths are checked all the same


def _external(tensor: Any, location: str) -> None:
    from onnx import TensorProto
    from onnx.external_data_helper import set_external_data

    set_external_data(tensor, location, 0, len(tensor.raw_data))
    tensor.data_location = TensorProto.EXTERNAL
    tensor.ClearField("raw_data")


def test_external_data_is_found_wherever_a_tensor_can_sit() -> None:
    """In a function's default attribute too, and behind a tag that protobuf reads as another field than a naive
    parser would: a location that hides from the check is one that is read unchecked."""
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from edgeformer.runtime.onnx_refs import external_locations

    default = numpy_helper.from_array(np.ones(3, np.float32), "default")
    _external(default, "in-function.bin")
    function = helper.make_function("local", "F", [], ["y"], [helper.make_node("Constant", [], ["y"], value=default)],
                                    [helper.make_opsetid("", 18)])
    function.attribute_proto.append(helper.make_attribute("t", default))
    sparse_values = numpy_helper.from_array(np.ones(2, np.float32), "values")
    _external(sparse_values, "sparse.bin")
    sparse = helper.make_sparse_tensor(sparse_values, numpy_helper.from_array(np.array([0, 2], np.int64), "i"), [4])
    graph = helper.make_graph([helper.make_node("F", [], ["y"], domain="local"),
                               helper.make_node("Constant", [], ["z"], sparse_value=sparse)], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    model = helper.make_model(graph, functions=[function], opset_imports=[helper.make_opsetid("", 18),
                                                                          helper.make_opsetid("local", 1)])
    assert external_locations(model.SerializeToString()) == {"in-function.bin", "sparse.bin"}
    # ModelProto.graph's tag (field 7) written in five bytes, then with bits above 32 set: onnxruntime's protobuf
    # keeps the low 32 bits and reads field 7; a parser that kept them all would see another field, skip the graph
    graph = model.graph.SerializeToString()
    model.ClearField("graph")
    size = bytes([len(graph) & 0x7F | 0x80, len(graph) >> 7])
    for high, found in ((0x00, {"in-function.bin", "sparse.bin"}), (0x10, None)):
        tagged = model.SerializeToString() + bytes([7 << 3 | 2 | 0x80, 0x80, 0x80, 0x80, high]) + size + graph
        if found is None:
            with pytest.raises(ValueError, match="a field tag beyond 32 bits"):
                external_locations(tagged)
        else:
            assert external_locations(tagged) == found  # the graph behind the long tag was read


def test_an_id_the_tokenizer_lacks_decodes_as_a_replacement_character() -> None:
    assert CharVocab("ab").decode([4, 5, 99, 2, 4]) == "ab\N{REPLACEMENT CHARACTER}"


# -- the CLI -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "message"), [
    (["generate", "{bundle}", "5.5", "--ids"], "inputs must be space-separated token ids"),
    (["generate", "{bundle}", "5", "--ids", "--max-new-tokens", "100000", "--min-new-tokens", "100000"],
     "max_new_tokens=100000 is above this runtime's limit of 1024"),
    (["generate", "{bundle}", "5", "--ids", "--temperature", "nan", "--strategy", "sample"],
     "temperature must be a finite number, not nan"),
    (["generate", "{bundle}", " ".join(["5"] * 2000), "--ids"], "input 0 has 2000 tokens, above this runtime's limit"),
    (["generate", "{bundle}", "5", "--ids", "--limit-rows", "0"], "give a number of at least 1"),
    (["generate", "{list_manifest}", "5", "--ids"], "the manifest must be dict, not list"),
    (["info", "{list_manifest}"], "the manifest must be dict, not list"),
    (["info", "{bad_config}"], "n_heads must be an integer in"),
    (["generate", "{bundle}", "5", "--ids", "--strategy", "beam", "--length-penalty", "1e308"],
     "length_penalty must be in"),
    (["generate", "{bad_graph}", "5", "--ids"], "decoder.onnx: (not an ONNX graph|onnxruntime cannot load)"),
])
def test_cli_errors_are_one_clear_line(tmp_path: Path, args: list[str], message: str) -> None:
    paths = {"bundle": SINUSOIDAL}
    paths["list_manifest"] = copy_bundle(SINUSOIDAL, tmp_path, "list")
    edit_manifest(paths["list_manifest"], lambda d: [d])
    paths["bad_config"] = copy_bundle(SINUSOIDAL, tmp_path, "config")
    edit_manifest(paths["bad_config"], lambda d: {**d, "config": {k: v for k, v in d["config"].items()
                                                                  if k != "n_heads"}})
    paths["bad_graph"] = copy_bundle(SINUSOIDAL, tmp_path, "graph")
    (paths["bad_graph"] / "decoder.onnx").write_bytes(b"\x08\x07garbage")
    relist(paths["bad_graph"], "decoder.onnx")
    out = edgeformer(*[a.format(**paths) for a in args])
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert re.search(message, out.stderr.strip().splitlines()[-1]), out.stderr  # argparse's usage may come first


def test_cli_takes_options_after_the_inputs() -> None:
    out = edgeformer("generate", str(SINUSOIDAL), "5 6 7", "--json", "--ids", "--max-new-tokens", "3")
    assert out.returncode == 0, out.stderr
    before = edgeformer("generate", "--json", "--ids", "--max-new-tokens", "3", str(SINUSOIDAL), "5 6 7")
    assert json.loads(out.stdout)["outputs"] == json.loads(before.stdout)["outputs"]


def test_cli_shows_odd_records_as_recorded(tmp_path: Path) -> None:
    bundle = copy_bundle(SINUSOIDAL, tmp_path)
    edit_manifest(bundle, _set("parity", {"reference": "someone else's tool", "max_abs_diff": 3}))
    out = edgeformer("info", str(bundle))
    assert out.returncode == 0, out.stderr
    assert "parity at export (as recorded, not in the form this edgeformer writes)" in out.stdout
    assert "someone else's tool" in out.stdout


# -- writes --------------------------------------------------------------------------------------------------------

def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), atomic_folder(target) as tmp:
        (tmp / "a").write_text("half")
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_replace_that_fails_between_its_renames_puts_the_old_folder_back(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import edgeformer.runtime.bundle as bundle

    target = tmp_path / "out"
    with atomic_folder(target) as tmp:
        (tmp / "a").write_text("old")
    real = os.replace

    def failing(src: Any, dst: Any) -> None:
        if Path(dst) == target and ".edgeformer-" in str(src):
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(bundle.os, "replace", failing)
    with pytest.raises(OSError, match="No space left"), atomic_folder(target, force=True) as tmp:
        (tmp / "a").write_text("new")
    assert (target / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_second_writer_of_the_same_folder_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_folder(target) as tmp:
        (tmp / "a").write_text("first")
        with pytest.raises(WriteError, match="another process is writing it now"), atomic_folder(target, force=True):
            pass
    assert (target / "a").read_text() == "first"
    with pytest.raises(FileExistsError, match="already exists; pass force=True"), atomic_folder(target):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "the lock is removed when the write ends"


def test_what_a_killed_writer_left_is_cleaned_or_undone(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_folder(target) as tmp:
        (tmp / "a").write_text("old")
    # killed while writing: its temporary folder stays; killed between the two renames of a replace: the old
    # bundle is only in .out.old
    (tmp_path / ".out.edgeformer-abcd1234.tmp").mkdir()
    (tmp_path / ".out.b.edgeformer-abcd1234.tmp").mkdir()  # another target's: not ours to touch
    target.rename(tmp_path / ".out.old")
    with pytest.raises(FileExistsError), atomic_folder(target):
        pass
    assert (target / "a").read_text() == "old", "the interrupted replace is undone"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.b.edgeformer-abcd1234.tmp", "out"]
    # killed after the replace, before the old folder was removed: the next forced write goes through
    (tmp_path / ".out.old").mkdir()
    (tmp_path / ".out.old" / "x").write_text("stale")
    with atomic_folder(target, force=True) as tmp:
        (tmp / "a").write_text("new")
    assert (target / "a").read_text() == "new"
    assert not (tmp_path / ".out.old").exists()


def test_a_writer_killed_with_sigkill_leaves_a_folder_the_next_one_can_write(tmp_path: Path) -> None:
    target = tmp_path / "out"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from edgeformer.runtime.bundle import atomic_folder
        with atomic_folder(Path({str(target)!r})) as tmp:
            (tmp / "a").write_text("half")
            print("writing", flush=True)
            time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "writing"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert not target.exists()
    with atomic_folder(target) as tmp:
        (tmp / "a").write_text("whole")
    assert (target / "a").read_text() == "whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# -- properties: nothing but documented errors, whatever comes in -----------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                max_size=3), max_leaves=8)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (of keys and indices) into a JSON value."""
    found = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _paths(v, (*prefix, i))
    return found


VALID = {**json.loads((SINUSOIDAL / MANIFEST_FILE).read_text()),  # with generation defaults to tamper with too
         "generation": {"strategy": "beam", "num_beams": 2, "max_new_tokens": 4, "length_penalty": 1.0,
                        "suppress_tokens": [3], "temperature": 1.0, "top_p": 1.0, "seed": 0}}
PATHS = _paths(VALID)[1:]


@pytest.fixture(scope="module")
def random_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of a bundle whose manifest each example rewrites: nothing else in it changes."""
    return copy_bundle(SINUSOIDAL, tmp_path_factory.mktemp("random"))


@settings(max_examples=150, deadline=None)
@given(edits=st.lists(st.tuples(st.sampled_from(PATHS), JSON | st.sampled_from(["../x", "/etc/passwd", -1, 0])),
                      min_size=1, max_size=3))
def test_any_manifest_loads_or_raises_a_bundle_error(random_bundle: Path, edits: list) -> None:
    bundle = random_bundle
    manifest = json.loads(json.dumps(VALID))
    for path, value in edits:
        with contextlib.suppress(KeyError, IndexError, TypeError):  # an earlier edit replaced this path's parent
            _set(*path, value)(manifest)
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))
    with contextlib.suppress(EdgeformerError):  # BundleError, or InputError where [5, 6] is now out of vocabulary
        Runtime(bundle, threads=1, limits=Limits(source_tokens=16, new_tokens=4, rows=8)).generate([[5, 6]], SHORT)


def mostly(valid: st.SearchStrategy, invalid: st.SearchStrategy) -> st.SearchStrategy:
    """Seven draws in eight from `valid`: input that is mostly refused would test only the refusals."""
    return st.sampled_from([True] * 7 + [False]).flatmap(lambda ok: valid if ok else invalid)


TOKENS = st.lists(st.integers(0, 36), min_size=1, max_size=20)
ODD_TOKENS = st.lists(st.integers(-5, 60) | st.floats(allow_nan=True) | st.text(max_size=2) | st.none()
                      | st.booleans(), max_size=20)
INPUTS = mostly(st.lists(TOKENS, min_size=1, max_size=4),
                st.none() | st.text(max_size=5) | st.integers() | st.lists(ODD_TOKENS | st.text(max_size=3)
                                                                          | st.none(), max_size=4))
SETTINGS = st.fixed_dictionaries({
    "max_new_tokens": mostly(st.integers(1, 12), st.integers(-2, 40) | st.floats(allow_nan=True))}, optional={
    "strategy": mostly(st.sampled_from(["greedy", "beam", "sample"]), st.just("best")),
    "min_new_tokens": mostly(st.integers(0, 2), st.integers(-1, 12)),
    "num_beams": mostly(st.integers(1, 4), st.integers(-1, 0)),
    "num_return_sequences": mostly(st.just(1), st.integers(0, 3)),
    "length_penalty": mostly(st.floats(0.0, 2.0), st.floats(allow_nan=True)),
    "temperature": mostly(st.floats(0.1, 2.0), st.floats(allow_nan=True)),
    "top_k": mostly(st.integers(0, 40), st.integers(-3, -1)),
    "top_p": mostly(st.floats(0.05, 1.0), st.floats(allow_nan=True)),
    "suppress_tokens": mostly(st.tuples(st.integers(3, 28)), st.tuples(st.integers(-1, 40))),
    "seed": mostly(st.none() | st.integers(0, 5), st.integers(-3, -1)),
})


@settings(max_examples=300, deadline=None)
@given(src=INPUTS, options=SETTINGS)
def test_any_input_generates_or_raises_an_input_error(small_rt: Runtime, src: Any, options: dict) -> None:
    try:
        gen = GenerationConfig(**options)
    except InputError:
        return
    try:
        with np.errstate(divide="raise", invalid="raise"):  # no NaN or division by zero on the way
            hyps = small_rt.generate(src, gen)
    except InputError:
        return
    assert len(hyps) == len(src)
    assert all(math.isfinite(h.score) or gen.suppress_tokens for hs in hyps for h in hs)
