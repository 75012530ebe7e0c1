"""A regular (non-editable) wheel holds the three packages and the shipped model, and its runtime imports."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_and_runs_without_the_source_tree(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("edgeformer-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for expected in ("edgeformer/model/transformer.py", "edgeformer/export/onnx_export.py",
                     "edgeformer/runtime/session.py", "edgeformer/cli/__init__.py",
                     "edgeformer/model/weights/dates/model.safetensors",
                     "edgeformer/model/weights/dates/tokenizer.json"):
        assert expected in names
    assert not any(n.startswith(("model/", "runtime/", "tests/")) for n in names)  # no generic top-level names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("import edgeformer.runtime.session as s, edgeformer.model.checkpoint as c; "
            "print(s.__file__); print(c.default_checkpoint())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    runtime_file, weights = out.stdout.split()
    assert runtime_file.startswith(str(target)) and weights.startswith(str(target))
    assert (Path(weights) / "model.safetensors").is_file()
