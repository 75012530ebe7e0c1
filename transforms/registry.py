"""The transforms, by the variant each makes: the one registry of them. A transform is a function in a module,
`(options, source bundle) -> (per-graph transform, settings for the manifest)`, and a line here: the verb that
applies it (and so its options, transforms/options.py) and the gate its result must pass against its source
before it is written. Functions are named, not imported: the command line reads this table without onnx."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeformer.transforms.judge import Gate

SOURCE = "fp32"  # what export writes, and every transform starts from


@dataclass(frozen=True)
class Transform:
    variant: str  # what it makes
    step: str  # the verb that applies it: "optimize" or "quantize"
    function: str  # "module:function", (options, source bundle) -> (per-graph transform, settings)
    gate: Gate
    source: str = SOURCE  # what a deployment makes it from (quantized CPU variants keep the optimized fusions)
    gpu: bool = False  # a variant for GPU providers only: benchmarks and the demo measure it there alone

    def make(self, options: Any, bundle: Path) -> tuple[Callable, dict]:
        made: tuple[Callable, dict] = pkgutil.resolve_name(self.function)(options, bundle)
        return made


TRANSFORMS = {t.variant: t for t in (
    # fusions reorder float arithmetic and no more: PyTorch's tolerance, every greedy token the same
    Transform("fp32-optimized", "optimize", "edgeformer.transforms.optimize:optimize_transform",
              Gate(max_logprob_diff=1e-4, min_token_agreement=1.0)),
    # Quantized: within a point of the source's metric where there are references; agreement and log-prob bounds
    # that faithful variants pass on random inputs and broken ones fail (README: "Variants and their gates").
    Transform("int8", "quantize", "edgeformer.transforms.quantize:int8",
              Gate(max_logprob_diff=2.0, min_token_agreement=0.9, max_metric_drop=1.0), source="fp32-optimized"),
    Transform("int4", "quantize", "edgeformer.transforms.quantize:int4",
              Gate(max_logprob_diff=8.0, min_token_agreement=0.7, max_metric_drop=1.0), source="fp32-optimized"),
    Transform("fp16", "quantize", "edgeformer.transforms.quantize:fp16",
              Gate(max_logprob_diff=2e-2, min_token_agreement=0.99, max_metric_drop=1.0), gpu=True),
)}
VARIANTS = (SOURCE, *TRANSFORMS)
CPU_VARIANTS = (SOURCE, *(v for v, t in TRANSFORMS.items() if not t.gpu))
QUANTIZED = tuple(v for v, t in TRANSFORMS.items() if t.step == "quantize")


# How each model family's variants are measured: a module with inputs(...), judge(...) and calibration_feeds(...)
# (transforms/encoder_decoder.py); a new family adds its module and a line here.
FAMILY_JUDGING = {"encoder-decoder": "edgeformer.transforms.encoder_decoder", "vit": "edgeformer.transforms.vit"}


def family_judging(family: str) -> Any:
    if family not in FAMILY_JUDGING:
        raise ValueError(f"no transforms for the model family {family!r}; known: {', '.join(FAMILY_JUDGING)}")
    return importlib.import_module(FAMILY_JUDGING[family])


def transform(variant: str) -> Transform:
    if variant not in TRANSFORMS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(TRANSFORMS)}")
    return TRANSFORMS[variant]
