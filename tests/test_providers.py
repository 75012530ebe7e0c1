"""Execution providers: plugin packages found and registered for real, choices by name and device, what cannot be
had here a note naming which and why then the next choice, a second real provider (ggml's plugin on the CPU; OpenVINO
through the onnxruntime-openvino wheel in .venv-openvino) giving the CPU's tokens, and the bench across providers."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from edgeformer.runtime import providers as P
from edgeformer.runtime.errors import InputError, ProviderFallback
from edgeformer.runtime.session import Runtime
from tests.helpers import edgeformer, random_sources

ROOT = Path(__file__).resolve().parents[1]
OPENVINO_PYTHON = ROOT / ".venv-openvino" / "bin" / "python"


def plugin(distribution: str) -> P.Plugin:
    found = next((p for p in P.plugins() if p.distribution == distribution), None)
    if found is None:
        pytest.skip(f"{distribution} is not installed (scripts/setup.sh installs it)")
    return found


def offered(provider: str) -> list[P.Device]:
    return [d for d in P.devices() if d.provider == provider]


def tokens(rt: Runtime, sources: list[list[int]], beams: int = 1) -> list[list[int]]:
    gen = rt.generation_config(strategy="beam" if beams > 1 else "greedy", num_beams=beams, max_new_tokens=12,
                               num_return_sequences=1)
    return [h[0].tokens for h in rt.generate(sources, gen)]


def quiet_runtime(bundle: Path, choices: list[str]) -> Runtime:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProviderFallback)
        return Runtime(bundle, providers=choices, threads=2)


def test_the_cpu_alone_registers_no_plugin() -> None:
    # loading OpenVINO's libraries costs a user who asked for the CPU nothing: nothing is registered
    code = ("import sys; from edgeformer.runtime import providers as P; from edgeformer.runtime.session import Runtime;"
            "Runtime('tests/data/post-sinusoidal', providers=['cpu']); P.placements('cpu');"
            "print(P.plugins.cache_info().currsize, 'onnxruntime_ggml' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["0", "False"]


def here(provider: str) -> bool:
    return provider in P.built_in() or bool(offered(provider))


def ggml_sees_no_gpu() -> None:
    plugin("onnxruntime-ggml")
    if any(d.kind != "CPU" for d in offered("ggml")):
        pytest.skip("ggml offers a GPU here (Vulkan or Metal)")


def test_plugin_packages_are_found_by_name_and_registered() -> None:
    for distribution, provider in (("onnxruntime-ggml", "ggml"), ("onnxruntime-ep-openvino",
                                                                   "OpenVINOExecutionProvider"),
                                   ("onnxruntime-ep-webgpu", "WebGpuExecutionProvider")):
        found = plugin(distribution)
        assert found.problem == "" and provider in found.providers and Path(found.library).is_file()
    # ggml offers (at least) the CPU device onnxruntime sees, next to the CPU provider's own
    cpu = offered(P.CPU)[0]
    assert any((d.kind, d.vendor) == (cpu.kind, cpu.vendor) for d in offered("ggml"))
    # and every device is named by a choice that takes it
    for d in P.devices():
        assert P.require(d.label).provider == d.provider


@pytest.mark.parametrize(("distribution", "name", "provider"), [
    ("onnxruntime-ep-openvino", "openvino:CPU", "OpenVINOExecutionProvider"),  # Intel devices only
    ("onnxruntime-ep-webgpu", "webgpu", "WebGpuExecutionProvider"),  # a GPU only
])
def test_a_plugin_that_lists_no_device_is_a_note_and_the_next_choice_runs(shipped_bundle, distribution: str,
                                                                          name: str, provider: str) -> None:
    found = plugin(distribution)
    if offered(provider):
        pytest.skip(f"{provider} offers a device on this machine")
    with pytest.warns(ProviderFallback) as caught:
        rt = Runtime(shipped_bundle("post-sinusoidal"), providers=[name, "cpu"], threads=2)
    expected = (f"{name}: {distribution} {found.version} is installed and registered, but {provider} lists no "
                "device on this machine (onnxruntime sees: CPU ")
    assert str(caught[0].message).startswith(expected)
    assert rt.provider == P.CPU and rt.provider_notes == [str(caught[0].message)]


@pytest.mark.filterwarnings("ignore:Specified provider")  # onnxruntime's own, as it refuses the provider
def test_a_provider_that_cannot_take_a_graph_is_a_note_and_the_next_choice_takes_it(shipped_bundle, capsys) -> None:
    from edgeformer.runtime.engine import open_first, session_options

    # onnxruntime refuses this one when the session opens, as a provider that fails on a graph does
    broken = P.Placement("broken", "NoSuchExecutionProvider", providers=(("NoSuchExecutionProvider", ()),))
    chain, notes = [broken, P.CPU_PLACEMENT], []
    session = open_first(shipped_bundle("post-sinusoidal") / "encoder.onnx", session_options, chain, notes)
    assert session.get_providers() == [P.CPU] and chain == [P.CPU_PLACEMENT]
    assert notes[0].startswith("broken cannot take encoder.onnx (") and notes[0].endswith("; next: cpu")
    assert capsys.readouterr().out == ""  # onnxruntime's own fallback, which prints its error, is off


def test_ggml_runs_the_encoder_with_the_cpus_tokens_and_says_it_takes_no_decoder(exported) -> None:
    ggml_sees_no_gpu()
    _, bundle = exported("post-sinusoidal")
    cpu, rt = Runtime(bundle, threads=2), quiet_runtime(bundle, ["ggml:CPU"])
    assert rt.assigned["encoder.onnx"]["ggml"] == sum(rt.assigned["encoder.onnx"].values()) > 0
    # the decoder's search head (LogSoftmax) is an operator ggml lacks: it takes nothing, and says so
    assert rt.assigned["decoder.onnx"].get("ggml", 0) == 0 and rt.provider == P.CPU
    assert any("took none of decoder.onnx's" in n for n in rt.provider_notes)
    sources = random_sources(12, int(cpu.config["src_vocab_size"]), seed=3)
    assert tokens(rt, sources) == tokens(cpu, sources)
    assert tokens(rt, sources, beams=4) == tokens(cpu, sources, beams=4)
    ids = np.array([s[:5] + [0] * (5 - len(s[:5])) for s in sources[:4]])
    a, b = rt.step_model(ids, (ids != 0).astype(np.int64), 1, 4), cpu.step_model(ids, (ids != 0).astype(np.int64),
                                                                                1, 4)
    step = np.full(4, int(cpu.config["bos_id"]), dtype=np.int64)
    # ggml's own kernels round differently from onnxruntime's: close, not equal
    assert np.abs(a.log_probs(step) - b.log_probs(step)).max() < 2e-2


@pytest.mark.parametrize(("choice", "why"), [
    ("ggml:gpu", "ggml:gpu: ggml offers ggml:CPU here, none of them 'gpu'"),
    ("cuda:0", "cuda:0: CUDAExecutionProvider is not in this onnxruntime"),
])
def test_a_choice_that_cannot_be_had_is_a_note_that_says_why(choice: str, why: str) -> None:
    if choice.startswith("ggml"):
        ggml_sees_no_gpu()
    if choice.startswith("cuda") and here("CUDAExecutionProvider"):
        pytest.skip("CUDA is here")
    usable, notes = P.placements([choice, "cpu"])
    assert usable == [P.CPU_PLACEMENT] and notes[0].startswith(why)
    if choice.startswith("cuda"):
        assert "it comes with onnxruntime-gpu" in notes[0]


@pytest.mark.parametrize("bad", ["nosuch", "cpu:gpu", "auto:fastest", "", [], [3], "cuda,,"])
def test_a_name_that_means_nothing_is_an_input_error(bad: object) -> None:
    with pytest.raises(InputError):
        P.placements(bad)  # type: ignore[arg-type]


def test_names_short_long_and_case_insensitive_are_one_provider() -> None:
    ggml_sees_no_gpu()
    for name in ("ggml", "GGML", "ggml:CPU", "ggml:0"):
        assert P.placements([name])[0][0].provider == "ggml"
    assert P.placements("ggml, ggml:CPU, cpu, CPUExecutionProvider")[0] == [P.placements("ggml")[0][0],
                                                                            P.CPU_PLACEMENT]
    if not here("CUDAExecutionProvider"):  # a provider's own name, absent here: a note
        usable, notes = P.placements(["CUDAExecutionProvider", "cuda"])
        assert usable == [P.CPU_PLACEMENT] and len(notes) == 2 and "onnxruntime-gpu" in notes[0]


def test_auto_lets_onnxruntime_choose_by_its_policy(exported) -> None:
    _, bundle = exported("post-sinusoidal")
    for choice in ("auto", "auto:prefer_cpu", "auto:max_efficiency"):
        rt = quiet_runtime(bundle, [choice])
        assert rt.placements[0].policy == (choice.partition(":")[2] or P.AUTO_POLICY)
        assert rt.provider in (P.CPU, *(d.provider for d in P.devices()))
        assert tokens(rt, [[5, 6, 7]]) == tokens(Runtime(bundle, threads=2), [[5, 6, 7]])


def test_openvino_runs_the_bundle_with_the_cpus_tokens_in_its_own_python(shipped_bundle) -> None:
    if not OPENVINO_PYTHON.exists():
        pytest.skip("no .venv-openvino (scripts/setup.sh makes it: onnxruntime-openvino, which replaces onnxruntime)")
    bundle = shipped_bundle("post-sinusoidal")
    sources = random_sources(8, 30, seed=5)
    code = ("import json, sys, warnings; from edgeformer.runtime.session import Runtime;"
            "warnings.simplefilter('ignore');"
            "rt = Runtime(sys.argv[1], providers=[sys.argv[2]], threads=2);"
            "g = rt.generation_config(strategy='greedy', max_new_tokens=12, num_return_sequences=1);"
            "b = rt.generation_config(strategy='beam', num_beams=4, max_new_tokens=12, num_return_sequences=1);"
            "src = json.loads(sys.argv[3]);"
            "print(json.dumps({'provider': rt.provider, 'assigned': rt.assigned, 'notes': rt.provider_notes,"
            "'greedy': [h[0].tokens for h in rt.generate(src, g)],"
            "'beam': [h[0].tokens for h in rt.generate(src, b)]}))")
    run = subprocess.run([str(OPENVINO_PYTHON), "-c", code, str(bundle), "openvino:CPU", json.dumps(sources)],
                         capture_output=True, text=True, cwd=ROOT, check=False, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["provider"] == "OpenVINOExecutionProvider" and got["notes"] == []
    for graph in ("encoder.onnx", "decoder.onnx"):  # every node on OpenVINO
        assert got["assigned"][graph].get("OpenVINOExecutionProvider") == sum(got["assigned"][graph].values())
    cpu = Runtime(bundle, threads=2)
    assert got["greedy"] == tokens(cpu, sources) and got["beam"] == tokens(cpu, sources, beams=4)
    # a device OpenVINO does not offer here: a note, then the CPU
    run = subprocess.run([str(OPENVINO_PYTHON), "-c", code, str(bundle), "openvino:NPU", json.dumps(sources[:1])],
                         capture_output=True, text=True, cwd=ROOT, check=False, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["provider"] == P.CPU and got["notes"][0].startswith("openvino:NPU: OpenVINOExecutionProvider offers")


def test_a_variant_made_where_openvino_runs_is_checked_there_and_says_so(shipped_bundle, tmp_path: Path) -> None:
    if not OPENVINO_PYTHON.exists():
        pytest.skip("no .venv-openvino (scripts/setup.sh makes it: onnxruntime-openvino, which replaces onnxruntime)")
    out = tmp_path / "int8-static"
    verb = ["quantize", str(shipped_bundle("post-sinusoidal")), str(out), "--to", "int8", "--method", "static",
            "--check-on", "openvino", "--eval-size", "16"]
    run = subprocess.run([str(OPENVINO_PYTHON), "-m", "edgeformer.cli", *verb], capture_output=True, text=True,
                         cwd=ROOT, check=False, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    from edgeformer.runtime.bundle import Manifest

    cpu, openvino = Manifest.load(out).variant_parity["checked_on"]
    assert cpu["choice"] == "cpu" and openvino["provider"] == openvino["asked"] == "OpenVINOExecutionProvider"
    for counts in openvino["nodes"].values():  # static QDQ int8 runs on OpenVINO whole
        assert counts == {"OpenVINOExecutionProvider": sum(counts.values())}
    assert openvino["greedy_token_agreement"] >= 0.9


def test_providers_command_lists_devices_plugins_without_one_and_how_bundles_run(shipped_bundle) -> None:
    ggml = plugin("onnxruntime-ggml")
    bundle = shipped_bundle("post-sinusoidal")
    out = edgeformer("providers", str(bundle), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    rows = {r["choice"]: r for r in report["providers"]}
    assert rows["cpu"]["provider"] == P.CPU and rows["ggml:CPU"]["from"] == f"onnxruntime-ggml {ggml.version}"
    if not offered("WebGpuExecutionProvider"):
        webgpu = next(r for r in report["providers"] if r["provider"] == "WebGpuExecutionProvider")
        assert webgpu["status"] == "registered, lists no device on this machine" and webgpu["choice"] == "-"
    runs = {r["choice"]: r for r in report["variants"]}
    assert runs["ggml:CPU"]["tokens as CPU"] is True and runs["ggml:CPU"]["nodes"]["encoder.onnx"]["ggml"] > 0
    text = edgeformer("providers", str(bundle))
    assert "ggml:CPU" in text.stdout and "nodes on the provider asked" in text.stdout
    assert "note: post-sinusoidal on ggml:CPU: ggml:CPU took none of decoder.onnx's" in text.stdout


def test_a_variant_checked_on_several_providers_records_each(exported, tmp_path: Path) -> None:
    from edgeformer.export.parity import ParityError
    from edgeformer.runtime.bundle import Manifest
    from edgeformer.transforms.derive import Judging, quantize

    ggml_sees_no_gpu()
    _, bundle = exported("post-sinusoidal")
    quantize(bundle, tmp_path / "fp16", to="fp16", judging=Judging(inputs=16, check_on=("ggml",)))
    checked = Manifest.load(tmp_path / "fp16").variant_parity["checked_on"]
    assert [c["choice"] for c in checked] == ["cpu", "ggml"]
    assert checked[1]["asked"] == "ggml" and checked[1]["nodes"]["encoder.onnx"]["ggml"] > 0
    assert checked[1]["greedy_token_agreement"] >= 0.99
    # int8's operators are none that ggml takes: checked "on ggml" it would be checked on the CPU, so it misses
    with pytest.raises(ParityError, match="on ggml: ggml runs none of its nodes"):
        quantize(bundle, tmp_path / "int8", to="int8", judging=Judging(inputs=16, check_on=("ggml",)))
    assert not (tmp_path / "int8").exists()
    # a provider this machine cannot give: refused before anything is made or written
    with pytest.raises(InputError, match="nosuch"):
        quantize(bundle, tmp_path / "never", to="int8", judging=Judging(inputs=16, check_on=("nosuch",)))
    assert not (tmp_path / "never").exists()


def test_bench_children_measure_parity_and_speed_against_pytorch(exported, tmp_path: Path) -> None:
    from edgeformer.benchmarks.providers import (
        child_offers,
        child_parity,
        child_time,
        markdown,
        parse_pythons,
        summarize,
        write,
    )
    from edgeformer.model.checkpoint import save_checkpoint

    ggml_sees_no_gpu()
    model, bundle = exported("post-sinusoidal")
    save_checkpoint(model, tmp_path / "ckpt")
    from edgeformer.benchmarks.providers import reference_outputs

    reference_outputs(tmp_path / "ckpt", bundle, tmp_path / "ref.npz", n=12, steps=8, forced=6)
    assert "ggml:CPU" in child_offers()["choices"]
    for choice in ("cpu", "ggml:CPU"):
        parity = child_parity(bundle, choice, tmp_path / "ref.npz", threads=2)
        assert parity["greedy_identical"] == parity["beam-4_identical"] == 1.0
        assert parity["max_abs_logprob_diff"] < (1e-4 if choice == "cpu" else 2e-2)
        assert parity["step_agreement"] == 1.0
    timing = child_time(bundle, "ggml:CPU", 2, 2, 6, 4, 2, 1)
    assert timing["tokens_per_s"] > 0 and timing["nodes"].startswith("encoder ")
    # ratios are taken round by round against the reference's run of the same round
    rows = summarize([{"python": "this", "choice": c, "variant": "fp32", "parity": {"error": "x"}, "points": {
        "1x1": [{"tokens_per_s": v, "ms_per_token": 1.0, "runs_on": c, "nodes": ""} for v in values]}}
        for c, values in (("cpu", [100.0, 50.0, 80.0]), ("ggml:CPU", [50.0, 50.0, 20.0]))], ("this", "cpu", "fp32"))
    assert rows[1]["speed"]["1x1"]["vs_reference"] == pytest.approx(0.5)  # of 0.5, 1.0, 0.25
    assert "ggml:CPU" in markdown(rows, ["1x1"])
    rows[1]["parity"] = {"error": "BundleError: x (onnxruntime 1.24 cannot load it)"}
    write(rows, tmp_path / "out", {"threads": 2, "src_len": 6, "new_tokens": 4, "rounds": 3, "inputs": 12})
    text = (tmp_path / "out" / "results.md").read_text()
    assert "- this ggml:CPU fp32: onnxruntime 1.24 cannot load it)" in text and "vs cpu fp32" in text
    assert json.loads((tmp_path / "out" / "results.json").read_text())["records"][1]["speed"]["1x1"]
    assert (tmp_path / "out" / "providers.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="LABEL=PATH"):
        parse_pythons(["openvino"])


def test_the_cli_says_in_one_line_which_choice_it_passed_over_and_why(shipped_bundle) -> None:
    plugin("onnxruntime-ep-webgpu")
    if offered("WebGpuExecutionProvider"):
        pytest.skip("WebGPU offers a device on this machine")
    out = edgeformer("generate", str(shipped_bundle("post-sinusoidal")), "--ids", "5 6 7", "--provider", "webgpu,cpu",
                     "--json")
    assert out.returncode == 0, out.stderr
    notes = [line for line in out.stderr.splitlines() if line.startswith("edgeformer generate: note: ")]
    assert notes == [line for line in out.stderr.splitlines() if "WebGpu" in line]
    assert notes[0].startswith("edgeformer generate: note: webgpu: onnxruntime-ep-webgpu ")
    assert json.loads(out.stdout)["provider"] == P.CPU
    bad = edgeformer("generate", str(shipped_bundle("post-sinusoidal")), "--ids", "5", "--provider", "nosuch")
    assert bad.returncode != 0 and bad.stderr.strip().startswith("edgeformer generate: error: unknown execution "
                                                                  "provider 'nosuch'; known here: ")
