"""The runtime on its own: loads and verifies bundles, generates, streams, picks threads and providers, refuses bad
input clearly. These tests import neither torch nor onnx, and load bundles that ship in tests/data: they run in a
runtime-only install (numpy and onnxruntime), as test_runtime_runs_without_torch proves."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from edgeformer.runtime.bundle import MANIFEST_FILE, BundleError
from edgeformer.runtime.encoder_decoder import DECODER, ENCODER
from edgeformer.runtime.options import GenerationConfig
from edgeformer.runtime.session import SMALL_STEP_WEIGHTS, Runtime
from tests.helpers import copy_bundle, random_sources

GREEDY = GenerationConfig(max_new_tokens=12)
BEAM = GenerationConfig(strategy="beam", num_beams=4, num_return_sequences=2, max_new_tokens=12)


def test_importing_the_runtime_never_imports_torch() -> None:
    code = ("import sys; import edgeformer.runtime.session, edgeformer.runtime.bundle, edgeformer.runtime.classifier, "
            "edgeformer.cli; "
            "bad = [m for m in ('torch', 'onnx', 'safetensors') if m in sys.modules]; "
            "assert not bad, bad; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_streaming_yields_the_same_tokens_as_generate(shipped_bundle) -> None:
    bundle = shipped_bundle("post-sinusoidal")
    rt = Runtime(bundle)
    src = [5, 6, 7, 8, 9]
    assert list(rt.stream(src, GREEDY)) == rt.generate([src], GREEDY)[0][0].tokens
    sampled = GenerationConfig(strategy="sample", seed=4, max_new_tokens=10)
    assert list(rt.stream(src, sampled)) == rt.generate([src], sampled)[0][0].tokens


def test_concurrent_generate_calls_equal_serial_ones(shipped_bundle) -> None:
    bundle = shipped_bundle("post-sinusoidal")
    rt = Runtime(bundle, threads=1)
    batches = [random_sources(6, 37, seed=s) for s in range(16)]
    gens = [GREEDY, BEAM] * 8
    serial = [rt.generate(b, g) for b, g in zip(batches, gens, strict=True)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(rt.generate, batches, gens))
    assert parallel == serial


def test_runtime_reports_the_provider_that_runs_and_falls_back_in_order(shipped_bundle) -> None:
    bundle = shipped_bundle("post-sinusoidal")
    rt = Runtime(bundle, providers=["cuda", "cpu"])
    expected = "CUDAExecutionProvider" if "CUDAExecutionProvider" in ort.get_available_providers() else \
        "CPUExecutionProvider"
    assert rt.provider == expected
    with pytest.raises(ValueError, match="unknown execution provider 'tpu'"):
        Runtime(bundle, providers=["tpu"])


@pytest.mark.parametrize("spin", [True, False])
def test_encoder_threads_stop_spinning_when_its_run_returns_and_decoder_threads_between_steps_do_not(
        shipped_bundle, spin: bool) -> None:
    """Left spinning, the encoder session's idle threads took the cores the decoder's steps needed; stopped after
    each step, the decoder's threads had to be woken for the next one (a 4 ms tick on a 2-vCPU VM)."""
    bundle = shipped_bundle("post-sinusoidal")
    rt = Runtime(bundle, threads=2, spin=spin)
    for name, session in rt.sessions.items():
        options = session.get_session_options()
        assert options.get_session_config_entry("session.force_spinning_stop") == ("1" if name == ENCODER else "0")
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spin else "0")


def test_small_steps_run_on_a_one_thread_decoder_and_large_ones_on_the_threads_asked(shipped_bundle) -> None:
    """One thread was faster for the shipped model's steps at small batches, two at large ones."""
    bundle = shipped_bundle("post-sinusoidal")
    rt = Runtime(bundle, threads=2)
    large = SMALL_STEP_WEIGHTS // rt.step_weights + 1  # rows
    assert rt.sessions[ENCODER].get_session_options().intra_op_num_threads == 2
    for rows, threads in ((1, 1), (large - 1, 1), (large, 2)):
        session, used = rt.decoder(rows)
        assert used == threads == session.get_session_options().intra_op_num_threads
        ids = np.full((rows, 3), 5, dtype=np.int64)
        assert rt.step_model(ids, np.ones_like(ids), 1).session is session


