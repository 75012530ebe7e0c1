"""`edgeformer VERB ...`: one verb per stage, each a thin layer over a Python function of the same name.

`generate` and `info` need only the runtime (numpy + onnxruntime); the other verbs import torch lazily and say
how to install it when it is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgeformer.report.format import figure_text, table


def _need_export_extra(module: str = "torch") -> None:
    """Verbs past the runtime need the export extra: torch (export, import, train...) or onnx (the transforms)."""
    try:
        importlib.import_module(module)
    except ImportError:
        sys.exit(f"this verb needs {module}, in the export extra: pip install torch==2.13.0 'edgeformer[export]'")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"give a number of at least 1, not {value}")
    return value


GEN_FLAGS = {"strategy": "strategy", "max_new_tokens": "max_new_tokens", "min_new_tokens": "min_new_tokens",
             "beams": "num_beams", "length_penalty": "length_penalty", "n_best": "num_return_sequences",
             "temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "seed": "seed"}


def _gen_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The generation settings a user gave as flags, by GenerationConfig's names."""
    return {field: getattr(args, flag) for flag, field in GEN_FLAGS.items() if getattr(args, flag) is not None}


def _gen_config(args: argparse.Namespace, defaults: Any = None) -> Any:
    """The flags a user gave, over the bundle's defaults (over GenerationConfig's when there is no bundle)."""
    from edgeformer.runtime.options import GenerationConfig

    return dataclasses.replace(defaults or GenerationConfig(), **_gen_flags(args))


def cmd_train(args: argparse.Namespace) -> None:
    _need_export_extra()
    import torch

    from edgeformer.model.train import TrainConfig, train

    torch.set_num_threads(args.threads) if args.threads else None
    if args.task == "digits":  # the image task: a ViT (model/vit_train.py)
        from edgeformer.model.vit_train import DigitsTraining, train_digits

        found = train_digits(Path(args.out), DigitsTraining(steps=args.steps or DigitsTraining.steps, seed=args.seed),
                             force=args.force, progress=not args.json)
        if args.json:
            print(json.dumps(found))
            return
        print(table(["metric", "value"], [["held-out accuracy", f"{found['accuracy']:.2%}"],
                                           ["training time", f"{found['train_seconds']:.0f} s"],
                                           ["parameters", f"{found['parameters']:,}"]]))
        print(f"checkpoint written to {args.out}")
        return
    metrics = train(Path(args.out), TrainConfig(task=args.task, steps=args.steps or 1500, seed=args.seed),
                    force=args.force, progress=not args.json)
    if args.json:
        print(json.dumps(metrics))
    else:
        print(table(["metric", "value"], [["held-out exact match", f"{metrics['exact_match']:.2%}"],
                                           ["training time", f"{metrics['train_seconds']:.0f} s"],
                                           ["parameters", f"{metrics['parameters']:,}"],
                                           ["checkpoint size", f"{metrics['checkpoint_bytes'] / 1e6:.2f} MB"]]))
        print(f"checkpoint written to {args.out}")


def cmd_export(args: argparse.Namespace) -> None:
    _need_export_extra()
    from edgeformer.export.onnx_export import export

    checkpoint, out = (None, args.paths[0]) if len(args.paths) == 1 else args.paths
    log = None if args.json else (lambda msg: print(f"  {msg}...", flush=True))

    def search(folder: Path, manifest: Any) -> Any:  # the one-graph search, checked on the variants' inputs
        from edgeformer.transforms.registry import family_judging
        from edgeformer.transforms.search import with_search

        sources = family_judging(manifest.family).inputs(manifest, folder, None, 200).sources
        return with_search(folder, manifest, args.search, sources, log)

    if args.layout == "optimum":
        _refuse_with_layout(args)
        with _layout(Path(out), args, log) as staged:
            result = export(checkpoint, staged, log=log)
        return
    result = export(checkpoint, Path(out), force=args.force, log=log, finish=search if args.search else None)
    if args.json:
        print(json.dumps({"path": str(result.path), "seconds": result.seconds, "bytes": result.bundle_bytes,
                          "parity": result.parity, "search": result.search}))
        return
    p = result.parity
    print(table(["", ""], [["bundle", str(result.path)], ["export time", f"{result.seconds:.1f} s"],
                           ["bundle size", f"{result.bundle_bytes / 1e6:.2f} MB"],
                           *[[f"max |diff| {graph}" + (" logits" if graph == "decoder" else ""), f"{diff:.2e}"]
                             for graph, diff in p["max_abs_diff"].items()],
                           *[[label, f"{p[key]:.2%}"] for key, label in (("greedy_token_agreement",
                                                                          "greedy token agreement"),
                                                                         ("top1_agreement", "top-1 agreement"))
                             if key in p],
                           *([["search in one graph", _searched(result.search)]] if result.search else [])]))


def _refuse_with_layout(args: argparse.Namespace) -> None:
    if getattr(args, "search", None) not in (None, "none"):
        raise ValueError("--layout optimum has no search in one graph (Optimum searches in Python); leave out "
                         "--search")


