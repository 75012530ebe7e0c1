"""The model families this edgeformer knows, by name: the one registry of them. A new family is a module that
declares its `Family` (see runtime/spec.py) and one line here."""

from __future__ import annotations

import json
import pkgutil
from pathlib import Path
from typing import Any

from edgeformer.runtime.encoder_decoder import ENCODER_DECODER
from edgeformer.runtime.spec import Family
from edgeformer.runtime.vit import VIT

FAMILIES: dict[str, Family] = {f.name: f for f in (ENCODER_DECODER, VIT)}
DEFAULT_FAMILY = ENCODER_DECODER.name  # bundles written before manifests named their family


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; this edgeformer knows {', '.join(FAMILIES)} "
                         "(a newer edgeformer may know more)")
    return FAMILIES[name]


# The runtime of each family whose bundles `Runtime(bundle)` does not run itself: family -> "module:class".
RUNTIMES = {VIT.name: "edgeformer.runtime.classifier:Classifier"}


def family_runtime(folder: Path) -> Any:
    """The runtime class of the bundle in `folder`, where its manifest names a family in RUNTIMES; else None (the
    encoder-decoder's Runtime, which reads the manifest in full and says what is wrong with it)."""
    try:
        with open(folder / "edgeformer.json", "rb") as f:
            family = json.loads(f.read(1 << 20)).get("family")
    except (OSError, ValueError, AttributeError):
        return None
    return pkgutil.resolve_name(RUNTIMES[family]) if isinstance(family, str) and family in RUNTIMES else None
