"""Hugging Face ViTForImageClassification -> an edgeformer ViT checkpoint, its preprocessing carried in its config:
`edgeformer import vit HF_FOLDER OUT`. Checked against Hugging Face's own logits before anything is written."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from edgeformer.model.checkpoint import save_checkpoint
from edgeformer.model.config import ConfigError
from edgeformer.model.importers.common import (
    TOLERANCE,
    ImporterError,
    Source,
    expand,
    hf_config,
    hf_reference,
    hf_tensors,
    modules_to_tensors,
    place,
    raise_if,
    refuse,
)
from edgeformer.model.vit import ViT, ViTConfig

VIT_LAYER = {
    "layers.{i}.self_attn.q_proj": "vit.encoder.layer.{i}.attention.attention.query",
    "layers.{i}.self_attn.k_proj": "vit.encoder.layer.{i}.attention.attention.key",
    "layers.{i}.self_attn.v_proj": "vit.encoder.layer.{i}.attention.attention.value",
    "layers.{i}.self_attn.out_proj": "vit.encoder.layer.{i}.attention.output.dense",
    "layers.{i}.self_attn_block.norm": "vit.encoder.layer.{i}.layernorm_before",
    "layers.{i}.ffn.fc1": "vit.encoder.layer.{i}.intermediate.dense",
    "layers.{i}.ffn.fc2": "vit.encoder.layer.{i}.output.dense",
    "layers.{i}.ffn_block.norm": "vit.encoder.layer.{i}.layernorm_after",
}
VIT_TENSORS: dict[str, Source] = {
    "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
    "cls_token": "vit.embeddings.cls_token",
    "positions": "vit.embeddings.position_embeddings",
    **modules_to_tensors({"norm": "vit.layernorm", "head": "classifier"}),
}
# HF's image processor defaults (ViTImageProcessor) where preprocessor_config.json does not say
PROCESSOR_DEFAULTS = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "rescale_factor": 1 / 255}


def _square(value: Any, what: str, problems: list[str]) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            problems.append(f"{what}={value}: square sizes only")
            return 0
        value = value[0]
    return int(value) if isinstance(value, int) else 0


def vit_config(hf: dict[str, Any], processor: dict[str, Any]) -> ViTConfig:
    problems: list[str] = []
    if hf.get("model_type") != "vit":
        problems.append(f"model_type is {hf.get('model_type')!r}, not 'vit'")
    archs = hf.get("architectures") or ["ViTForImageClassification"]
    if archs != ["ViTForImageClassification"]:
        problems.append(f"architectures {archs}: only ViTForImageClassification is supported")
    if hf.get("hidden_act", "gelu") != "gelu":
        problems.append(f"hidden_act={hf.get('hidden_act')!r}: only gelu (exact)")
    if not hf.get("qkv_bias", True):
        problems.append("qkv_bias=false: the attention projections here carry biases")
    image, patch = _square(hf.get("image_size", 224), "image_size", problems), _square(
        hf.get("patch_size", 16), "patch_size", problems)
    size = processor.get("size", {})
    if isinstance(size, dict) and {size.get("height"), size.get("width")} - {None, image}:
        problems.append(f"preprocessor_config.json resizes to {size}, the model takes {image}x{image}")
    if processor.get("do_normalize") is False or processor.get("do_rescale") is False:
        problems.append("an image processor without rescale or normalize: edgeformer's runtime does both")
    refuse(problems, "this ViT config")
    labels = hf.get("id2label") or {}
    names = [str(labels.get(str(i), labels.get(i, i))) for i in range(len(labels))] if labels else []
    settings = {**PROCESSOR_DEFAULTS, **{k: v for k, v in processor.items() if k in PROCESSOR_DEFAULTS}}
    try:
        return ViTConfig(image_size=image, patch_size=patch, channels=hf.get("num_channels", 3),
                         num_classes=len(names) or hf.get("num_labels", 2), d_model=hf["hidden_size"],
                         n_heads=hf["num_attention_heads"], n_layers=hf["num_hidden_layers"],
                         d_ff=hf["intermediate_size"], dropout=0.0, layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
                         labels=tuple(names), rescale=float(settings["rescale_factor"]),
                         mean=tuple(settings["image_mean"]), std=tuple(settings["image_std"]))
    except (ConfigError, KeyError, TypeError) as e:
        raise ImporterError(f"this ViT config cannot be read: {e}") from None


def import_vit(folder: Path | str, out: Path | str, force: bool = False, check: bool = True,
               log: Callable[[str], None] | None = None) -> Path:
    """A Hugging Face ViTForImageClassification folder (config.json, model.safetensors or pytorch_model.bin, and
    preprocessor_config.json where it has one) -> an edgeformer checkpoint at `out`."""
    say = log or (lambda _msg: None)
    folder = Path(folder)
    hf = hf_config(folder)
    processor_file = folder / "preprocessor_config.json"
    processor = json.loads(processor_file.read_text()) if processor_file.is_file() else {}
    config = vit_config(hf, processor)
    theirs = hf_tensors(folder, say)
    raise_if([f"{k}: a pooler, which ViTForImageClassification does not use" for k in theirs
              if k.startswith("vit.pooler.")], "cannot import these weights")
    model = ViT(config).eval()
    place(model, {**expand(modules_to_tensors(VIT_LAYER), config.n_layers), **VIT_TENSORS}, theirs)  # type: ignore[arg-type]
    if check:
        _check_vit(model, folder, say)
    return save_checkpoint(model, Path(out), force=force)  # type: ignore[arg-type]


def _check_vit(model: ViT, folder: Path, say: Callable[[str], None]) -> None:
    reference = hf_reference("ViTForImageClassification", folder, say, attn_implementation="eager")
    if reference is None:
        return
    c = model.config
    pixels = torch.randn(3, c.channels, c.image_size, c.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(pixels), reference(pixel_values=pixels).logits
    diff, allowed = float((a - b).abs().max()), TOLERANCE * max(1.0, float(b.abs().max()))
    if not diff <= allowed:
        raise ImporterError(f"the imported model does not reproduce Hugging Face's ViTForImageClassification: max "
                            f"|logit difference| {diff:.2e} > {allowed:.1e}; nothing was written")
    say(f"max |logit difference| to Hugging Face: {diff:.2e}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="HF_FOLDER")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the comparison with transformers' ViTForImageClassification")


def run(args: argparse.Namespace, out: Path, force: bool, log: Callable[[str], None] | None) -> Path:
    return import_vit(Path(args.source), out, force=force, check=not args.no_check, log=log)