@contextlib.contextmanager
def _layout(out: Path, args: argparse.Namespace, log: Callable[[str], None] | None) -> Any:
    """Where a verb writes the bundle that `--layout optimum` then cuts into Optimum's layout at `out`; the new
    folder is checked against that bundle before it appears at `out`, the bundle gone."""
    import shutil

    from edgeformer.runtime.bundle import Manifest, atomic_folder
    from edgeformer.transforms.optimum_layout import write_into
    from edgeformer.transforms.registry import family_judging

    # The bundle is staged inside the new folder's temporary one: whatever a killed run leaves, the next writer of
    # OUT removes (runtime/bundle.py, atomic_folder).
    with atomic_folder(out, force=args.force) as tmp:
        staged = tmp / ".staging" / "bundle"
        yield staged
        manifest = Manifest.load(staged, verify=False)  # written just now, by us
        sources = family_judging(manifest.family).inputs(manifest, staged, None, 200).sources
        report = write_into(staged, tmp, sources, log=log)
        shutil.rmtree(tmp / ".staging")
        sizes = {p.name: p.stat().st_size for p in tmp.iterdir()}
    if args.json:
        print(json.dumps({"path": str(out), "layout": "optimum", "variant": manifest.variant, "check": report,
                          "bytes": sum(sizes.values())}))
        return
    print(table(["", ""], [["folder", f"{out} (Optimum's layout: ORTModelForSeq2SeqLM.from_pretrained)"],
                           ["variant", manifest.variant], ["size", f"{sum(sizes.values()) / 1e6:.2f} MB"],
                           ["check", f"tokens identical to the bundle's on {report['inputs']} inputs, "
                                     + " and ".join(report["settings"]) + _ties(report)]]))


def cmd_import(args: argparse.Namespace) -> None:
    """The importer's own arguments are read by the importer's parser, built only for the importer asked for."""
    _need_export_extra()
    from edgeformer.model.importers import IMPORTERS, importer

    module = importer(args.kind)
    parser = argparse.ArgumentParser(prog=f"edgeformer import {args.kind}", description=IMPORTERS[args.kind][1])
    module.add_arguments(parser)
    parser.add_argument("out", metavar="OUT", help="the checkpoint folder to write")
    parser.add_argument("--force", action="store_true", help="replace an existing checkpoint at OUT")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(args.arguments)
    log = None if args.json else (lambda msg: print(f"  {msg}...", flush=True))
    start = time.perf_counter()
    out = module.run(args, Path(args.out), args.force, log)
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({"checkpoint": str(out), "seconds": seconds}))
    else:
        print(f"checkpoint {out} written in {seconds:.1f} s; next: edgeformer export {out} BUNDLE")


def _show_variant(report: Any, as_json: bool) -> None:
    f = report.figures
    if as_json:
        print(json.dumps({"variant": report.variant, "seconds": report.seconds, "bytes": report.bundle_bytes,
                          "source_bytes": report.source_bytes, "figures": f, "misses": report.misses,
                          "search": report.search}))
        return
    rows = [["variant", report.variant], ["time", f"{report.seconds:.1f} s"],
            ["size", f"{report.bundle_bytes / 1e6:.2f} MB ({report.bundle_bytes / report.source_bytes:.0%} of the "
                     "source)"],
            ["judged on", f"{f['judged_on']['inputs']} ({f['inputs']} inputs)"],
            [f"max |log-prob diff| to the {f['against']}", f"{f['max_abs_logprob_diff']:.2e}"],
            [f"{f.get('agreement', 'greedy token')} agreement", f"{f['greedy_token_agreement']:.2%}"]]
    if "metric" in f:
        rows.append([f"{f['metric']} (source -> this)", f"{f['metric_source']:.2f} -> {f['metric_variant']:.2f}"])
    if report.misses:
        rows.append(["TARGET MISSED (--allow-drop)", "; ".join(report.misses)])
    if report.search:
        rows.append(["search in one graph", _searched(report.search)])
    print(table(["", ""], rows))


def _searched(search: dict) -> str:
    checked = search.get("check") or {}
    return f"{search['strategy']}" + (f", tokens identical to the runtime's on {checked['inputs']} inputs x "
                                      f"{checked['settings']} settings{_ties(checked)}" if checked else "")


def _ties(check: dict) -> str:
    """What a check's figures say of near ties (transforms/compare.py), if it took any."""
    n = check.get("near_ties", 0)
    return f", but for {n} near tie{'s' if n > 1 else ''} (within {check['near_tie_nats']} nats a token)" if n else ""


def _derive_options(args: argparse.Namespace) -> dict[str, Any]:
    """What every bundle-to-bundle verb passes on: overwrite, gate, judging, progress."""
    from edgeformer.transforms.derive import Judging

    return {"force": args.force, "allow_drop": args.allow_drop, "search": args.search,
            "judging": Judging(args.eval, args.metric, args.eval_size,
                               tuple(c.strip() for c in (args.check_on or "").split(",") if c.strip())),
            "log": None if args.json else (lambda msg: print(f"  {msg}...", flush=True))}


def cmd_optimize(args: argparse.Namespace) -> None:
    _need_export_extra("onnx")
    from edgeformer.transforms.derive import optimize

    attention = {"auto": None, "yes": True, "no": False}[args.fuse_attention]
    cache = None if args.cache == "auto" else args.cache
    if args.layout == "optimum":
        if cache == "buffer":
            raise ValueError("--layout optimum takes the cache concatenated, as Optimum passes it: leave out "
                             "--cache buffer")
        with _staged(args) as options:
            optimize(args.bundle, options.pop("out"), level=args.level, provider=args.provider,
                     fuse_attention=attention, cache="concat", **options)
        return
    _show_variant(optimize(args.bundle, args.out, level=args.level, provider=args.provider, fuse_attention=attention,
                           cache=cache, **_derive_options(args)), args.json)


@contextlib.contextmanager
def _staged(args: argparse.Namespace) -> Any:
    """A bundle-to-bundle verb's options with `--layout optimum`: its bundle written where _layout stages it."""
    from edgeformer.runtime.optimum import is_optimum_folder

    if is_optimum_folder(Path(args.bundle)):
        raise ValueError(f"{args.bundle} is in Optimum's layout; {args.verb} the bundle it was made from, with "
                         "--layout optimum")
    _refuse_with_layout(args)
    options = _derive_options(args)
    options.pop("force")
    options["search"] = "none"
    log = options["log"]
    with _layout(Path(args.out), args, log) as staged:
        yield {**options, "out": staged}


