"""Checkpoints: a folder with `config.json`, `model.safetensors` and, where the model has one, `tokenizer.json`.

No pickle anywhere. Loading reports every missing, unexpected or misshapen tensor at once.
"""

from __future__ import annotations

import json
import pkgutil
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from edgeformer.model.config import ConfigError
from edgeformer.model.tasks import get_task
from edgeformer.model.transformer import Transformer
from edgeformer.runtime.bundle import atomic_folder
from edgeformer.runtime.families import DEFAULT_FAMILY
from edgeformer.runtime.options import GenerationConfig
from edgeformer.runtime.tokenizer import Tokenizer, load_tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
GENERATION_FILE = "generation.json"  # default generation settings (an importer's), carried into the bundle
TASK_FILE = "task.json"  # the built-in task a model was trained on: its variants are judged on that task
DEFAULT_MODEL = "dates"
# Model families on the PyTorch side: family -> its config class and its model class, "module:name". config.json
# names its family; one without a name is the encoder-decoder (every checkpoint written before families were).
MODELS = {"encoder-decoder": ("edgeformer.model.config:TransformerConfig", "edgeformer.model.transformer:Transformer"),
          "vit": ("edgeformer.model.vit:ViTConfig", "edgeformer.model.vit:ViT")}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


def default_checkpoint() -> Path:
    """The trained model that ships inside the package, the default of every verb."""
    return Path(str(resources.files("edgeformer.model") / "weights" / DEFAULT_MODEL))


# The second model that ships inside the package: a ViT trained on the built-in digits (model/vit_train.py).
DIGITS_CHECKPOINT = Path(str(resources.files("edgeformer.model") / "weights" / "digits"))


def state_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """Each parameter once: a shared embedding is stored under its first name only."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters()}


def model_classes(family: str) -> tuple[Any, Any]:
    """The config class and the model class of a model family."""
    if family not in MODELS:
        raise CheckpointError(f"unknown model family {family!r}; this edgeformer knows {', '.join(MODELS)}")
    config_class, model_class = (pkgutil.resolve_name(path) for path in MODELS[family])
    return config_class, model_class


def save_checkpoint(model: Transformer, folder: Path, tokenizer: Tokenizer | None = None,
                    force: bool = False, generation: GenerationConfig | None = None, task: str | None = None) -> Path:
    with atomic_folder(Path(folder), force=force) as tmp:
        config = {"family": model.family, **model.config.to_dict()}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_file(state_tensors(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
        if generation is not None:
            (tmp / GENERATION_FILE).write_text(json.dumps(generation.to_dict(), indent=2) + "\n")
        if task is not None:
            (tmp / TASK_FILE).write_text(json.dumps({"task": task}) + "\n")
    return Path(folder)


def load_checkpoint(folder: Path | str | None = None) -> tuple[Transformer, Tokenizer | None]:
    """Load a checkpoint folder (the shipped model when None) in eval mode, with its tokenizer if it has one."""
    folder = Path(folder) if folder is not None else default_checkpoint()
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder (it should hold {CONFIG_FILE} and "
                              f"{WEIGHTS_FILE})")
    path = folder / CONFIG_FILE
    try:
        settings = json.loads(path.read_text())
        if not isinstance(settings, dict):
            raise CheckpointError(f"{path}: not a JSON object of settings")
        config_class, model_class = model_classes(settings.pop("family", DEFAULT_FAMILY))
        model = model_class(config_class.from_dict(settings))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file; a checkpoint folder holds {CONFIG_FILE}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing; a checkpoint stores its weights there")
    expected = state_tensors(model)
    try:
        with safe_open(str(weights), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({e})") from None
    problems = [f"missing tensor {n} {tuple(t.shape)}" for n, t in expected.items() if n not in tensors]
    problems += [f"unexpected tensor {n} {tuple(t.shape)}" for n, t in tensors.items() if n not in expected]
    problems += [f"tensor {n} has shape {tuple(t.shape)}, the config needs {tuple(expected[n].shape)}"
                 for n, t in tensors.items() if n in expected and t.shape != expected[n].shape]
    if problems:
        raise CheckpointError(f"{weights} does not match {folder / CONFIG_FILE}:\n  " + "\n  ".join(problems))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(tensors[name])
    return model.eval(), load_tokenizer(folder)


def _optional(folder: Path | str | None, file: str, check: Callable[[Any], object], what: str) -> Any:
    """The JSON in a checkpoint's optional `file` (None when it has none), refused unless `check` accepts it."""
    path = (Path(folder) if folder is not None else default_checkpoint()) / file
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
        check(value)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not {what} ({e})") from None
    return value


def load_task(folder: Path | str | None) -> str | None:
    """The built-in task the checkpoint's model was trained on, or None (an imported model, say)."""
    found = _optional(folder, TASK_FILE, lambda d: get_task(d["task"]), "a known built-in task")
    return None if found is None else str(found["task"])


def load_generation(folder: Path | str | None) -> dict[str, Any]:
    """The checkpoint's default generation settings ({} when it has none), as GenerationConfig fields."""
    return dict(_optional(folder, GENERATION_FILE, GenerationConfig.from_dict, "valid generation settings") or {})
