"""The model families this edgeformer knows, by name: the one registry of them. A new family is a module that
declares its `Family` (see runtime/spec.py) and one line here."""

from __future__ import annotations

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
