"""`edgeformer providers`: what this machine offers (provider, device, vendor, where it comes from), and how each
bundle variant runs on each: the nodes each provider takes of every graph, and whether its tokens are the CPU's."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edgeformer.runtime.errors import EdgeformerError, ProviderFallback
from edgeformer.runtime.providers import CPU, built_in, devices, plugins, short


def offers() -> list[dict[str, Any]]:
    """One row per (provider, device) this machine offers, then a row for each plugin package that offers none."""
    rows = []
    by_provider = {n: p for p in plugins() for n in p.providers}
    for d in devices():
        plugin = by_provider.get(d.provider)
        rows.append({"choice": d.label if d.provider != CPU else "cpu", "provider": d.provider, "device": d.kind,
                     "vendor": d.vendor, "provider vendor": d.provider_vendor,
                     "from": f"{plugin.distribution} {plugin.version}" if plugin else f"onnxruntime {ort.__version__}",
                     "status": "offered"})
    listed = {r["provider"] for r in rows}
    for name in built_in():  # a wheel's own providers that the device API does not list
        if name not in listed:
            rows.append({"choice": short(name), "provider": name, "device": "-", "vendor": "-",
                         "provider vendor": "-", "from": f"onnxruntime {ort.__version__}", "status": "offered"})
    for plugin in plugins():
        if not any(n in listed for n in plugin.providers):
            rows.append({"choice": "-", "provider": ", ".join(plugin.providers) or "?", "device": "-", "vendor": "-",
                         "provider vendor": "-", "from": f"{plugin.distribution} {plugin.version}",
                         "status": plugin.problem or "registered, lists no device on this machine"})
    return rows


def outputs(rt: Any, new_tokens: int = 16) -> list:
    """What a bundle's answer on a provider is compared by: a classifier's top class for four random images of its
    size, a generator's greedy tokens (EOS ignored) for four random inputs."""
    rng = np.random.default_rng(0)
    c = rt.config
    if hasattr(rt, "classify"):
        images = rng.integers(0, 256, (4, c["image_size"], c["image_size"], c["channels"]), dtype=np.uint8)
        return [int(i) for i in rt.logits(images).argmax(-1)]
    sources = [[int(t) for t in rng.integers(4, int(c["src_vocab_size"]), 12)] for _ in range(4)]
    gen = rt.generation_config(strategy="greedy", max_new_tokens=new_tokens, num_return_sequences=1, ignore_eos=True)
    return [h[0].tokens for h in rt.generate(sources, gen)]


def variants_on(bundles: Sequence[Path], choices: Sequence[str]) -> list[dict[str, Any]]:
    """Each bundle on each choice: where its graphs' nodes run, the notes of what fell back, and whether its
    outputs (`outputs`) equal the CPU provider's ("tokens as CPU")."""
    from edgeformer.runtime.session import Runtime

    rows = []
    for bundle in bundles:
        reference = Runtime(bundle, threads=2)
        expected = outputs(reference)
        for choice in choices:
            row: dict[str, Any] = {"bundle": str(bundle), "variant": reference.variant, "choice": choice}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ProviderFallback)  # kept in provider_notes
                    rt = Runtime(bundle, providers=[choice], threads=2)
                got = outputs(rt)
            except EdgeformerError as e:
                rows.append({**row, "runs on": "-", "nodes": {}, "tokens as CPU": None, "notes": [str(e)]})
                continue
            rows.append({**row, "runs on": rt.provider, "nodes": rt.assigned, "tokens as CPU": got == expected,
                         "notes": rt.provider_notes})
    return rows


def nodes_text(nodes: dict[str, dict[str, int]], provider: str) -> str:
    """'encoder 253/253, decoder 0/350': of each graph's nodes, how many `provider` runs (none recorded: the CPU
    provider runs them all)."""
    if not nodes:
        return "all on the CPU provider"
    return ", ".join(f"{Path(file).stem} {counts.get(provider, 0)}/{sum(counts.values())}"
                     for file, counts in nodes.items())