def cmd_quantize(args: argparse.Namespace) -> None:
    _need_export_extra("onnx")
    from edgeformer.transforms.derive import quantize

    settings = {"to": args.to, "preset": args.preset, "block_size": args.block_size, "keep": args.keep,
                "method": args.method, "calibration": args.calibration, "calibration_size": args.calibration_size}
    if args.layout == "optimum":
        with _staged(args) as options:
            quantize(args.bundle, options.pop("out"), **settings, **options)
        return
    _show_variant(quantize(args.bundle, args.out, **settings, **_derive_options(args)), args.json)


def cmd_info(args: argparse.Namespace) -> None:
    from edgeformer.runtime.bundle import Manifest
    from edgeformer.runtime.optimum import OptimumFolder, is_optimum_folder

    if is_optimum_folder(Path(args.bundle)):
        folder = OptimumFolder(Path(args.bundle))
        summary = folder.summary()
        if args.json:
            print(json.dumps(summary, indent=2))
            return
        print(table(["", ""], [[k, json.dumps(v) if isinstance(v, (dict, list)) else str(v)]
                               for k, v in summary.items()]))
        return
    m = Manifest.load(Path(args.bundle))
    if args.json:
        print(json.dumps(m.to_dict(), indent=2))
        return
    c = m.config
    print(f"bundle {args.bundle}: {m.family}, variant {m.variant}, format v{m.format_version}, opset {m.opset}, "
          f"{m.bytes(Path(args.bundle)) / 1e6:.2f} MB" + (f", cache {m.cache}" if m.family != "vit" else "")
          + (f", trained on the built-in task {m.task}" if m.task else ""))
    if m.family == "vit":
        print(f"model: ViT, {c['image_size']}x{c['image_size']} images of {c['channels']} channels in patches of "
              f"{c['patch_size']}, d_model {c['d_model']}, {c['n_heads']} heads, {c['n_layers']} layers, d_ff "
              f"{c['d_ff']}, {c['num_classes']} classes")
        print(f"preprocessing: uint8 pixels x {c['rescale']:.6g}, then (x - {c['mean']}) / {c['std']}, channels first")
    else:
        _model_line(c, m)
    _show_bundle(m)


def _model_line(c: Any, m: Any) -> None:
    print(f"model: d_model {c['d_model']}, {c['n_heads']} heads, {c['n_encoder_layers']}+{c['n_decoder_layers']} "
          f"layers, d_ff {c['d_ff']}, vocab {c['src_vocab_size']}/{c['tgt_vocab_size']}, {c['activation']}, "
          f"{c['position']} positions" + (f" (at most {m.max_positions})" if m.max_positions else " (unbounded)")
          + f", {c['norm']}-norm")


def _show_bundle(m: Any) -> None:
    if m.generation:
        print("generation defaults: " + ", ".join(f"{k} {v}" for k, v in m.generation.items()))
    if m.search:
        checked = m.search.get("check") or {}
        print(f"search in one graph ({m.graph_files.get('search')}): {m.search['strategy']}, early stopping "
              f"{m.search['early_stopping']}" + (f"; tokens identical to the runtime's search on {checked['inputs']} "
                                                 f"inputs x {checked['settings']} settings{_ties(checked)}"
                                                 if checked else ""))
    for name, spec in m.graphs.items():
        print(f"\n{name} graph ({m.graph_files[name]})")
        rows = [["in", t.name, t.dtype, "(" + ", ".join(map(str, t.shape)) + ")"] for t in spec.inputs]
        rows += [["out", t.name, t.dtype, "(" + ", ".join(map(str, t.shape)) + ")"] for t in spec.outputs]
        print(table(["", "name", "dtype", "shape"], _fold_cache_rows(rows)))
    for title, show in (("parity at export", _show_parity), ("transforms", _show_transforms),
                        ("variant parity", _show_variant_parity)):
        shown = io.StringIO()
        try:
            with contextlib.redirect_stdout(shown):
                show(m)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError):  # records a stranger's tool wrote
            record = {"parity at export": m.parity, "transforms": m.transforms, "variant parity": m.variant_parity}
            shown = io.StringIO(f"\n{title} (as recorded, not in the form this edgeformer writes):\n"
                                f"{json.dumps(record[title], indent=1)[:4000]}\n")
        print(shown.getvalue(), end="")
    print("\nproduced by " + ", ".join(f"{k} {v}" for k, v in m.producer.items()))


def _show_parity(m: Any) -> None:
    p = m.parity
    if p and "images_compared" in p:  # an image classifier's
        print(f"\nparity against {p['reference']} at export ({p['provider']}, {p['images_compared']} images at batch "
              f"sizes {p['batches']}): max |logit diff| {p['max_abs_diff']['model']:.2e}, top-1 agreement "
              f"{p['top1_agreement']:.2%}")
        return
    if p:
        print(f"\nparity against {p['reference']} at export ({p['provider']}, {p['tokens_compared']} decoding steps):")
        print(table(["graph", "max |diff|", "tolerance"],
                    [[g, f"{d:.2e}", f"{p['tolerance']['atol']:.0e} + {p['tolerance']['rtol']:.0e}*max|ref|"]
                     for g, d in p["max_abs_diff"].items()]))
        print(f"greedy token agreement: {p['greedy_token_agreement']:.2%}")


