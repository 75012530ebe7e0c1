"""Shared fixtures: bundles exported once per session from the tiny models of tests/helpers.py. Nothing here
imports torch until a test asks for a bundle: the runtime's own tests run without it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.helpers import DATA, SHIPPED_BUNDLES, VARIANTS, tiny_model

if TYPE_CHECKING:
    from edgeformer.model.transformer import Transformer

@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Transformer, Path]]:
    """variant name -> (PyTorch model, bundle folder), exported once per session."""
    import torch

    from edgeformer.export.onnx_export import export
    from edgeformer.model.checkpoint import save_checkpoint

    torch.set_num_threads(2)

    cache: dict[str, tuple[Any, Path]] = {}

    def get(name: str) -> tuple[Transformer, Path]:
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            if name == "demo":
                from edgeformer.model.checkpoint import load_checkpoint

                model, _ = load_checkpoint()
                export(None, root / "bundle")
            else:
                model = tiny_model(**VARIANTS[name])  # type: ignore[arg-type]
                save_checkpoint(model, root / "checkpoint")
                export(root / "checkpoint", root / "bundle")
            cache[name] = (model, root / "bundle")
        return cache[name]

    return get


@pytest.fixture(scope="session")
def shipped_bundle() -> Callable[[str], Path]:
    """name -> a bundle that ships in tests/data (tests/data/make_bundles.py): no torch needed to load it."""
    def get(name: str) -> Path:
        assert name in SHIPPED_BUNDLES, f"{name} does not ship in tests/data"
        return DATA / name

    return get
