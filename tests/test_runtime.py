"""The runtime: loads and verifies bundles, generates like PyTorch, refuses bad input clearly, never needs torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgeformer.model.checkpoint import default_checkpoint
from edgeformer.model.config import BASE_SIZE, TransformerConfig
from edgeformer.model.generate import generate
from edgeformer.model.tasks import get_task
from edgeformer.runtime.bundle import MANIFEST_FILE, BundleError
from edgeformer.runtime.encoder_decoder import DECODER, ENCODER
from edgeformer.runtime.options import GenerationConfig
from edgeformer.runtime.session import SMALL_STEP_WEIGHTS, Runtime, step_weights
from tests.helpers import random_sources

GREEDY = GenerationConfig(max_new_tokens=12)
BEAM = GenerationConfig(strategy="beam", num_beams=4, num_return_sequences=2, max_new_tokens=12)


def test_importing_the_runtime_never_imports_torch() -> None:
    code = ("import sys; import edgeformer.runtime.session, edgeformer.runtime.bundle, edgeformer.cli; "
            "bad = [m for m in ('torch', 'onnx', 'safetensors') if m in sys.modules]; "
            "assert not bad, bad; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize("variant", ["post-sinusoidal", "pre-learned-gelu", "shared-untied", "marian-like"])
@pytest.mark.parametrize("gen", [GREEDY, BEAM], ids=["greedy", "beam"])
def test_runtime_equals_pytorch_token_for_token_on_padded_batches(exported, variant: str,
                                                                  gen: GenerationConfig) -> None:
    model, bundle = exported(variant)
    rt = Runtime(bundle)
    src = random_sources(120, model.config.src_vocab_size, seed=1)
    for i in range(0, len(src), 24):  # padded batches of 24 mixed lengths
        ours, ref = rt.generate(src[i: i + 24], gen), generate(model, src[i: i + 24], gen)
        assert [[h.tokens for h in hs] for hs in ours] == [[h.tokens for h in hs] for hs in ref]
        for hs_ours, hs_ref in zip(ours, ref, strict=True):
            assert [h.score for h in hs_ours] == pytest.approx([h.score for h in hs_ref], abs=1e-3)


def test_shipped_model_accuracy_through_the_runtime_equals_pytorch(exported) -> None:
    model, bundle = exported("demo")
    rt = Runtime(bundle)
    assert rt.tokenizer is not None
    pairs = get_task("dates").pairs(300, "test", seed=5)
    src = rt.tokenizer.encode_batch([s for s, _ in pairs])
    ours = [rt.tokenizer.target.decode(h[0].tokens) for h in rt.generate(src)]
    ref = [rt.tokenizer.target.decode(h[0].tokens) for h in generate(model, src)]
    assert ours == ref
    assert sum(o == t for o, (_, t) in zip(ours, pairs, strict=True)) / len(pairs) >= 0.99


def test_text_in_text_out(exported) -> None:
    _, bundle = exported("demo")
    assert Runtime(bundle).translate(["5 mars 1998", "Thursday, July 4, 2024"]) == ["1998-03-05", "2024-07-04"]


def test_streaming_yields_the_same_tokens_as_generate(exported) -> None:
    _, bundle = exported("post-sinusoidal")
    rt = Runtime(bundle)
    src = [5, 6, 7, 8, 9]
    assert list(rt.stream(src, GREEDY)) == rt.generate([src], GREEDY)[0][0].tokens
    sampled = GenerationConfig(strategy="sample", seed=4, max_new_tokens=10)
    assert list(rt.stream(src, sampled)) == rt.generate([src], sampled)[0][0].tokens


def test_seeded_sampling_matches_pytorch(exported) -> None:
    model, bundle = exported("post-sinusoidal")
    gen = GenerationConfig(strategy="sample", seed=9, temperature=1.3, top_p=0.9, max_new_tokens=10)
    src = random_sources(10, 37, seed=2)
    assert ([h[0].tokens for h in Runtime(bundle).generate(src, gen)]
            == [h[0].tokens for h in generate(model, src, gen)])


def test_concurrent_generate_calls_equal_serial_ones(exported) -> None:
    _, bundle = exported("post-sinusoidal")
    rt = Runtime(bundle, threads=1)
    batches = [random_sources(6, 37, seed=s) for s in range(16)]
    gens = [GREEDY, BEAM] * 8
    serial = [rt.generate(b, g) for b, g in zip(batches, gens, strict=True)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(rt.generate, batches, gens))
    assert parallel == serial


def test_runtime_reports_the_provider_that_runs_and_falls_back_in_order(exported) -> None:
    _, bundle = exported("post-sinusoidal")
    rt = Runtime(bundle, providers=["cuda", "cpu"])
    expected = "CUDAExecutionProvider" if "CUDAExecutionProvider" in ort.get_available_providers() else \
        "CPUExecutionProvider"
    assert rt.provider == expected
    with pytest.raises(ValueError, match="unknown execution provider 'tpu'"):
        Runtime(bundle, providers=["tpu"])


@pytest.mark.parametrize("spin", [True, False])
def test_encoder_threads_stop_spinning_when_its_run_returns_and_decoder_threads_between_steps_do_not(
        exported, spin: bool) -> None:
    """Left spinning, the encoder session's idle threads took the cores the decoder's steps needed; stopped after
    each step, the decoder's threads had to be woken for the next one (a 4 ms tick on a 2-vCPU VM)."""
    _, bundle = exported("post-sinusoidal")
    rt = Runtime(bundle, threads=2, spin=spin)
    for name, session in rt.sessions.items():
        options = session.get_session_options()
        assert options.get_session_config_entry("session.force_spinning_stop") == ("1" if name == ENCODER else "0")
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spin else "0")


