"""The runtime of an image classifier's bundle (the ViT family, runtime/vit.py), numpy and onnxruntime only:
`Runtime(bundle)` returns one for such a bundle. Images come as numpy arrays (N, H, W, C), uint8 in [0, 255] or float
in [0, 1], at the bundle's size; the preprocessing (rescale, mean, std, channels first) is the bundle's own."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeformer.runtime.base import OnProviders
from edgeformer.runtime.bundle import Manifest
from edgeformer.runtime.engine import ORT_ERRORS, graph_io, session_options
from edgeformer.runtime.errors import BundleError, EngineError, InputError, LimitError
from edgeformer.runtime.options import Limits, is_int
from edgeformer.runtime.vit import MODEL, VIT


def preprocess(images: np.ndarray, config: Any) -> np.ndarray:
    """(N, H, W, C) uint8 in [0, 255] or float in [0, 1] -> the model's pixels (N, C, H, W) float32. config: a
    ViTConfig or its dict."""
    get = config.get if isinstance(config, Mapping) else (lambda k: getattr(config, k))
    x = images.astype(np.float32)
    if images.dtype == np.uint8:
        x *= np.float32(get("rescale"))
    mean, std = np.asarray(get("mean"), np.float32), np.asarray(get("std"), np.float32)
    return np.ascontiguousarray(((x - mean) / std).transpose(0, 3, 1, 2), dtype=np.float32)


class Classifier(OnProviders):
    """A loaded image classifier. Thread-safe: a call keeps its state in local variables."""

    layout = "edgeformer"

    def __init__(self, bundle: Path | str, providers: Sequence[str] = ("cpu",), threads: int | None = None,
                 optimization: str = "all", verify: bool = True, limits: Limits | None = None, **_: Any) -> None:
        self._take_arguments(bundle, providers, threads, optimization, None, limits)
        self.manifest = Manifest.load(self.path, verify=verify)
        if self.manifest.family != VIT.name:
            raise BundleError(f"{self.path}: a {self.manifest.family} bundle; Classifier runs {VIT.name} bundles")
        self.config = self.manifest.config
        self.labels: list[str] = list(self.config.get("labels") or map(str, range(self.config["num_classes"])))
        file = self.path / self.manifest.graph_files[MODEL]
        self.session = self._open_file(file, lambda: session_options(optimization, threads), VIT.cpu_unfused)
        self.manifest.graphs[MODEL].check_names(*graph_io(self.session), file)
        self._placed(self.session)
        self.input_name = self.manifest.graphs[MODEL].input_names[0]

    def check_images(self, images: Any) -> np.ndarray:
        """The images as an array (N, H, W, C) of the bundle's size and channels, uint8 or float in [0, 1]; else
        InputError (LimitError above the limit of rows a call takes)."""
        size, channels = self.config["image_size"], self.config["channels"]
        if not isinstance(images, np.ndarray):
            raise InputError(f"images must be a numpy array (N, {size}, {size}, {channels}), not "
                             f"{type(images).__name__}")
        if images.ndim == 3 and channels == 1:
            images = images[..., None]  # grayscale images without their channel axis
        if images.ndim != 4 or images.shape[1:] != (size, size, channels):
            raise InputError(f"images of shape {images.shape}; this model takes (N, {size}, {size}, {channels}): "
                             f"resize them to {size}x{size} (`edgeformer classify` does, with Pillow)")
        if len(images) == 0:
            raise InputError("no images: pass at least one")
        if len(images) > self.limits.rows:
            raise LimitError(f"{len(images)} images in one call, above the limit of {self.limits.rows}; raise it "
                             "with Runtime(limits=Limits(rows=...)), or pass fewer")
        if images.dtype != np.uint8:
            if images.dtype.kind != "f":
                raise InputError(f"images of dtype {images.dtype}: give uint8 in [0, 255] or float in [0, 1]")
            if not np.isfinite(images).all() or images.min() < 0 or images.max() > 1:
                raise InputError("float images must be finite and in [0, 1] (uint8 images take [0, 255])")
        return images

    def logits(self, images: Any) -> np.ndarray:
        """(N, K) logits of the images."""
        pixels = preprocess(self.check_images(images), self.config)
        try:
            return np.asarray(self.session.run(None, {self.input_name: pixels})[0])
        except ORT_ERRORS as e:
            raise EngineError(f"onnxruntime failed on {self.path} ({str(e)[:300]})") from None

    def classify(self, images: Any, top_k: int = 5) -> list[list[tuple[str, float]]]:
        """Per image, its top_k (label, probability), most probable first."""
        if not is_int(top_k) or top_k < 1:
            raise InputError(f"top_k={top_k!r}: give a whole number of at least 1")
        logits = self.logits(images).astype(np.float64)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        best = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
        return [[(self.labels[i], float(p[i])) for i in row] for row, p in zip(best, probs, strict=True)]
