"""The ViT family's variants, measured: held-out images (the built-in digits for a model of their layout, else random
images), the source and the variant classifying them side by side (top-1 agreement, max |log-probability
difference|, accuracy where there are labels), and the images static quantization calibrates on."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeformer.runtime.bundle import Manifest
from edgeformer.runtime.classifier import Classifier, preprocess
from edgeformer.runtime.session import log_softmax
from edgeformer.runtime.vit import MODEL, PIXELS
from edgeformer.transforms.judge import on_provider

DIGITS_LAYOUT = {"image_size": 8, "channels": 1, "num_classes": 10}  # the built-in task's images and classes
BATCH = 64


@dataclass
class ImageSet:
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray | None = None
    judged_on: dict[str, Any] = field(default_factory=dict)

    @property
    def sources(self) -> list[np.ndarray]:  # what derive counts
        return list(self.images)

    @property
    def metric(self) -> str | None:
        return "accuracy" if self.labels is not None else None


def inputs(source: Manifest, bundle: Path, path: Path | str | None, n: int, metric: str | None = None,
           split: str = "test", seed: int = 0) -> ImageSet:
    """n held-out digits (of `split`) for a model of their layout, else n random images of the model's size."""
    if path is not None:
        raise ValueError("a ViT bundle is judged on images: the built-in digits, or random images; --eval and "
                         "--calibration take text inputs")
    c = source.config
    if all(c.get(k) == v for k, v in DIGITS_LAYOUT.items()):
        from edgeformer.model.digits import digits

        images, labels = digits(split)
        return ImageSet(images[:n], labels[:n], {"inputs": f"the built-in digits, {split} split",
                                                 "count": min(n, len(images))})
    rng = np.random.default_rng(seed)
    size, channels = c["image_size"], c["channels"]
    return ImageSet(rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8),
                    judged_on={"inputs": "random images", "count": n})


def judge(source: Path, candidate: Path, inputs: ImageSet, provider: str = "cpu") -> dict:
    """The candidate against the bundle it came from, on the same images."""
    ref = Classifier(source, threads=2, verify=False)
    new, placed = on_provider(lambda providers: Classifier(candidate, providers=providers, threads=2, verify=False),
                              provider)
    a = np.concatenate([ref.logits(inputs.images[i: i + BATCH]) for i in range(0, len(inputs.images), BATCH)])
    b = np.concatenate([new.logits(inputs.images[i: i + BATCH]) for i in range(0, len(inputs.images), BATCH)])
    figures: dict[str, Any] = {
        "against": f"{ref.manifest.variant} bundle", "provider": new.provider, "inputs": len(a),
        "judged_on": inputs.judged_on, "agreement": "top-1",
        "max_abs_logprob_diff": float(np.abs(log_softmax(a) - log_softmax(b)).max()),
        "greedy_token_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()), **placed}
    if inputs.labels is not None:  # accuracy in points, as every metric
        figures.update(metric="accuracy", metric_source=100 * float((a.argmax(-1) == inputs.labels).mean()),
                       metric_variant=100 * float((b.argmax(-1) == inputs.labels).mean()))
    return figures


def calibration_feeds(bundle: Path, inputs: ImageSet) -> dict[str, list[dict]]:
    """The images, preprocessed as the bundle says, in batches of the model graph's input."""
    config = Manifest.load(bundle, verify=False).config
    return {MODEL: [{PIXELS: preprocess(inputs.images[i: i + BATCH], config)}
                    for i in range(0, len(inputs.images), BATCH)]}
