"""Importers, by the name `edgeformer import NAME` takes: the one registry of them. An importer is a module with
`add_arguments(parser)` and `run(args, out, force, log) -> checkpoint folder`; a new one is such a module and a
line here. Modules are imported when asked for (each needs torch, and may need packages of its own)."""

from __future__ import annotations

import importlib
from typing import Any

IMPORTERS = {  # name -> (module, what it reads)
    "marian": ("edgeformer.model.importers.marian", "a Hugging Face MarianMT (OPUS-MT) folder"),
    "torch-transformer": ("edgeformer.model.importers.torch_transformer",
                          "a state dict of a model built on torch.nn.Transformer"),
    "vit": ("edgeformer.model.importers.vit", "a Hugging Face ViTForImageClassification folder"),
}


def importer(name: str) -> Any:
    """The importer module registered as `name`."""
    if name not in IMPORTERS:
        raise ValueError(f"unknown importer {name!r}; choose one of {', '.join(IMPORTERS)}")
    return importlib.import_module(IMPORTERS[name][0])
