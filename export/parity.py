"""Parity of exported graphs with the PyTorch model, checked before a bundle is written: the tolerances, and the
check that opens a bundle's graphs and hands them to the model family's comparison (export/families.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeformer.runtime.engine import CPU, open_session
from edgeformer.runtime.errors import EdgeformerError
from edgeformer.runtime.spec import Family, GraphSpec


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float  # relative to the largest |value| of the reference: logits of large models span a wide range

    def allowed(self, reference: np.ndarray) -> float:
        return self.atol + self.rtol * float(np.abs(reference).max())


TOLERANCES = {"fp32": Tolerance(atol=1e-4, rtol=1e-5), "fp32-optimized": Tolerance(atol=1e-4, rtol=1e-5)}


class ParityError(EdgeformerError, RuntimeError):
    """An exported graph whose outputs differ from PyTorch's by more than the tolerance."""


def check_close(got: np.ndarray, want: np.ndarray, tolerance: Tolerance, what: str) -> float:
    """The max |difference|; ParityError when it exceeds the tolerance (or is NaN)."""
    diff, allowed = float(np.abs(got - want).max()), tolerance.allowed(want)
    if not diff <= allowed:
        raise ParityError(f"{what}: max |difference| to PyTorch {diff:.3g} exceeds the allowed {allowed:.3g}")
    return diff


def check_bundle(model: Any, folder: Path, family: Family, specs: dict[str, GraphSpec],
                 variant: str = "fp32") -> dict:
    """Run the family's parity cases on the graphs in `folder` (CPU); return the figures for the manifest."""
    from edgeformer.export.families import family_export

    tolerance = TOLERANCES[variant]
    # what the runtime runs: on the CPU without the fusions the family leaves out
    sessions = {name: open_session(Path(folder) / family.graph_files[name], cpu_unfused=family.cpu_unfused)
                for name in specs}
    figures = family_export(family.name).check_parity(model, sessions, specs, tolerance)
    return {"reference": "pytorch", "provider": CPU, **figures,
            "tolerance": {"atol": tolerance.atol, "rtol": tolerance.rtol}}