def _show_transforms(m: Any) -> None:
    for t in m.transforms:
        settings = ", ".join(f"{k} {v}" for k, v in t.items()
                             if k not in ("graphs", "variant", "step") and v not in ([], None))
        print(f"\n{t.get('step', 'transform')} -> {t['variant']}: {settings}")
        for graph, details in t.get("graphs", {}).items():
            fused = details.get("fused_operators")
            if fused is not None:
                print(f"  {graph}: fused " + (", ".join(f"{k} x{v}" for k, v in fused.items()) or "nothing"))


def _show_variant_parity(m: Any) -> None:
    from edgeformer.runtime.survey import nodes_text

    v = m.variant_parity
    if v:
        judged = v.get("judged_on", {}).get("inputs", "inputs")
        print(f"\n{m.variant} against the {v['against']} on {v['inputs']} {judged}: max |log-prob diff| "
              f"{v['max_abs_logprob_diff']:.2e}, {v.get('agreement', 'greedy token')} agreement "
              f"{v['greedy_token_agreement']:.2%}"
              + (f", {v['metric']} {v['metric_source']:.2f} -> {v['metric_variant']:.2f}" if "metric" in v else ""))
        if v.get("checked_on"):
            print(table(["checked on", "provider", "max |log-prob diff|", "greedy agreement", "nodes on it"],
                        [[c["choice"], c["provider"], f"{c['max_abs_logprob_diff']:.2e}",
                          f"{c['greedy_token_agreement']:.2%}",
                          nodes_text(c["nodes"], c.get("asked", c["provider"])) if c.get("nodes") else "all"]
                         for c in v["checked_on"]]))
        if v.get("misses"):
            print("WARNING: written with --allow-drop; misses its target: " + "; ".join(v["misses"]))


def _fold_cache_rows(rows: list[list[str]]) -> list[list[str]]:
    """Show the per-layer cache tensors as one line per kind rather than one per layer."""
    out, seen = [], set()
    for row in rows:
        name = row[1]
        parts = name.split(".")
        if len(parts) == 4 and parts[1].isdigit():
            key = (row[0], parts[0], parts[2], parts[3])
            if key in seen:
                continue
            seen.add(key)
            row = [row[0], f"{parts[0]}.{{i}}.{parts[2]}.{parts[3]}", row[2], row[3]]
        out.append(row)
    return out


def cmd_generate(args: argparse.Namespace) -> None:
    from edgeformer.runtime.errors import InputError
    from edgeformer.runtime.session import Runtime
    from edgeformer.runtime.tokenizer import parse_ids

    rt = Runtime(args.bundle, providers=args.provider.split(","), threads=args.threads,
                 decoder_threads=args.decoder_threads, limits=_limits(args), search=args.search)
    if not hasattr(rt, "generate"):
        raise InputError(f"{args.bundle} is an image classifier's bundle: `edgeformer classify {args.bundle} "
                         "IMAGE ...`")
    if rt.misses:
        print(f"warning: this {rt.variant} bundle was written with --allow-drop and misses its target: "
              + "; ".join(rt.misses), file=sys.stderr)
    gen = _gen_config(args, rt.generation)
    inputs = args.inputs or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not inputs:
        raise InputError("nothing to generate: give inputs as arguments or on standard input")
    if args.ids or rt.tokenizer is None:
        try:
            src = [parse_ids(s) for s in inputs]
        except ValueError:
            raise InputError("inputs must be space-separated token ids (this bundle has no tokenizer, or --ids "
                             "was given)") from None
    else:
        src = rt.tokenize(inputs)
    start = time.perf_counter()
    hyps = rt.generate(src, gen)
    seconds = time.perf_counter() - start
    where = "one graph" if rt.search_session is not None and not rt.graph_runs(gen) else "Python"

    def show(tokens: list[int]) -> str:
        return rt.tokenizer.decode(tokens) if rt.tokenizer is not None and not args.ids else " ".join(
            map(str, tokens))

    if args.json:
        print(json.dumps({"provider": rt.provider, "search": where, "seconds": seconds, "outputs": [
            [{"output": show(h.tokens), "tokens": h.tokens, "score": h.score} for h in hs] for hs in hyps]}))
        return
    rows = [[inp, show(h.tokens), f"{h.score:.3f}"] for inp, hs in zip(inputs, hyps, strict=True) for h in hs]
    print(table(["input", "output", "score"], rows))
    print(f"{len(inputs)} inputs in {seconds * 1000:.0f} ms on {rt.provider}, searched in {where}")


def cmd_providers(args: argparse.Namespace) -> None:
    from edgeformer.runtime.engine import provider
    from edgeformer.runtime.survey import nodes_text, offers, variants_on

    found = offers()
    choices = [r["choice"] for r in found if r["status"] == "offered"]
    runs = variants_on([Path(b) for b in args.bundles], choices) if args.bundles else []
    if args.json:
        print(json.dumps({"providers": found, "variants": runs}, indent=1))
        return
    keys = ["choice", "provider", "device", "vendor", "provider vendor", "from", "status"]
    print(table(keys, [[r[k] for k in keys] for r in found]))
    if runs:
        print()
        print(table(["bundle", "variant", "choice", "runs on", "nodes on the provider asked", "outputs = CPU's"],
                    [[Path(r["bundle"]).name, r["variant"], r["choice"], r["runs on"],
                      nodes_text(r["nodes"], provider(r["choice"]).name) if r["runs on"] != "-" else "-",
                      {True: "yes", False: "NO", None: "-"}[r["tokens as CPU"]]] for r in runs]))
        for r in runs:
            for note in r["notes"]:
                print(f"note: {Path(r['bundle']).name} on {r['choice']}: {note}")


