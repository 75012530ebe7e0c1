"""The Vision Transformer's PyTorch side of export (export/families.py): the one graph is the model itself, checked
against PyTorch on random pixels at several batch sizes, and the bundle run by the runtime against the checkpoint on
held-out images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from edgeformer.export.parity import ParityError, Tolerance, check_close
from edgeformer.model.checkpoint import load_checkpoint
from edgeformer.model.vit import ViT
from edgeformer.runtime.spec import GraphSpec
from edgeformer.runtime.vit import MODEL

PARITY_BATCHES = (1, 3, 8)  # the batch axis is dynamic: one size traced, others checked


def graph_modules(model: ViT) -> dict[str, nn.Module]:
    return {MODEL: model}


def traced(spec: GraphSpec) -> GraphSpec:
    return spec


def complete(name: str, proto: onnx.ModelProto) -> None:
    """Nothing to add: the traced graph is the declared one."""


def example_inputs(model: ViT) -> dict[str, tuple[Tensor, ...]]:
    c = model.config
    return {MODEL: (torch.randn(2, c.channels, c.image_size, c.image_size),)}


def check_parity(model: ViT, sessions: dict[str, ort.InferenceSession], specs: dict[str, GraphSpec],
                 tolerance: Tolerance) -> dict:
    """Logits on random pixels at several batch sizes; the top class must be PyTorch's for every image."""
    c, rng, worst, images = model.config, np.random.default_rng(0), 0.0, 0
    for batch in PARITY_BATCHES:
        pixels = rng.standard_normal((batch, c.channels, c.image_size, c.image_size)).astype(np.float32)
        with torch.no_grad():
            want = model(torch.from_numpy(pixels)).numpy()
        got = sessions[MODEL].run(None, {specs[MODEL].input_names[0]: pixels})[0]
        worst = max(worst, check_close(got, want, tolerance, f"model graph, logits, batch {batch}"))
        if not (got.argmax(-1) == want.argmax(-1)).all():
            raise ParityError(f"model graph: the top class differs from PyTorch's at batch {batch}")
        images += batch
    return {"max_abs_diff": {MODEL: worst}, "top1_agreement": 1.0, "images_compared": images,
            "batches": list(PARITY_BATCHES)}


def runtime_parity(bundle: Path, checkpoint: Path | str | None = None, n: int = 200, eval: Path | str | None = None,
                   threads: int | None = None) -> dict[str, Any]:
    """The bundle run by the runtime (preprocessing included) against the checkpoint on held-out digits."""
    from edgeformer.model.digits import digits
    from edgeformer.runtime.classifier import Classifier, preprocess

    if eval is not None:
        raise ValueError("a ViT bundle is judged on the built-in digits; --eval takes text inputs")
    model, _ = load_checkpoint(checkpoint)
    rt = Classifier(bundle, threads=threads)
    images, labels = digits("test")
    images, labels = images[:n], labels[:n]
    ours = rt.logits(images)
    with torch.no_grad():
        ref = model(torch.from_numpy(preprocess(images, model.config))).numpy()
    return {"images": len(images), "judged on": "digits, test split", "provider": rt.provider,
            "top-1 identical to PyTorch": float((ours.argmax(-1) == ref.argmax(-1)).mean()),
            "accuracy (runtime)": float((ours.argmax(-1) == labels).mean()),
            "accuracy (PyTorch)": float((ref.argmax(-1) == labels).mean()),
            "max |logit diff|": float(np.abs(ours - ref).max())}
