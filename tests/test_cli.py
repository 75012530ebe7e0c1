"""The command line, run as a user runs it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from edgeformer.report.format import figure_text
from tests.helpers import edgeformer


def test_info_shows_the_bundle_as_a_person_reads_it(exported) -> None:
    _, bundle = exported("demo")
    out = edgeformer("info", str(bundle))
    assert out.returncode == 0, out.stderr
    assert "variant fp32" in out.stdout and "sinusoidal positions (unbounded)" in out.stdout
    assert "cache concat" in out.stdout and "(rows, 4, past_len, 32)" in out.stdout
    assert "past_key_values.{i}.decoder.key" in out.stdout and "greedy token agreement: 100.00%" in out.stdout
    data = json.loads(edgeformer("info", str(bundle), "--json").stdout)
    assert data["graphs"]["encoder"]["file"] == "encoder.onnx"


def test_generate_takes_text_and_returns_text(exported) -> None:
    _, bundle = exported("demo")
    out = edgeformer("generate", str(bundle), "5 mars 1998", "the 2nd of july, 2031", "--json")
    assert out.returncode == 0, out.stderr
    outputs = [o[0]["output"] for o in json.loads(out.stdout)["outputs"]]
    assert outputs == ["1998-03-05", "2031-07-02"]
    out = edgeformer("generate", str(bundle), "--strategy", "beam", "--n-best", "2", stdin="5 mars 1998\n")
    assert out.returncode == 0 and out.stdout.count("5 mars 1998") == 2


def test_generate_with_token_ids(exported) -> None:
    _, bundle = exported("post-sinusoidal")
    out = edgeformer("generate", str(bundle), "5 6 7", "--ids", "--max-new-tokens", "3", "--json")
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["outputs"][0][0]["tokens"]) <= 3
    pinned = edgeformer("generate", str(bundle), "5 6 7", "--ids", "--max-new-tokens", "3", "--json", "--threads",
                        "2", "--decoder-threads", "2")
    assert pinned.returncode == 0, pinned.stderr
    assert json.loads(pinned.stdout)["outputs"] == json.loads(out.stdout)["outputs"]


@pytest.mark.parametrize(("args", "message"), [
    (["generate", "{bundle}", "5 99", "--ids"], "outside the source vocabulary"),
    (["generate", "{bundle}", "5", "--ids", "--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
    (["generate", "{bundle}", "5", "--ids", "--strategy", "beam", "--beams", "0"], "num_beams must be >= 1"),
    (["generate", "{bundle}", "5", "--ids", "--provider", "tpu"], "unknown execution provider"),
    (["generate", "{bundle}", "5", "--ids", "--decoder-threads", "0"], "give a number of threads in"),
    (["info", "/no/such/bundle"], "no such bundle folder"),
    (["export", "/no/such/checkpoint", "{tmp}/out"], "no such checkpoint folder"),
    (["bench", "/no/such/checkpoint", "--quick"], "no such checkpoint folder"),
    (["quantize", "{bundle}", "{tmp}/q", "--to", "int8", "--preset", "avx9"], "invalid choice"),
])
def test_errors_are_one_clear_line(exported, tmp_path: Path, args: list[str], message: str) -> None:
    _, bundle = exported("post-sinusoidal")
    out = edgeformer(*[a.format(bundle=bundle, tmp=tmp_path) for a in args])
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_parity_compares_the_runtime_with_pytorch_on_the_task_the_bundle_records(exported) -> None:
    _, bundle = exported("demo")
    out = edgeformer("parity", str(bundle), "-n", "24")
    assert out.returncode == 0, out.stderr
    assert re.search(r"judged on +built-in task dates, test split", out.stdout)
    assert re.search(r"greedy identical to PyTorch +100.00%", out.stdout)
    assert re.search(r"exact match \(runtime, points\) +(9\d|100)\.\d\d\n", out.stdout)


def test_figures_read_as_percentages_points_and_differences() -> None:
    assert figure_text("greedy token agreement", 0.995) == "99.50%"
    assert figure_text("chrf (runtime, points)", 97.123) == "97.12"
    assert figure_text("max |logit diff| per step", 1.9e-6) == "1.90e-06"
    assert figure_text("inputs", 200) == "200"