def test_the_shipped_models_steps_count_as_small_and_transformer_bases_do_not() -> None:
    shipped = json.loads((default_checkpoint() / "config.json").read_text())
    base = TransformerConfig(**BASE_SIZE).to_dict()
    assert step_weights(base) == 6 * (6 * 512 * 512 + 2 * 512 * 2048) + 512 * 32000
    assert step_weights(shipped) < SMALL_STEP_WEIGHTS < step_weights(base)
    assert 6 * step_weights(shipped) < SMALL_STEP_WEIGHTS < 7 * step_weights(shipped)  # up to batch 6 (README)


def test_small_steps_run_on_a_one_thread_decoder_and_large_ones_on_the_threads_asked(exported) -> None:
    """One thread was faster for the shipped model's steps at small batches, two at large ones."""
    _, bundle = exported("post-sinusoidal")
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
def test_threads_given_for_the_decoder_hold_at_every_batch(exported, options: dict[str, int], threads: int) -> None:
    _, bundle = exported("post-sinusoidal")
    rt = Runtime(bundle, **options)
    assert rt.one_thread_decoder is None
    assert rt.decoder(1) == (rt.sessions[DECODER], threads)
    assert rt.sessions[DECODER].get_session_options().intra_op_num_threads == threads


def test_the_one_thread_decoder_generates_what_the_two_thread_one_does(exported) -> None:
    _, bundle = exported("post-sinusoidal")
    src = random_sources(6, 37, seed=3)
    assert Runtime(bundle, threads=2).generate(src, BEAM) == Runtime(bundle, threads=2, decoder_threads=2).generate(
        src, BEAM)


@pytest.mark.parametrize("threads", [{"threads": 0}, {"decoder_threads": -1}])
def test_a_thread_count_below_one_is_refused(exported, threads: dict[str, int]) -> None:
    _, bundle = exported("post-sinusoidal")
    with pytest.raises(ValueError, match="give a positive number of threads"):
        Runtime(bundle, **threads)