def cmd_classify(args: argparse.Namespace) -> None:
    import numpy as np

    from edgeformer.runtime.classifier import Classifier
    from edgeformer.runtime.errors import InputError

    rt = Classifier(args.bundle, providers=args.provider.split(","), threads=args.threads)
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise ImportError("reading images needs Pillow: pip install 'edgeformer[images]'") from None
    size, mode = rt.config["image_size"], {1: "L", 3: "RGB"}.get(rt.config["channels"])
    if mode is None:
        raise InputError(f"{rt.config['channels']}-channel images: classify them as arrays with Runtime.classify")
    images = []
    for path in args.images:
        try:
            with Image.open(path) as image:  # resized as the model was trained: bilinear, to its square
                images.append(np.asarray(image.convert(mode).resize((size, size), Image.Resampling.BILINEAR)))
        except (OSError, UnidentifiedImageError) as e:
            raise InputError(f"{path}: not an image Pillow reads ({e})") from None
    found = rt.classify(np.stack(images), top_k=args.top_k)
    if args.json:
        print(json.dumps([{"image": p, "top": [{"label": label, "probability": prob} for label, prob in top]}
                          for p, top in zip(args.images, found, strict=True)]))
        return
    print(table(["image", "label", "probability"], [[p, label, f"{prob:.3f}"] for p, top in
                                                     zip(args.images, found, strict=True) for label, prob in top]))


def _need_serve_extra() -> None:
    try:
        importlib.import_module("ray.serve")
    except ImportError:
        sys.exit("this verb needs Ray, in the serve extra: pip install 'edgeformer[serve]'")


def _limits(args: argparse.Namespace) -> Any:
    from edgeformer.runtime.options import Limits

    return Limits(source_tokens=args.limit_source_tokens, new_tokens=args.limit_new_tokens, rows=args.limit_rows)


def cmd_serve(args: argparse.Namespace) -> None:
    _need_serve_extra()
    from edgeformer.runtime.errors import InputError
    from edgeformer.runtime.session import Runtime
    from edgeformer.serve.service import Settings, serve_bundle

    # a bundle or an option that cannot serve is refused here, before Ray starts
    rt = Runtime(args.bundle, providers=args.provider.split(","), threads=args.threads, limits=_limits(args))
    if not hasattr(rt, "generate"):
        raise InputError(f"{args.bundle} is an image classifier's bundle; serve serves bundles that generate")
    del rt
    if not 0 <= args.batch_wait_ms <= 1000:
        raise InputError(f"--batch-wait-ms {args.batch_wait_ms}: give a wait in [0, 1000] ms")
    if not 1 <= args.port <= 65535:
        raise InputError(f"--port {args.port}: give a port in [1, 65535]")
    settings = Settings(str(Path(args.bundle).resolve()), max_batch=args.max_batch,
                        batch_wait_ms=args.batch_wait_ms, threads=args.threads,
                        providers=tuple(args.provider.split(",")), limits=_limits(args))
    serve_bundle(settings, replicas=args.replicas, host=args.host, port=args.port, replica_cpus=args.replica_cpus,
                 log_level=args.log_level, proxy=args.proxy, metrics_port=args.metrics_port)


def cmd_translate(args: argparse.Namespace) -> None:
    from edgeformer.serve.corpus import translate

    summary = translate(args.bundle, args.input, args.output, settings=_gen_flags(args), batch_size=args.batch_size,
                        engine=args.engine, replicas=args.replicas, as_ids=args.ids, threads=args.threads,
                        limits=_limits(args), force=args.force,
                        log=lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(dataclasses.asdict(summary)))
    else:
        print(f"{summary.lines:,} lines translated into {args.output} in {summary.seconds:.1f} s ({summary.engine}"
              + (f"; {summary.resumed} of {summary.batches} batches from an earlier run)" if summary.resumed else ")"))


def cmd_parity(args: argparse.Namespace) -> None:
    _need_export_extra()
    from edgeformer.export.families import family_export
    from edgeformer.runtime.bundle import Manifest

    family = Manifest.load(Path(args.bundle), verify=False).family
    report = family_export(family).runtime_parity(Path(args.bundle), args.checkpoint, n=args.n, eval=args.eval)
    if args.json:
        print(json.dumps(report))
        return
    print(table(["check", "result"], [[k, figure_text(k, v)] for k, v in report.items()]))


def cmd_demo(args: argparse.Namespace) -> None:
    _need_export_extra()
    from edgeformer.cli.demo import demo

    demo(threads=args.threads)


def _throughput(args: argparse.Namespace) -> None:
    _need_export_extra()
    from edgeformer.benchmarks.throughput import main as throughput

    throughput(args.rest, prog="edgeformer bench throughput")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def cmd_bench(args: argparse.Namespace) -> None:
    _need_export_extra()
    if args.providers == "all":
        from edgeformer.benchmarks.providers import compare, markdown, parse_pythons

        rows = compare(args.checkpoint, parse_pythons(args.python), rounds=args.rounds, threads=args.base_threads,
                       out=Path(args.out) if args.out else None,
                       variants=args.variants.split(",") if args.variants else None,
                       log=(lambda _m: None) if args.json else print)
        if args.json:
            print(json.dumps(rows, default=str))
            return
        print(markdown(rows, list(dict.fromkeys(p for r in rows for p in r["speed"]))))
        if args.out:
            print(f"results (JSON, Markdown, PNG) in {args.out}")
        return
    if args.python:
        raise ValueError("--python goes with --providers all")
    from edgeformer.benchmarks.sweep import Point, bench, summary

    sweeps = {} if args.quick else {"batch": _ints(args.batches), "src_len": _ints(args.src_lens),
                                    "new_tokens": _ints(args.new_tokens), "threads": _ints(args.threads)}
    sweeps = {k: v for k, v in sweeps.items() if v}
    base = Point(args.base_batch, args.base_src_len, args.base_new_tokens, args.base_threads)
    records = bench(args.checkpoint, variants=args.variants.split(",") if args.variants else None,
                    providers=args.providers.split(",") if args.providers else None, sweeps=sweeps, base=base,
                    no_cache_reference=not args.skip_no_cache, max_seconds=args.max_seconds, spin=not args.no_spin,
                    memory=not args.no_memory, decoder_threads=args.decoder_threads,
                    out=Path(args.out) if args.out else None, progress=not args.json,
                    log=(lambda _m: None) if args.json else print)
    if args.json:
        print(json.dumps(records))
        return
    print(summary(records))
    if args.out:
        print(f"results (JSON, Markdown, PNG) in {args.out}")


