"""`edgeformer bench`: every system at every point, ratios to PyTorch from the same runs, results on disk."""

from __future__ import annotations

import json
from pathlib import Path

from edgeformer.export.bench import compare_latency
from edgeformer.export.benchmark import TORCH_FULL, TORCH_KV, Point, bench, sweep_points
from edgeformer.model.generate import TorchFullSteps, TorchSteps, pad_batch
from tests.conftest import tiny_model


def test_sweeps_vary_one_axis_around_the_base_point() -> None:
    points = sweep_points({"batch": (1, 4), "new_tokens": (16, 64)}, Point())
    assert points[0] == ("base", Point())
    assert ("batch", Point(batch=4)) in points and ("new_tokens", Point(new_tokens=16)) in points
    assert len(points) == 3  # batch 1 and 64 new tokens are the base point itself
    assert sweep_points({}, Point(), repeat_base=True) == [("base", Point()), ("base-repeat", Point())]


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


def test_latency_comparison_reports_every_system_with_percentiles() -> None:
    model = tiny_model()
    ids, mask = pad_batch([[5, 6, 7]], 0)
    lat = compare_latency({"a": lambda: TorchSteps(model, ids, mask, 1),
                           "b": lambda: TorchFullSteps(model, ids, mask, 1)}, 4, 1, min_runs=2, max_runs=3,
                          warmup_s=0, pause_s=0)
    for v in lat.values():
        assert 2 <= v.runs <= 3 and 0 < v.per_token_ms <= v.per_token_p99_ms
        assert v.end_to_end_ms >= v.encoder_ms


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
    assert fp32["speedup_vs_pytorch_kv"] == kv["per_token_ms"] / fp32["per_token_ms"]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["machine"]["cores"] and len(data["records"]) == len(records)
    assert "| fp32 CPU |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "per_token_latency.png").stat().st_size > 1000
