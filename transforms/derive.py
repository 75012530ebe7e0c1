"""Bundle -> new bundle: `edgeformer optimize` and `edgeformer quantize --to int8|int4|fp16`.

Every transform (transforms/registry.py) is applied to every graph of a bundle the same way: the new graphs are
written to a temporary folder, judged against the source bundle on the user's inputs (transforms/judge.py), and
only a variant that passes its gate is moved into place; the manifest records the figures and what they were
measured on.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeformer.export.graph_store import dedupe_initializers, reorder, save_graph, share_across_graphs
from edgeformer.export.parity import ParityError
from edgeformer.runtime.bundle import Manifest, atomic_folder, producer_versions
from edgeformer.runtime.families import get_family
from edgeformer.runtime.providers import require
from edgeformer.runtime.tokenizer import tokenizer_files
from edgeformer.transforms.graph_edits import quiet
from edgeformer.transforms.judge import misses
from edgeformer.transforms.options import AUTO, OptimizeOptions, QuantizeOptions, cpu_presets
from edgeformer.transforms.registry import QUANTIZED, SOURCE, TRANSFORMS, VARIANTS, family_judging, transform

NO_SEARCH = "none"  # derive's `search`: leave out the one-graph search that the source carries


@dataclass
class VariantReport:
    variant: str
    seconds: float
    bundle_bytes: int
    source_bytes: int
    figures: dict = field(default_factory=dict)
    misses: list[str] = field(default_factory=list)
    search: dict | None = None  # the one-graph search the bundle carries, with its check's figures


@dataclass(frozen=True)
class Judging:
    """What a variant is judged on: `eval` a file of inputs (export/evaluation.py), else the bundle's built-in task,
    else random inputs; `metric` where the inputs have references; `inputs`, how many."""

    eval: Path | str | None = None
    metric: str | None = None
    inputs: int = 200
    check_on: tuple[str, ...] = ()  # providers the variant is judged on too (its gate holds on each), then recorded


def derive(bundle: Path | str, out: Path | str, variant: str, options: OptimizeOptions | QuantizeOptions,
           force: bool = False, allow_drop: bool = False, judging: Judging = Judging(),
           log: Callable[[str], None] | None = None, search: str | None = None) -> VariantReport:
    """Apply the transform that makes `variant` to every graph of a bundle, judge the result against the source,
    write it atomically. search: the one-graph search the result carries (transforms/search.py); by default the
    one the source carries, if any; NO_SEARCH for none."""
    say = log or (lambda _msg: None)
    start = time.perf_counter()
    bundle = Path(bundle)
    source = Manifest.load(bundle)
    search = None if search == NO_SEARCH else search or (source.search or {}).get("strategy")
    step = transform(variant)
    if isinstance(judging.check_on, str) or not all(isinstance(c, str) for c in judging.check_on):
        raise ValueError(f"check_on takes provider names, such as ('ggml', 'openvino:CPU'), not {judging.check_on!r}")
    for choice in judging.check_on:  # a provider that is not here fails now, not after the graphs are made
        require(choice)
    if search is not None:  # onnxruntime's BeamSearch takes the concatenated cache, never buffers
        if isinstance(options, OptimizeOptions):
            if options.cache == "buffer":
                raise ValueError(f"a cache in buffers and the {search} search in one graph do not go together: "
                                 "onnxruntime's BeamSearch takes the concatenated cache; pass --cache concat, or "
                                 "--search none to leave the search graph out")
            options = dataclasses.replace(options, cache="concat")
        elif source.cache != "concat":
            raise ValueError(f"{bundle} passes its cache in buffers, which onnxruntime's BeamSearch does not take: "
                             "quantize a bundle optimized with --cache concat for the search in one graph")
    made = variant
    if step.step == "optimize" and source.variant not in (SOURCE, variant):
        made = source.variant  # optimizing a quantized bundle: it stays what it is, held to its own gate
    elif step.step == "quantize" and source.variant in QUANTIZED:
        raise ValueError(f"{bundle} is already {source.variant}; quantize an fp32 (or optimized) bundle")
    family = family_judging(source.family)
    inputs = family.inputs(source, bundle, judging.eval, judging.inputs, metric=judging.metric)
    provider = options.provider if isinstance(options, OptimizeOptions) else "cpu"
    with quiet():
        per_graph, settings = step.make(options, bundle)
        with atomic_folder(Path(out), force=force) as tmp:
            protos, details = {}, {}
            graph_files = get_family(source.family).graph_files  # a search graph is made anew from them
            for name, file in graph_files.items():
                say(f"{made}: {name} graph")
                protos[name], details[name] = per_graph(bundle / file, name, source)
                dedupe_initializers(protos[name])  # onnxruntime's constant folding may have copied a tied table
            # a transform that changed how the graphs pass their cache says so in its graphs' details
            cache = next((d["cache"] for d in details.values() if "cache" in d), source.cache)
            graphs = get_family(source.family).graphs(source.config, cache=cache)
            for name, proto in protos.items():  # a source made before the declared order changed takes it now
                reorder(proto.graph.input, graphs[name].input_names)
            share_across_graphs(list(protos.values()), tmp)
            for name, proto in protos.items():
                save_graph(proto, tmp / graph_files[name])
            for name in tokenizer_files(bundle, source.files) if source.tokenizer else ():
                shutil.copy(bundle / name, tmp / name)
            say(f"{made}: checking against the {source.variant} bundle on {inputs.judged_on['inputs']}")
            # The check needs a loadable bundle: write a provisional manifest first, the final one after.
            record = {"step": step.step, "variant": made, **settings, "keep": list(getattr(options, "keep", [])),
                      "graphs": details, "producer": producer_versions()}
            if record.pop("cache_asked", None) not in (None, cache):
                raise ValueError(f"the graphs of {bundle} cannot pass their cache in buffers: their attention is not "
                                 "in the form the rewrite knows (fused float32, as `optimize` makes of an export)")
            if "cache" in record:  # what the graphs do, which may not be what was asked by default
                record["cache"] = cache
            manifest = dataclasses.replace(source, variant=made, transforms=[*source.transforms, record],
                                           variant_parity={}, files={}, cache=cache, graphs=graphs,
                                           graph_files=dict(graph_files), search=None)
            manifest.save(tmp)
            figures = family.judge(bundle, tmp, inputs, provider=provider)
            gate = TRANSFORMS[made].gate
            missed = misses(gate, figures)
            checked = [{"choice": provider, **figures}]
            for choice in judging.check_on:
                say(f"{made}: checking on {choice}")
                there = family.judge(bundle, tmp, inputs, provider=choice)
                missed += [f"on {choice}: {m}" for m in misses(gate, there)]
                if not any(counts.get(there["asked"]) for counts in there["nodes"].values()):
                    missed.append(f"on {choice}: {there['asked']} runs none of its nodes (the CPU provider ran them "
                                  "all: `edgeformer providers` shows which operators it takes)")
                checked.append({"choice": choice, **there})
            if missed and not allow_drop:
                raise ParityError(f"{made} bundle misses its target against its source bundle: {'; '.join(missed)}. "
                                  "Nothing was written; pass --allow-drop (allow_drop=True) to write it anyway")
            manifest.variant_parity = {**figures, "target": asdict(gate), "misses": missed,
                                       "checked_on": [_on_provider(c) for c in checked]}
            manifest.write(tmp)  # the files are those the first save listed and hashed
            if search is not None:
                from edgeformer.transforms.search import with_search  # onnx's protobuf work, only when asked

                manifest = with_search(tmp, manifest, search, inputs.sources, say)
            size = manifest.bytes(tmp)
    return VariantReport(made, time.perf_counter() - start, size, source.bytes(bundle), figures, missed,
                         manifest.search)


def _on_provider(figures: dict) -> dict:
    """What the manifest keeps of a check on one provider."""
    keys = ("choice", "provider", "asked", "nodes", "notes", "max_abs_logprob_diff", "greedy_token_agreement",
            "metric_variant")
    return {k: figures[k] for k in keys if k in figures}


def optimize(bundle: Path | str, out: Path | str, level: str = "extended", provider: str = "cpu",
             fuse_attention: bool | None = None, cache: str | None = None, **kwargs: Any) -> VariantReport:
    """Transformer fusions, then onnxruntime's offline graph optimization for a provider, saved.

    fuse_attention: None fuses attention into MultiHeadAttention for the providers that run it. cache: how the
    decoder passes its self-attention cache ("buffer" or "concat"; None: buffer on the CPU, concat for a bundle
    that carries its search in one graph, whose operator takes no buffers)."""
    return derive(bundle, out, "fp32-optimized", OptimizeOptions(level, provider, fuse_attention, cache), **kwargs)


def quantize(bundle: Path | str, out: Path | str, to: str, preset: str = "avx2", block_size: int = 32,
             keep: list[str] | None = None, method: str = "dynamic", calibration: Path | str | None = None,
             calibration_size: int = 64, **kwargs: Any) -> VariantReport:
    """int8 (method 'dynamic', or 'static': QDQ calibrated on the inputs in the file `calibration`, else on the
    bundle's task's training split, else on random inputs), int4 or fp16. int8 with preset 'auto': the presets of
    this CPU (`cpu_presets`), fastest first, the first whose bundle passes its gate."""
    if to not in QUANTIZED:
        raise ValueError(f"unknown quantization {to!r}; choose one of {', '.join(QUANTIZED)}")
    calibrate = None
    if to == "int8" and method == "static":
        source = Manifest.load(Path(bundle), verify=False)  # derive verifies it
        calibrate = family_judging(source.family).inputs(source, Path(bundle), calibration, calibration_size,
                                                          split="train", seed=17)
    first, *then = cpu_presets() if preset == AUTO and to == "int8" else (preset,)
    options = QuantizeOptions(first, method, block_size, list(keep or []), calibrate)
    for fallback in then:  # a preset with one after it is written only if it passes its gate, allow_drop or not
        try:
            return derive(bundle, out, to, options, **{**kwargs, "allow_drop": False})
        except ParityError:
            (kwargs.get("log") or print)(f"preset {options.preset} misses the int8 gate; trying preset {fallback}")
            options = dataclasses.replace(options, preset=fallback)
    return derive(bundle, out, to, options, **kwargs)


def build_variants(fp32: Path | str, folder: Path | str, variants: Sequence[str],
                   log: Callable[[str], None] | None = None) -> dict[str, tuple[Path, VariantReport | None]]:
    """The bundles of `variants` from an exported fp32 bundle, each made from the variant the registry says a
    deployment makes it from (int8 and int4 from the optimized bundle, so that they keep its fused attention), with
    default options. Returns {variant: (path, report)} in the order asked; fp32 has no report."""
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    built: dict[str, tuple[Path, VariantReport | None]] = {SOURCE: (Path(fp32), None)}

    def build(variant: str) -> Path:
        if variant not in built:
            t = transform(variant)
            source, path = build(t.source), Path(folder) / variant
            options = OptimizeOptions() if t.step == "optimize" else QuantizeOptions()
            built[variant] = (path, derive(source, path, variant, options, log=log))
        return built[variant][0]

    for v in variants:
        build(v)
    return {v: built[v] for v in (SOURCE, *variants)}