@pytest.mark.parametrize(("src", "gen", "message"), [
    ([[5, 99]], GREEDY, r"input 0 has token ids \[99\] outside the source vocabulary \[0, 37\)"),
    ([[5, -1]], GREEDY, "outside the source vocabulary"),
    ([], GREEDY, "no inputs"),
    ([[5], []], GREEDY, "input 1 is empty"),
    ([[5]], GenerationConfig(suppress_tokens=(99,)), r"suppress_tokens \[99\] reach outside the target vocabulary"),
])
def test_bad_input_is_a_clear_error(exported, src, gen, message: str) -> None:
    _, bundle = exported("post-sinusoidal")
    with pytest.raises(ValueError, match=message):
        Runtime(bundle).generate(src, gen)


def test_input_longer_than_learned_positions_is_refused(exported) -> None:
    _, bundle = exported("pre-learned-gelu")
    rt = Runtime(bundle)
    with pytest.raises(ValueError, match="exceeds this model's 64 learned positions"):
        rt.generate([[5] * 65], GREEDY)
    with pytest.raises(ValueError, match="max_new_tokens=100 exceeds"):
        rt.generate([[5]], GenerationConfig(max_new_tokens=100))


def copy_bundle(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "bundle"))


def test_tampered_file_is_named(exported, tmp_path: Path) -> None:
    bundle = copy_bundle(exported("post-sinusoidal")[1], tmp_path)
    with open(bundle / "decoder.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match=r"decoder.onnx: sha256 does not match"):
        Runtime(bundle)


def test_missing_file_is_named(exported, tmp_path: Path) -> None:
    bundle = copy_bundle(exported("post-sinusoidal")[1], tmp_path)
    (bundle / "encoder.onnx").unlink()
    with pytest.raises(BundleError, match=r"encoder.onnx: missing from the bundle"):
        Runtime(bundle)


def test_newer_format_version_is_refused(exported, tmp_path: Path) -> None:
    bundle = copy_bundle(exported("post-sinusoidal")[1], tmp_path)
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


@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="no CUDA: onnxruntime-gpu with a CUDA GPU is needed for the CUDA parity test")
def test_cuda_runtime_equals_pytorch(exported) -> None:
    model, bundle = exported("post-sinusoidal")
    rt = Runtime(bundle, providers=["cuda"])
    assert rt.provider == "CUDAExecutionProvider"
    src = random_sources(48, 37, seed=3)
    for gen in (GREEDY, BEAM):
        assert ([[h.tokens for h in hs] for hs in rt.generate(src, gen)]
                == [[h.tokens for h in hs] for hs in generate(model, src, gen)])


def test_padded_batch_gives_what_each_input_gives_alone(exported) -> None:
    _, bundle = exported("pre-learned-gelu")
    rt = Runtime(bundle)
    src = random_sources(12, 37, seed=8, longest=30)
    batch = rt.generate(src, BEAM)
    for s, hyps in zip(src, batch, strict=True):
        assert rt.generate([s], BEAM)[0][0].tokens == hyps[0].tokens


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_suppressed_tokens_never_appear_and_forced_eos_ends_on_the_last_step(exported, strategy: str) -> None:
    model, bundle = exported("post-sinusoidal")
    rt = Runtime(bundle)
    src = random_sources(12, model.config.src_vocab_size, seed=3)
    free = rt.generate(src, GenerationConfig(strategy=strategy, max_new_tokens=8, ignore_eos=True))
    common = Counter(t for hs in free for t in hs[0].tokens).most_common(1)[0][0]
    gen = GenerationConfig(strategy=strategy, max_new_tokens=8, suppress_tokens=(common,))
    suppressed = rt.generate(src, gen)
    assert all(common not in hs[0].tokens for hs in suppressed)
    assert [[h.tokens for h in hs] for hs in suppressed] == [[h.tokens for h in hs] for hs in generate(model, src, gen)]
    forced = rt.generate(src, GenerationConfig(strategy=strategy, max_new_tokens=4, forced_eos=True))
    assert all(len(h.tokens) <= 3 for hs in forced for h in hs)  # the 4th token can only be EOS