EVAL_HELP = ("inputs to judge on, one a line: text (or text<TAB>reference) for a bundle with a tokenizer, or JSON "
             '([ids] or {"source": ..., "reference": ...}); default: the built-in task the bundle records, else '
             "random ids from its vocabulary")


SEARCH_HELP = ("also write the whole search in one graph (search.onnx: onnxruntime's BeamSearch operator over the "
               "two graphs), for onnxruntime bindings without our Python loop; checked token for token against the "
               "runtime's search before it is written. beam runs greedy too")


LAYOUTS = ("edgeformer", "optimum")
LAYOUT_HELP = ("edgeformer (default): our bundle; optimum: a folder in Hugging Face Optimum's seq2seq layout, which "
               "ORTModelForSeq2SeqLM.from_pretrained loads (and Runtime runs), checked token for token against the "
               "bundle before it is written")


def _add_generation_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", choices=["greedy", "beam", "sample"], help="default: the bundle's, else greedy")
    p.add_argument("--max-new-tokens", type=int, help="default: the bundle's, else 64")
    p.add_argument("--min-new-tokens", type=int)
    p.add_argument("--beams", type=int, help="default: the bundle's, else 4")
    p.add_argument("--n-best", type=int)
    p.add_argument("--length-penalty", type=float)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=None)