@pytest.mark.parametrize(("options", "threads"), [({"threads": 2, "decoder_threads": 2}, 2), ({"threads": 1}, 1),
                                                  ({"threads": 2, "decoder_threads": 1}, 1)])
def test_threads_given_for_the_decoder_hold_at_every_batch(shipped_bundle, options: dict[str, int],
                                                           threads: int) -> None:
    bundle = shipped_bundle("post-sinusoidal")
    rt = Runtime(bundle, **options)
    assert rt.one_thread_decoder is None
    assert rt.decoder(1) == (rt.sessions[DECODER], threads)
    assert rt.sessions[DECODER].get_session_options().intra_op_num_threads == threads


def test_the_one_thread_decoder_generates_what_the_two_thread_one_does(shipped_bundle) -> None:
    bundle = shipped_bundle("post-sinusoidal")
    src = random_sources(6, 37, seed=3)
    assert Runtime(bundle, threads=2).generate(src, BEAM) == Runtime(bundle, threads=2, decoder_threads=2).generate(
        src, BEAM)


@pytest.mark.parametrize("threads", [{"threads": 0}, {"decoder_threads": -1}])
def test_a_thread_count_below_one_is_refused(shipped_bundle, threads: dict[str, int]) -> None:
    bundle = shipped_bundle("post-sinusoidal")
    with pytest.raises(ValueError, match="give a number of threads in"):
        Runtime(bundle, **threads)


@pytest.mark.parametrize(("src", "gen", "message"), [
    ([[5, 99]], GREEDY, r"input 0 has token ids \[99\] outside the source vocabulary \[0, 37\)"),
    ([[5, -1]], GREEDY, "outside the source vocabulary"),
    ([], GREEDY, "no inputs"),
    ([[5], []], GREEDY, "input 1 is empty"),
    ([[5]], GenerationConfig(suppress_tokens=(99,)), r"suppress_tokens \[99\] reach outside the target vocabulary"),
])
def test_bad_input_is_a_clear_error(shipped_bundle, src, gen, message: str) -> None:
    bundle = shipped_bundle("post-sinusoidal")
    with pytest.raises(ValueError, match=message):
        Runtime(bundle).generate(src, gen)


def test_input_longer_than_learned_positions_is_refused(shipped_bundle) -> None:
    bundle = shipped_bundle("pre-learned-gelu")
    rt = Runtime(bundle)
    with pytest.raises(ValueError, match="input 0 has 65 tokens, more than this model's 64 learned positions"):
        rt.generate([[5] * 65], GREEDY)
    with pytest.raises(ValueError, match="max_new_tokens=100 exceeds"):
        rt.generate([[5]], GenerationConfig(max_new_tokens=100))


def test_tampered_file_is_named(shipped_bundle, tmp_path: Path) -> None:
    bundle = copy_bundle(shipped_bundle("post-sinusoidal"), tmp_path)
    data = bytearray((bundle / "decoder.onnx").read_bytes())
    data[-1] ^= 1  # one bit, the size unchanged
    (bundle / "decoder.onnx").write_bytes(data)
    with pytest.raises(BundleError, match=r"decoder.onnx: sha256 does not match"):
        Runtime(bundle)


def test_missing_file_is_named(shipped_bundle, tmp_path: Path) -> None:
    bundle = copy_bundle(shipped_bundle("post-sinusoidal"), tmp_path)
    (bundle / "encoder.onnx").unlink()
    with pytest.raises(BundleError, match=r"encoder.onnx: missing from the bundle"):
        Runtime(bundle)


def test_newer_format_version_is_refused(shipped_bundle, tmp_path: Path) -> None:
    bundle = copy_bundle(shipped_bundle("post-sinusoidal"), tmp_path)
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    manifest["format_version"] = 99
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format version 99 is not supported"):
        Runtime(bundle)


def test_not_a_bundle_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no such bundle folder"):
        Runtime(tmp_path / "nothing")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(BundleError, match=r"edgeformer\.json: missing"):
        Runtime(tmp_path / "empty")


