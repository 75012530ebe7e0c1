"""Variants are judged on the user's data: an --eval file (texts or token ids, with or without references), the
built-in task only for a bundle that records it, else random inputs of the model's own vocabulary; the manifest
says which, and a broken variant is blocked either way."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgeformer.export.evaluation import eval_set, random_sources
from edgeformer.export.parity import ParityError
from edgeformer.model.metrics import score
from edgeformer.runtime.bundle import Manifest
from edgeformer.runtime.options import GenerationConfig
from edgeformer.runtime.session import Runtime
from edgeformer.transforms import registry
from edgeformer.transforms.derive import Judging, quantize
from tests.helpers import edgeformer


def break_weights(options: object, bundle: Path) -> tuple:
    """A transform gone wrong: every weight matrix's rows reversed, as a bad layout conversion would leave them."""
    def transform(path: Path, graph: str, manifest: Manifest) -> tuple[onnx.ModelProto, dict]:
        model = onnx.load(str(path))
        for init in model.graph.initializer:
            array = numpy_helper.to_array(init)
            if array.ndim == 2:
                init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array[::-1]), init.name))
        return model, {}

    return transform, {"method": "broken"}


def test_the_export_records_the_task_a_model_was_trained_on(exported) -> None:
    assert Manifest.load(exported("demo")[1]).task == "dates"
    assert Manifest.load(exported("post-sinusoidal")[1]).task is None


def test_a_bundle_without_task_or_file_is_judged_on_random_inputs_and_says_so(exported, tmp_path: Path) -> None:
    _, bundle = exported("post-sinusoidal")
    report = quantize(bundle, tmp_path / "int8", to="int8")
    judged = Manifest.load(tmp_path / "int8").variant_parity["judged_on"]
    assert judged["inputs"].startswith("random ids from the model's source vocabulary") and judged["metric"] is None
    assert "metric" not in report.figures and report.figures["greedy_token_agreement"] >= 0.9


def test_a_broken_variant_is_blocked_even_without_references(exported, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _, bundle = exported("post-sinusoidal")
    broken = dataclasses.replace(registry.TRANSFORMS["int8"], function=f"{__name__}:break_weights")
    monkeypatch.setitem(registry.TRANSFORMS, "int8", broken)
    with pytest.raises(ParityError, match="greedy token agreement"):
        quantize(bundle, tmp_path / "int8", to="int8")
    assert not (tmp_path / "int8").exists()


def test_token_id_references_are_scored_by_exact_match(exported, tmp_path: Path) -> None:
    _, bundle = exported("post-sinusoidal")
    rt = Runtime(bundle)
    sources = random_sources(rt.config, 40, seed=5)
    outputs = rt.generate(sources, GenerationConfig(max_new_tokens=64))
    lines = [json.dumps({"source": s, "reference": h[0].tokens}) for s, h in zip(sources, outputs, strict=True)]
    (tmp_path / "eval.jsonl").write_text("\n".join(lines) + "\n")
    # whole 64-token outputs of a random model: a few flip under int8, so the gate may fail; the figures stand
    report = quantize(bundle, tmp_path / "int8", to="int8", judging=Judging(tmp_path / "eval.jsonl"), allow_drop=True)
    f = report.figures
    assert f["metric"] == "exact_match" and f["metric_source"] == 100.0 and f["inputs"] == 40
    assert f["metric_variant"] < 100.0 or not report.misses
    assert f["judged_on"]["inputs"].startswith("file eval.jsonl (sha256 ")


def test_text_references_are_scored_by_chrf_and_the_gate_holds_the_variant_to_them(
        exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, bundle = exported("demo")
    (tmp_path / "eval.txt").write_text("5 mars 1998\t1998-03-05\nThursday, July 4, 2024\t2024-07-04\n"
                                       "12.10.1961\t1961-10-12\nthe 3rd of may, 2001\t2001-05-03\n")
    report = quantize(bundle, tmp_path / "int4", to="int4", judging=Judging(tmp_path / "eval.txt"))
    assert report.figures["metric"] == "chrf" and report.figures["metric_source"] > 95
    assert report.figures["inputs"] == 4
    # the same variant, held to a drop it cannot meet: blocked, and the message names the metric
    strict = dataclasses.replace(registry.TRANSFORMS["int4"], gate=registry.Gate(max_metric_drop=-1.0))
    monkeypatch.setitem(registry.TRANSFORMS, "int4", strict)
    with pytest.raises(ParityError, match="chrf drops"):
        quantize(bundle, tmp_path / "strict", to="int4", judging=Judging(tmp_path / "eval.txt"))


def test_metrics_score_in_points() -> None:
    assert score("exact_match", ["a", "b"], ["a", "c"]) == 50.0
    assert score("chrf", ["1998-03-05"], ["1998-03-05"]) == pytest.approx(100.0)
    assert score("bleu", ["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="unknown metric 'wer'"):
        score("wer", ["a"], ["a"])


@pytest.mark.parametrize(("content", "message"), [
    ("", "no inputs in it"),
    ("[4, 5, 6]\n[4, 5, 999]\n", "line 2: a source is text or a non-empty list of token ids in \\[0, 37\\)"),
    ('{"source": 5}\n', "line 1: a source is text or a non-empty list"),
    ("[4, true]\n", "line 1: a source is text"),
    ('{"source": [4, 5], "reference": 5}\n', "line 1: a reference is text or a non-empty list of token ids, not 5"),
    ("hello world\n", "line 1: text, but the bundle has no tokenizer"),
    ('{"source": [4, 5], "reference": [6]}\n{"source": [4, 5], "reference": "6"}\n', "line 2: text, but"),
    ('{"source": [4, 5], "reference": [6]}\n[7, 8]\n', "1 of 2 inputs have a reference"),
    ("[4, 5\n", "line 1: not valid JSON"),
])
def test_a_bad_eval_file_is_one_clear_error(exported, tmp_path: Path, content: str, message: str) -> None:
    _, bundle = exported("post-sinusoidal")
    (tmp_path / "eval.txt").write_text(content)
    with pytest.raises(ValueError, match=message):
        eval_set(Manifest.load(bundle).config, None, None, tmp_path / "eval.txt")


def test_a_source_longer_than_learned_positions_is_refused_before_judging(exported, tmp_path: Path) -> None:
    _, bundle = exported("pre-learned-gelu")  # 64 learned positions
    (tmp_path / "eval.jsonl").write_text(json.dumps(list(range(4, 34)) * 3) + "\n")
    with pytest.raises(ValueError, match="more than this model's 64 learned positions"):
        quantize(bundle, tmp_path / "int8", to="int8", judging=Judging(tmp_path / "eval.jsonl"))


def test_the_command_line_judges_on_the_file_it_is_given(exported, tmp_path: Path) -> None:
    _, bundle = exported("demo")
    (tmp_path / "eval.txt").write_text("5 mars 1998\t1998-03-05\n19. Oktober 1975\t1975-10-19\n")
    out = edgeformer("quantize", str(bundle), str(tmp_path / "int8"), "--to", "int8", "--eval",
                     str(tmp_path / "eval.txt"), "--metric", "exact_match")
    assert out.returncode == 0, out.stderr
    assert "judged on" in out.stdout and "file eval.txt" in out.stdout
    assert re.search(r"exact_match \(source -> this\) +100.00 -> 100.00", out.stdout)
    bad = edgeformer("quantize", str(bundle), str(tmp_path / "x"), "--to", "int8", "--eval", str(tmp_path / "no"))
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1 and "cannot read it" in bad.stderr