def _add_limit_flags(p: argparse.ArgumentParser) -> None:
    from edgeformer.runtime.options import Limits

    limits = Limits()
    p.add_argument("--limit-source-tokens", type=_positive, default=limits.source_tokens, metavar="N",
                   help="refuse inputs longer than this (default %(default)s)")
    p.add_argument("--limit-new-tokens", type=_positive, default=limits.new_tokens, metavar="N",
                   help="refuse --max-new-tokens above this (default %(default)s)")
    p.add_argument("--limit-rows", type=_positive, default=limits.rows, metavar="N",
                   help="refuse more than this many inputs x beams (or samples) in one call (default %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    # the allowed values of options, from the modules that own them (none of them needs torch or onnx)
    from edgeformer.model.importers import IMPORTERS
    from edgeformer.model.metrics import METRICS
    from edgeformer.runtime.encoder_decoder import CACHES, SEARCHES
    from edgeformer.transforms.options import AUTO, INT8_METHODS, INT8_PRESETS, OFFLINE_LEVELS
    from edgeformer.transforms.registry import QUANTIZED

    parser = argparse.ArgumentParser(prog="edgeformer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("train", help="train a model on a built-in task and save a checkpoint")
    p.add_argument("--task", default="dates", help="dates (the encoder-decoder), or digits (a ViT on scikit-learn's "
                   "handwritten digits)")
    p.add_argument("--out", default="checkpoints/dates")
    p.add_argument("--steps", type=int, default=None, help="default: 1500 for dates, 3500 for digits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--force", action="store_true", help="replace an existing checkpoint at --out")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_train)

    p = verbs.add_parser("export", help="checkpoint -> ONNX bundle, checked against PyTorch before it is written")
    p.add_argument("paths", nargs="+", metavar="[CHECKPOINT] OUT",
                   help="checkpoint folder (default: the shipped model) and the bundle folder to write")
    p.add_argument("--force", action="store_true", help="replace an existing bundle at OUT")
    p.add_argument("--search", choices=SEARCHES, help=SEARCH_HELP)
    p.add_argument("--layout", choices=LAYOUTS, default="edgeformer", help=LAYOUT_HELP)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export)

    p = verbs.add_parser("import", help="weights you already have -> checkpoint, checked against the original")
    p.add_argument("kind", choices=IMPORTERS, metavar="KIND",
                   help="; ".join(f"{name}: {help}" for name, (_, help) in IMPORTERS.items()))
    p.add_argument("arguments", nargs=argparse.REMAINDER, help="the importer's: edgeformer import KIND --help")
    p.set_defaults(func=cmd_import)

    p = verbs.add_parser("info", help="show a bundle's manifest (runtime only)")
    p.add_argument("bundle")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = verbs.add_parser("generate", help="generate with a bundle (runtime only)")
    p.add_argument("bundle")
    p.add_argument("inputs", nargs="*", help="texts (or token ids with --ids); read from stdin when absent")
    p.add_argument("--ids", action="store_true", help="inputs and outputs are token ids")
    p.add_argument("--provider", default="cpu",
                   help="comma-separated, in order of preference, the CPU last: a name (cpu, cuda, openvino, ggml...), "
                        "NAME:DEVICE (openvino:CPU, cuda:1, ggml:GPU), or auto[:POLICY] (onnxruntime chooses); "
                        "`edgeformer providers` lists what this machine offers")
    p.add_argument("--search", choices=["auto", "graph", "python"], default="auto",
                   help="a bundle with its search in one graph (--search on export): auto runs that graph where it "
                        "can run the settings, else our Python search")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--decoder-threads", type=int, default=None,
                   help="the decoder's intra-op threads; default: 1 where a step is small (a small model at a "
                        "small batch), else --threads")
    _add_generation_flags(p)
    _add_limit_flags(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_generate)

    p = verbs.add_parser("serve", help="serve a bundle over HTTP on Ray Serve, with dynamic batching (serve extra)")
    p.add_argument("bundle")
    p.add_argument("--replicas", type=_positive, default=1, help="replicas, each holding the bundle's runtime")
    p.add_argument("--max-batch", type=_positive, default=32,
                   help="requests gathered into one generate call (1: batching off)")
    p.add_argument("--batch-wait-ms", type=float, default=2.0,
                   help="how long a batch waits for more requests once it has one")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--threads", type=int, default=None,
                   help="each replica's intra-op threads (default: its --replica-cpus, at least 1)")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves for each replica")
    p.add_argument("--provider", default="cpu", help="as for generate")
    p.add_argument("--proxy", default="ray", choices=["ray", "haproxy"],
                   help="what takes requests to the replicas: Ray Serve's proxy, or the HAProxy that Ray Serve ships "
                        "(several times the requests/s; it also listens on :8404 and :9101, every interface)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="where Ray serves Prometheus metrics (/metrics), when serve starts Ray; default: Ray picks")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="Ray's and the replicas' (INFO logs every request)")
    _add_limit_flags(p)
    p.set_defaults(func=cmd_serve)

    p = verbs.add_parser("translate", help="a corpus through a bundle, a line in and a line out, resumable; on Ray "
                                           "Data where Ray is installed (serve extra), else in this process")
    p.add_argument("bundle")
    p.add_argument("--input", required=True, help="a text file, one input a line (token ids with --ids)")
    p.add_argument("--output", required=True,
                   help="where the outputs go, a line an input line; OUTPUT.parts holds a run's finished batches "
                        "until it ends, and a run that stopped resumes from them")
    p.add_argument("--ids", action="store_true", help="inputs and outputs are token ids")
    p.add_argument("--batch-size", type=_positive, default=32, help="lines a generate call (sorted by length)")
    p.add_argument("--engine", default="auto", choices=["auto", "ray", "local"],
                   help="ray: Ray Data (a cluster with RAY_ADDRESS); local: this process; auto: ray where installed")
    p.add_argument("--replicas", type=_positive, default=1, help="Ray Data actors, each holding the runtime")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads (default: on Ray, an actor's one CPU; in this process, one per core)")
    p.add_argument("--force", action="store_true", help="replace an existing OUTPUT")
    _add_generation_flags(p)
    _add_limit_flags(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_translate)

    p = verbs.add_parser("classify", help="classify images with an image classifier's bundle (runtime, Pillow)")
    p.add_argument("bundle")
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG...), resized to the model's size")
    p.add_argument("--top-k", type=_positive, default=5)
    p.add_argument("--provider", default="cpu", help="as for generate")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_classify)

    p = verbs.add_parser("providers", help="the execution providers this machine offers, and how bundles run on "
                         "each (runtime only)")
    p.add_argument("bundles", nargs="*", help="bundles (variants) to try on every provider offered")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_providers)

    p = verbs.add_parser("parity", help="compare a bundle run by the runtime with the PyTorch checkpoint")
    p.add_argument("bundle")
    p.add_argument("--checkpoint", default=None, help="default: the shipped model")
    p.add_argument("-n", type=_positive, default=200, help="how many inputs to compare")
    p.add_argument("--eval", metavar="FILE", help=EVAL_HELP)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_parity)

    p = verbs.add_parser("demo", help="the whole path on the shipped model: export, parity, generate, latency")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=cmd_demo)

    def bundle_to_bundle(verb: str, help: str, func: Callable[[argparse.Namespace], None]) -> argparse.ArgumentParser:
        """A verb that writes a new bundle from one, checked against it."""
        p = verbs.add_parser(verb, help=help)
        p.add_argument("bundle")
        p.add_argument("out")
        p.add_argument("--force", action="store_true")
        p.add_argument("--allow-drop", action="store_true", help="write it even if it misses its parity target")
        p.add_argument("--eval", metavar="FILE", help=EVAL_HELP)
        p.add_argument("--metric", choices=METRICS, help="where the inputs have references; default: "
                       "the task's, exact_match for token ids, chrf for texts")
        p.add_argument("--eval-size", type=_positive, default=200, help="how many inputs to judge on (random ones: "
                       "at most 64)")
        p.add_argument("--search", choices=[*SEARCHES, "none"],
                       help=SEARCH_HELP + "; default: the source bundle's, if it has one; none leaves it out")
        p.add_argument("--layout", choices=LAYOUTS, default="edgeformer", help=LAYOUT_HELP)
        p.add_argument("--check-on", metavar="PROVIDER,...", default=None,
                       help="also judge the variant on these execution providers (`edgeformer providers` lists "
                            "them): its target must hold on each; the manifest records where it was checked")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)
        return p

    p = bundle_to_bundle("optimize", "transformer fusions + onnxruntime offline optimization -> new bundle",
                         cmd_optimize)
    p.add_argument("--level", default="extended", choices=OFFLINE_LEVELS,
                   help="onnxruntime level saved offline; 'all' adds layout changes tied to this machine")
    p.add_argument("--provider", default="cpu", help="the execution provider the graphs are optimized for")
    p.add_argument("--fuse-attention", default="auto", choices=["auto", "yes", "no"],
                   help="attention -> com.microsoft.MultiHeadAttention; auto: where the provider runs the fused "
                        "kernel (CPU, CUDA, TensorRT, ROCm)")
    p.add_argument("--cache", default="auto", choices=["auto", *CACHES],
                   help="the decoder's self-attention cache: 'buffer' (preallocated, written in place: "
                        "GroupQueryAttention) or 'concat' (a new tensor each step, as exported); auto: buffer on "
                        "the CPU")

    p = bundle_to_bundle("quantize", "int8 (dynamic), int4 (weight-only) or fp16 -> new bundle", cmd_quantize)
    p.add_argument("--to", required=True, choices=QUANTIZED)
    p.add_argument("--preset", default="avx2", choices=[AUTO, *INT8_PRESETS],
                   help="int8 only: the CPU the bundle will run on (avx2: any x86-64 with AVX2, 7-bit weights; "
                   "avx2-8bit: faster there, less precise; auto: this CPU's fastest that passes the gate)")
    p.add_argument("--method", default="dynamic", choices=INT8_METHODS,
                   help="int8: activations quantized at run time, or static QDQ with calibrated ranges")
    p.add_argument("--calibration", metavar="FILE", help="int8 static: calibration inputs, in --eval's format "
                   "(default: the built-in task's training split where the bundle records one, else random ids)")
    p.add_argument("--calibration-size", type=_positive, default=64, help="int8 static: how many inputs to use")
    p.add_argument("--block-size", type=int, default=32, help="int4 only")
    p.add_argument("--keep", action="append", default=[], metavar="NODE|OP|output_projection",
                   help="keep in full precision, by node name, operator type, or output_projection; repeatable")

    p = verbs.add_parser("bench", help="latency and throughput across variants, providers, sizes, vs PyTorch",
                         epilog="edgeformer bench throughput {make,run,grid} ...: batched generation (batch x "
                                "beams) against CTranslate2 and PyTorch on one Transformer-base model; "
                                "`edgeformer bench throughput -h` for its options")
    p.add_argument("checkpoint", nargs="?", default=None, help="default: the shipped model")
    p.add_argument("--variants", default=None,
                   help="comma-separated; default: fp32,fp32-optimized,int8,int4, and fp16 with a GPU provider")
    p.add_argument("--providers", default=None,
                   help="comma-separated, for the sweep; default: every one onnxruntime has. all: instead of the "
                        "sweep, every provider this machine offers x every variant (or --variants), parity with "
                        "PyTorch and speed at batch 1 and batch 16 beam 4 (--base-threads threads), each in a "
                        "process of its own (benchmarks/providers.py)")
    p.add_argument("--python", action="append", default=[], metavar="LABEL=PATH",
                   help="with --providers all: also the providers of another Python's onnxruntime (onnxruntime-gpu, "
                        "onnxruntime-openvino), which has edgeformer installed; repeatable")
    p.add_argument("--rounds", type=_positive, default=3, help="with --providers all: interleaved rounds")
    p.add_argument("--batches", default="1,4,16,64")
    p.add_argument("--src-lens", default="8,32,128,512")
    p.add_argument("--new-tokens", default="16,64,256")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--base-batch", type=int, default=1)
    p.add_argument("--base-src-len", type=int, default=32)
    p.add_argument("--base-new-tokens", type=int, default=64)
    p.add_argument("--base-threads", type=int, default=2)
    p.add_argument("--decoder-threads", type=int, default=None,
                   help="the decoder's intra-op threads; default: 1 where a step is small (a small model at a "
                        "small batch), else the point's threads")
    p.add_argument("--quick", action="store_true", help="the base point only")
    p.add_argument("--no-spin", action="store_true",
                   help="onnxruntime's threads block when idle instead of spinning for work during a run")
    p.add_argument("--skip-no-cache", action="store_true", help="leave out PyTorch without its KV cache")
    p.add_argument("--no-memory", action="store_true",
                   help="skip peak memory (measured per configuration in a child process of its own)")
    p.add_argument("--max-seconds", type=float, default=20.0, help="time budget of one point")
    p.add_argument("--out", default=None, help="folder for results.json, results.md, per_token_latency.png")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    return parser


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Options may come before or after a verb's positional arguments (`generate BUNDLE --json "text"`):
    each verb's own parser reads its arguments intermixed. `import` hands its arguments to the importer as
    they are."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # argparse's intermixed parsing refuses a parser with subparsers: find the verb's parser and let it parse
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if not argv or argv[0] not in verbs.choices or argv[0] == "import":
        return parser.parse_args(argv)
    args = verbs.choices[argv[0]].parse_intermixed_args(argv[1:])
    args.verb = argv[0]
    return args


def main(argv: Sequence[str] | None = None) -> None:
    from edgeformer.runtime.errors import EdgeformerError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["bench", "throughput"]:  # the batched-throughput grid against the peers has modes of its own
        args = argparse.Namespace(verb="bench throughput", func=_throughput, rest=argv[2:])
    else:
        args = parse(argv)
    from edgeformer.runtime.errors import ProviderFallback

    shown = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        if issubclass(category, ProviderFallback):  # one line, as every message a user can cause
            print(f"edgeformer {args.verb}: note: {message}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        args.func(args)
    except ProviderFallback as e:  # raised where warnings are errors (-W error): a message all the same
        sys.exit(f"edgeformer {args.verb}: error: {e}")
    except BrokenPipeError:  # the reader went away (`edgeformer info B | head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except KeyboardInterrupt:
        print(f"edgeformer {args.verb}: interrupted", file=sys.stderr)
        sys.exit(130)
    except (EdgeformerError, ValueError, OSError, ImportError) as e:
        sys.exit(f"edgeformer {args.verb}: error: {e}")
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    main()