def test_padded_batch_gives_what_each_input_gives_alone(shipped_bundle) -> None:
    bundle = shipped_bundle("pre-learned-gelu")
    rt = Runtime(bundle)
    src = random_sources(12, 37, seed=8, longest=30)
    batch = rt.generate(src, BEAM)
    for s, hyps in zip(src, batch, strict=True):
        assert rt.generate([s], BEAM)[0][0].tokens == hyps[0].tokens


def test_runtime_runs_without_torch(tmp_path: Path) -> None:
    """This file's tests, in a process where torch, onnx and safetensors cannot be imported: a runtime-only install."""
    code = ("import sys; sys.modules.update(dict.fromkeys(('torch', 'onnx', 'safetensors'))); import pytest; "
            f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-k', 'not runs_without_torch', {__file__!r}]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "failed" not in out.stdout



def test_the_manifest_records_the_onnxruntime_that_runs_not_another_wheels_metadata(monkeypatch) -> None:
    """onnxruntime-gpu installs the `onnxruntime` module under its own distribution name; the CPU wheel's metadata
    can stay beside it. The version recorded is the imported module's."""
    import types

    from edgeformer.runtime.bundle import producer_versions

    assert producer_versions(("onnxruntime",)) == {"onnxruntime": ort.__version__}
    monkeypatch.setitem(sys.modules, "onnxruntime", types.SimpleNamespace(__version__="9.9.9"))
    assert producer_versions(("onnxruntime", "numpy"))["onnxruntime"] == "9.9.9"
    assert "no-such-package" not in producer_versions(("no-such-package",))


def test_score_sums_the_log_probabilities_the_search_summed(shipped_bundle) -> None:
    from edgeformer.runtime.errors import InputError

    rt = Runtime(shipped_bundle("post-sinusoidal"))
    src = random_sources(6, 37, seed=9)
    gen = GenerationConfig(strategy="greedy", max_new_tokens=12)
    hyps = [h[0] for h in rt.generate(src, gen)]
    eos = int(rt.config["eos_id"])
    ended = [[*h.tokens, eos] if len(h.tokens) < gen.max_new_tokens else h.tokens for h in hyps]
    assert np.allclose(rt.score(src, ended, gen), [h.score for h in hyps], atol=1e-4)
    # greedy took the best token at each step: any other first token scores lower
    other = [[(t[0] + 1) % int(rt.config["tgt_vocab_size"]), *t[1:]] for t in ended]
    assert all(o < s for o, s in zip(rt.score(src, other, gen), rt.score(src, ended, gen), strict=True))
    # a prefix shorter than min_new_tokens scores with EOS still masked (the check scores where two answers part)
    first = [t[:1] for t in ended]
    assert rt.score(src, first, dataclasses.replace(gen, min_new_tokens=3)) == rt.score(src, first, gen)
    with pytest.raises(InputError, match="one target"):
        rt.score(src, ended[:-1], gen)
    with pytest.raises(InputError, match="target 0"):
        rt.score(src[:1], [[10**6]], gen)


def test_every_cpu_session_of_an_encoder_decoder_leaves_out_the_residual_norm_fusion(shipped_bundle,
                                                                                     monkeypatch) -> None:
    """onnxruntime's CPU SkipLayerNormalization runs slower than the Add and LayerNormalization it replaces
    (benchmarks/fusions.py), and onnxruntime would fuse them at load: each session the runtime opens disables it."""
    from edgeformer.runtime import engine

    opened: list[tuple[str, list[str]]] = []
    real = ort.InferenceSession

    def spy(path: str, options: ort.SessionOptions, **kwargs: Any) -> ort.InferenceSession:
        opened.append((Path(path).name, kwargs.get("disabled_optimizers") or []))
        return real(path, options, **kwargs)

    monkeypatch.setattr(engine.ort, "InferenceSession", spy)
    Runtime(shipped_bundle("post-sinusoidal"))
    assert {name for name, _ in opened} == {"encoder.onnx", "decoder.onnx"}
    assert all("SkipLayerNormFusion" in disabled for _, disabled in opened)
