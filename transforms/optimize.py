"""`edgeformer optimize`: onnxruntime's transformer fusions (LayerNormalization, SkipLayerNormalization, ...), our
attention fusion (transforms/fusion.py), then onnxruntime's own graph optimizations for one provider, saved."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import onnx

from edgeformer.runtime.bundle import Manifest
from edgeformer.runtime.engine import CPU, open_session, provider, session_options
from edgeformer.runtime.errors import InputError
from edgeformer.runtime.families import get_family
from edgeformer.runtime.providers import require
from edgeformer.transforms.fusion import fuse_attention
from edgeformer.transforms.graph_edits import GraphTransform, replace_memcpy
from edgeformer.transforms.options import OptimizeOptions
from edgeformer.transforms.self_cache import buffer_self_cache


def optimize_transform(options: OptimizeOptions, bundle: Path) -> tuple[GraphTransform, dict]:
    """The per-graph transform and the settings recorded in the manifest."""
    if options.provider.lower().startswith("auto"):
        raise ValueError("optimize for a named provider (--provider cpu, cuda...), not onnxruntime's choice: the "
                         "graphs are saved as optimized for one")
    try:
        require(options.provider)  # optimized where it runs: the provider must be here
    except InputError as e:
        raise InputError(f"cannot optimize for {provider(options.provider).name}: {e}; optimize on a machine that "
                         "has it") from None
    chosen = provider(options.provider)
    attention = chosen.fused_attention if options.fuse_attention is None else options.fuse_attention
    family = get_family(Manifest.load(bundle, verify=False).family)
    caches = family.caches  # a family without one: "concat" alone
    cache = options.cache or ("buffer" if attention and chosen.name == CPU and "buffer" in caches else "concat")
    if cache not in caches:
        raise ValueError(f"--cache {cache}: this family's graphs pass no cache of that kind")
    if cache == "buffer" and not attention:
        raise ValueError("the buffered cache (--cache buffer) needs the fused attention; drop --fuse-attention no")
    if cache == "buffer" and chosen.name != CPU:
        raise ValueError(f"the buffered cache runs on the CPU only (onnxruntime's GroupQueryAttention on "
                         f"{chosen.name} takes no float32); optimize for it with --cache concat")
    unfused = family.cpu_unfused if chosen.name == CPU else ()
    settings = {"level": options.level, "provider": chosen.name, "fuse_attention": attention, "cache": cache,
                "cache_asked": options.cache}
    return fuse(options.level, options.provider, attention, cache, unfused), settings


def fuse(level: str, provider_name: str, attention: bool, cache: str = "concat",
         unfused: tuple[str, ...] = ()) -> GraphTransform:
    """provider_name: as the user gave it ('cuda', 'cuda:1'...); unfused: onnxruntime's fusions left out (the
    family's on the CPU)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    fusions = FusionOptions("bart")
    if "SkipLayerNormFusion" in unfused:
        fusions.enable_skip_layer_norm = fusions.enable_bias_skip_layer_norm = False
    if "BiasGeluFusion" in unfused:  # the bias then goes into the MatMul before it (int8: MatMulIntegerToFloat)
        fusions.enable_bias_gelu = False

    def transform(path: Path, graph: str, manifest: Manifest) -> tuple[onnx.ModelProto, dict]:
        if cache == "concat" and manifest.cache == "buffer":
            raise ValueError(f"{path.parent} passes its cache in buffers, and nothing turns them back: optimize the "
                             "bundle it was made from (the exported one) with --cache concat")
        c = manifest.config
        # opt_level=0: only the transformer fusions here; onnxruntime's own passes run next, for the provider.
        fused = optimize_model(str(path), model_type="bart", num_heads=c["n_heads"], hidden_size=c["d_model"],
                               opt_level=0, optimization_options=fusions)
        stats = {k: v for k, v in fused.get_fused_operator_statistics().items() if v}
        if attention:  # the BART rules never match our attention; our own pass does
            stats["MultiHeadAttention"] = fuse_attention(fused.model, c["n_heads"])
        buffered = cache == "buffer" and manifest.cache != "buffer" and buffer_self_cache(fused.model, c["n_heads"])
        if buffered:
            stats["GroupQueryAttention"] = buffered
            stats["MultiHeadAttention"] = sum(n.op_type == "MultiHeadAttention" for n in fused.model.graph.node)
        with tempfile.TemporaryDirectory() as tmp:
            fused.save_model_to_file(str(Path(tmp) / "fused.onnx"))
            open_session(Path(tmp) / "fused.onnx", session_options(level, optimized_path=Path(tmp) / "optimized.onnx"),
                         require(provider_name), unfused)
            proto = onnx.load(str(Path(tmp) / "optimized.onnx"))
        copies = replace_memcpy(proto)
        ops = Counter(n.op_type for n in proto.graph.node)
        return proto, {"fused_operators": stats, "operators": dict(ops.most_common()), "memcpy_to_identity": copies,
                       **({"cache": "buffer"} if buffered else {})}

    return transform
