"""The Vision Transformer family, declared as data: one graph, pixels in, class logits out, a dynamic batch. The
bundle's config carries the preprocessing (size, rescale, mean, std, channels), so the runtime needs nothing else
(runtime/classifier.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edgeformer.runtime.spec import Family, GraphSpec, TensorSpec

MODEL, BATCH = "model", "batch"
PIXELS, LOGITS = "pixel_values", "logits"  # Hugging Face's names for a ViT's input and output


def graphs(config: Mapping[str, Any], **_: Any) -> dict[str, GraphSpec]:
    size, channels = config["image_size"], config["channels"]
    return {MODEL: GraphSpec(MODEL, (TensorSpec(PIXELS, "float32", (BATCH, channels, size, size)),),
                             (TensorSpec(LOGITS, "float32", (BATCH, config["num_classes"])),))}


def check_config(config: Mapping[str, Any]) -> list[str]:
    """The problems of a ViT config read from a manifest: what the runtime needs to preprocess and label."""
    problems = [f"{k} must be a positive integer" for k in ("image_size", "channels", "num_classes")
                if not isinstance(config.get(k), int) or isinstance(config.get(k), bool) or config[k] < 1]
    if problems:
        return problems
    for k in ("mean", "std"):
        value = config.get(k)
        if not isinstance(value, list) or len(value) != config["channels"] or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            problems.append(f"{k} must be {config['channels']} numbers, one per channel")
    if not problems and not all(v > 0 for v in config["std"]):
        problems.append("std must be above 0")
    rescale = config.get("rescale")
    if not isinstance(rescale, (int, float)) or isinstance(rescale, bool) or not rescale > 0:
        problems.append("rescale must be a number above 0")
    labels = config.get("labels", [])
    if not isinstance(labels, list) or (labels and (len(labels) != config["num_classes"]
                                                    or not all(isinstance(x, str) for x in labels))):
        problems.append(f"labels must be {config['num_classes']} strings, or none")
    return problems


VIT = Family(name="vit", graph_files={MODEL: "model.onnx"}, axes=(BATCH,), graphs=graphs, check_config=check_config,
             cpu_unfused=("SkipLayerNormFusion", "BiasGeluFusion"))
