"""`edgeformer bench`: every system at every point, ratios to PyTorch from the same runs, results on disk."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path

import pytest

from edgeformer.benchmarks.latency import compare_latency, known_within, median_ci
from edgeformer.benchmarks.memory import measure
from edgeformer.benchmarks.sweep import TORCH_FULL, TORCH_KV, Point, bench, configurations, sweep_points
from edgeformer.model.generate import TorchFullSteps, TorchSteps, pad_batch
from edgeformer.model.transformer import Transformer
from tests.helpers import tiny_model


def test_sweeps_vary_one_axis_around_the_base_point() -> None:
    points = sweep_points({"batch": (1, 4), "new_tokens": (16, 64)}, Point())
    assert points[0] == ("base", Point())
    assert ("batch", Point(batch=4)) in points and ("new_tokens", Point(new_tokens=16)) in points
    assert len(points) == 3  # batch 1 and 64 new tokens are the base point itself
    assert sweep_points({}, Point(), repeat_base=True) == [("base", Point()), ("base-repeat", Point())]


def test_fp16_is_measured_on_gpu_providers_only_and_by_default_where_one_is() -> None:
    cpu, cuda = "CPUExecutionProvider", "CUDAExecutionProvider"
    assert ("fp16", cuda) in configurations(None, [cpu, cuda])
    assert not any(v == "fp16" for v, _ in configurations(None, [cpu]))
    assert configurations(["fp16", "int8"], [cpu, cuda]) == [("fp16", cuda), ("int8", cpu), ("int8", cuda)]


def test_decoding_without_cache_gives_the_same_tokens_as_with_it() -> None:
    model = tiny_model()
    ids, mask = pad_batch([[5, 6, 7], [8, 9, 10]], 0)
    a, b = TorchSteps(model, ids, mask, 1), TorchFullSteps(model, ids, mask, 1)
    import numpy as np

    tokens = np.array([1, 1])
    for _ in range(6):
        la, lb = a.log_probs(tokens), b.log_probs(tokens)
        assert np.abs(la - lb).max() < 1e-4
        tokens = la.argmax(-1)


def test_latency_comparison_reports_every_system_with_percentiles_and_paired_ratios() -> None:
    model = tiny_model()
    ids, mask = pad_batch([[5, 6, 7]], 0)
    lat = compare_latency({"a": lambda: TorchSteps(model, ids, mask, 1),
                           "b": lambda: TorchFullSteps(model, ids, mask, 1)}, 4, 1, reference="a", min_runs=2,
                          max_runs=3, warmup_s=0, pause_s=0)
    for v in lat.values():
        assert 2 <= v.runs <= 3 and len(v.per_run_ms) == v.runs and 0 < v.per_token_ms <= v.per_token_p99_ms
        assert v.end_to_end_ms >= v.encoder_ms
        assert v.speedup_low <= v.speedup <= v.speedup_high
    assert lat["a"].speedup == 1.0
    # the median of the ratios within rounds, not the ratio of the medians
    ratios = [a / b for a, b in zip(lat["a"].per_run_ms, lat["b"].per_run_ms, strict=True)]
    assert lat["b"].speedup == pytest.approx(statistics.median(ratios), rel=1e-3)


def test_latency_comparison_refuses_a_reference_it_does_not_measure() -> None:
    with pytest.raises(ValueError, match="reference 'c' is not one of the systems"):
        compare_latency({"a": lambda: TorchSteps(tiny_model(), *pad_batch([[5]], 0), 1)}, 2, 1, reference="c")


def test_median_interval_comes_from_order_statistics_and_narrows_with_more_runs() -> None:
    assert median_ci([float(x) for x in range(1, 11)]) == (2.0, 9.0)  # the textbook 95% interval for n = 10
    assert median_ci([float(x) for x in range(1, 101)]) == (41.0, 60.0)  # and for n = 100
    assert known_within([1.0] * 10, 0.04)
    noisy = [1.0, 1.3] * 5
    assert not known_within(noisy, 0.04)
    assert known_within([1.0] * 30 + noisy, 0.04)  # the same outliers, drowned in more runs


def test_peak_memory_of_a_runtime_configuration_is_measured_without_torch(
        exported: Callable[[str], tuple[Transformer, Path]]) -> None:
    model, bundle = exported("post-sinusoidal")
    c = model.config
    spec = {"system": "onnx", "bundle": str(bundle), "provider": "CPUExecutionProvider", "threads": 1, "batch": 2,
            "src_len": 5, "new_tokens": 3, "src_vocab_size": c.src_vocab_size, "bos_id": c.bos_id}
    result = measure(spec)
    assert result["torch_imported"] is False and 10 < result["peak_rss_mb"] < 2000
    with pytest.raises(ValueError, match="system must be one of"):
        measure({**spec, "system": "tensorflow"})


def test_bench_writes_records_table_and_plot(tmp_path: Path) -> None:
    records = bench(None, variants=["fp32", "int8"], providers=["CPUExecutionProvider"],
                    sweeps={"new_tokens": (4, 8)}, base=Point(new_tokens=4, src_len=8), max_seconds=1.0,
                    out=tmp_path, progress=False, log=lambda _m: None, repeat_base=False)
    systems = {r["system"] for r in records}
    assert {TORCH_KV, TORCH_FULL, "fp32 CPU", "int8 CPU"} == systems
    assert len(records) == 2 * len(systems)  # two points
    kv = next(r for r in records if r["system"] == TORCH_KV and r["sweep"] == "base")
    assert kv["speedup_vs_pytorch_kv"] == 1.0
    fp32 = next(r for r in records if r["system"] == "fp32 CPU" and r["sweep"] == "base")
    ratios = [a / b for a, b in zip(kv["per_run_ms"], fp32["per_run_ms"], strict=True)]
    assert fp32["speedup_vs_pytorch_kv"] == pytest.approx(statistics.median(ratios), rel=1e-3)
    # the threads each system ran on: PyTorch the point's, the tiny model's decoder its default of one
    assert (kv["threads"], kv["decoder_threads"], fp32["threads"], fp32["decoder_threads"]) == (2, 2, 2, 1)
    low, high = fp32["speedup_ci95"]
    assert low <= fp32["speedup_vs_pytorch_kv"] <= high
    # each configuration's own process: the runtime's without torch, so lighter than PyTorch's
    assert all(r["peak_rss_mb"] > 10 for r in records)
    assert fp32["peak_rss_mb"] < kv["peak_rss_mb"]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["machine"]["cores"] and len(data["records"]) == len(records)
    assert "| fp32 CPU | base | 1 | 8 | 4 | 2 (decoder 1) |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "per_token_latency.png").stat().st_size > 1000


@pytest.mark.slow
def test_throughput_grid_runs_every_system_on_the_same_weights_and_writes_its_results(tmp_path: Path) -> None:
    """`edgeformer bench throughput` (benchmarks/throughput.py) on a tiny MarianMT imported into each system: our
    runtime and PyTorch (CTranslate2 where installed), each in a process of its own, every hypothesis of the forced
    length (each run checks it), a table with the ratios and the time outside onnxruntime."""
    import subprocess
    import sys
    from importlib.util import find_spec

    pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    script = str(Path(__file__).parents[1] / "benchmarks" / "throughput.py")
    verb = [sys.executable, "-m", "edgeformer.cli", "bench", "throughput"]
    # Optimum's peer, and both directions of the interop, where optimum-onnx is installed (edgeformer[optimum])
    optimum = find_spec("optimum") is not None and find_spec("optimum.onnxruntime") is not None
    made = subprocess.run([*verb, "make", str(tmp_path / "tp"), "--small"], capture_output=True, text=True,
                          check=False)
    assert made.returncode == 0, made.stderr[-2000:]
    systems = ["edgeformer-int8", "edgeformer-fp32", "edgeformer-int8-graph", "torch"]
    systems += ["ct2-int8"] if find_spec("ctranslate2") else []
    systems += ["edgeformer-on-optimum-fp32", "optimum-on-edgeformer-int8"] if optimum else []
    out = subprocess.run([sys.executable, script, "grid", str(tmp_path / "tp"), "--systems", ",".join(systems),
                          "--points", "2x1,2x3", "--new-tokens", "5", "--repeats", "1", "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    records = json.loads((tmp_path / "r" / "results.json").read_text())["records"]
    assert {(r["system"], r["batch"], r["beams"]) for r in records} == {(s, 2, k) for s in systems for k in (1, 3)}
    ours = [r for r in records if r["system"].startswith("edgeformer")]
    assert all(0 <= r["outside_onnxruntime"] < 1 and r["tokens_per_s"] > 0 for r in ours)
    assert (tmp_path / "r" / "tokens_per_s.png").stat().st_size > 0
    assert "outside onnxruntime" in (tmp_path / "r" / "results.md").read_text()
    if optimum:  # both directions token for token (benchmarks/optimum_tokens.py), on the same folder
        check = str(Path(__file__).parents[1] / "benchmarks" / "optimum_tokens.py")
        out = subprocess.run([sys.executable, check, str(tmp_path / "tp"), "--inputs", "4", "--new-tokens", "5"],
                             capture_output=True, text=True, check=False)
        assert out.returncode == 0, out.stderr[-2000:]
        found = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        assert len(found) == 6 and all(r["identical"] == r["inputs"] == 4 for r in found), found
    # onnxruntime's own share of the peak (benchmarks/memory_floor.py), on the same folder
    floor = str(Path(__file__).parents[1] / "benchmarks" / "memory_floor.py")
    for system in ["edgeformer-int8", *(["ct2-int8+onnxruntime"] if find_spec("ctranslate2") else [])]:
        out = subprocess.run([sys.executable, floor, str(tmp_path / "tp"), "--system", system, "--new-tokens", "5"],
                             capture_output=True, text=True, check=False)
        assert out.returncode == 0, out.stderr[-2000:]
        r = json.loads(out.stdout.splitlines()[-1])
        assert 0 < r["imported"]["rss_mb"] <= r["loaded"]["rss_mb"] <= r["generated"]["peak_mb"]


def test_optimums_peer_is_refused_without_optimum_to_run_it(tmp_path: Path) -> None:
    import subprocess
    import sys

    hidden = ("import sys; sys.modules['optimum'] = None; from edgeformer.cli import main; "  # as if not installed
              f"main(['bench', 'throughput', 'grid', {str(tmp_path)!r}, '--systems', 'edgeformer-int8,optimum-int8'])")
    out = subprocess.run([sys.executable, "-c", hidden], capture_output=True, text=True, check=False)
    assert out.returncode != 0 and "edgeformer[optimum]" in out.stderr and "--optimum-python" in out.stderr
