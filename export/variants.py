"""Bundle -> faster bundle: `edgeformer optimize` and `edgeformer quantize --to int8|int4|fp16`.

Every step uses onnxruntime's own, maintained tools (`onnxruntime.transformers.optimizer`, `.quantization`,
`.transformers.float16`), the successors of the deprecated `onnxruntime-tools` package. Every variant is compared
with the fp32 bundle it came from before it is written, and its figures go into its manifest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from edgeformer.export.fusion import fuse_attention
from edgeformer.export.onnx_export import dedupe_initializers, save_graph, share_across_graphs
from edgeformer.export.parity import ParityError
from edgeformer.model.checkpoint import atomic_folder
from edgeformer.model.tasks import get_task
from edgeformer.runtime.bundle import Manifest
from edgeformer.runtime.options import GenerationConfig
from edgeformer.runtime.session import OPTIMIZATION_LEVELS, Runtime, pad
from edgeformer.runtime.spec import DECODER, ENCODER
from edgeformer.runtime.tokenizer import tokenizer_files

# int8 presets: what suits each instruction set (onnxruntime's quantization guide). On AVX2 and AVX-512 without
# VNNI, u8s8 products can saturate, so weights use 7 bits (reduce_range); VNNI and ARM64 dot products do not.
INT8_PRESETS = {
    "avx2": {"reduce_range": True, "per_channel": True},
    "avx512-vnni": {"reduce_range": False, "per_channel": True},
    "arm64": {"reduce_range": False, "per_channel": True},
}
QUANTIZE_TARGETS = ("int8", "int4", "fp16")
OUTPUT_PROJECTION = "output_projection"  # alias for the MatMul that produces the logits


@dataclass(frozen=True)
class Target:
    """What a variant must reach against the fp32 bundle it came from."""

    max_logit_diff: float | None = None
    min_token_agreement: float | None = None
    max_accuracy_drop: float | None = None  # in points of exact match on the built-in task


TARGETS = {
    "fp32-optimized": Target(max_logit_diff=1e-4, min_token_agreement=1.0),
    "int8": Target(max_accuracy_drop=1.0),
    "int4": Target(max_accuracy_drop=1.0),
    "fp16": Target(max_logit_diff=2e-2, min_token_agreement=0.99),
}


@dataclass
class VariantReport:
    variant: str
    seconds: float
    bundle_bytes: int
    source_bytes: int
    figures: dict = field(default_factory=dict)
    misses: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's tools log progress and advice on the root logger; keep only their errors, for this call."""
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in ("onnxruntime.quantization",
                                                                      "onnxruntime.transformers"))]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def logits_matmul(model: onnx.ModelProto) -> onnx.NodeProto | None:
    """The output projection: the MatMul that makes the logits, directly or through Add(bias) (Marian's
    final_logits_bias)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    node = producers.get("logits")
    if node is not None and node.op_type == "Add":
        node = next((producers.get(i) for i in node.input if i not in inits and i in producers), None)
    return node if node is not None and node.op_type == "MatMul" else None


def resolve_keep(model: onnx.ModelProto, keep: list[str]) -> list[str]:
    """Node names to keep in full precision, from names, operator types, or the alias 'output_projection'."""
    nodes = list(model.graph.node)
    names = set()
    for item in keep:
        if item == OUTPUT_PROJECTION:
            projection = logits_matmul(model)
            names |= {projection.name} if projection is not None else set()
        else:
            matched = {n.name for n in nodes if n.name == item or n.op_type == item}
            names |= matched
    return sorted(names)


def with_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every intermediate tensor typed, com.microsoft operators included, where symbolic inference can."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    # When it cannot type everything, onnxruntime dumps sym_shape_infer_temp.onnx and its weights into the
    # working directory before raising: let that land in a folder that is thrown away.
    cwd = Path.cwd()
    with tempfile.TemporaryDirectory() as scratch:
        os.chdir(scratch)
        try:
            return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
        except Exception:  # an operator it does not know: fall back on the quantizer's DefaultTensorType
            return model
        finally:
            os.chdir(cwd)


def _tied_projection(model: onnx.ModelProto) -> tuple[onnx.NodeProto, onnx.NodeProto, str] | None:
    """(MatMul, Transpose, table) when the logits come from MatMul(x, Transpose(table)): a tied projection."""
    inits = {i.name for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    node = logits_matmul(model)
    t = producers.get(node.input[1]) if node is not None else None
    if node is not None and t is not None and t.op_type == "Transpose" and t.input[0] in inits:
        return node, t, t.input[0]
    return None


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def untie_projection(model: onnx.ModelProto) -> None:
    """Give a tied output projection its own (transposed) weight, so that a weight-only quantizer packs it like
    any other MatMul weight. Two quantized copies of the table are still far smaller than one in fp32."""
    tied = _tied_projection(model)
    if tied is None:
        return
    matmul, transpose, table = tied
    array = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == table))
    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array.T), "output_projection.weight"))
    matmul.input[1] = "output_projection.weight"
    model.graph.node.remove(transpose)


def quantize_tied_projection_int8(model: onnx.ModelProto) -> bool:
    """After dynamic quantization quantized the embedding's Gather, let the tied output projection read the same
    int8 table: MatMulInteger(quantize(x), Transpose(table_int8)), one table on disk for both uses."""
    inits = {i.name for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    matmul = logits_matmul(model)
    transpose = producers.get(matmul.input[1]) if matmul is not None else None
    if matmul is None or transpose is None or transpose.op_type != "Transpose":
        return False
    # The table is either still the float initializer, or (when the quantizer saw it used outside a Gather)
    # a DequantizeLinear of the quantized one, which would dequantize all of it on every step.
    dequantize = producers.get(transpose.input[0])
    if dequantize is not None and dequantize.op_type == "DequantizeLinear" and dequantize.input[0] in inits:
        q, scale, zero = dequantize.input[:3]
    elif f"{transpose.input[0]}_quantized" in inits:
        table = transpose.input[0]
        q, scale, zero = f"{table}_quantized", f"{table}_scale", f"{table}_zero_point"
    else:
        return False
    x, out = matmul.input[0], matmul.output[0]
    make = onnx.helper.make_node
    nodes = [
        make("Transpose", [q], ["output_projection.weight_quantized"], name="/output_projection/Transpose",
             perm=[1, 0]),
        make("DynamicQuantizeLinear", [x], ["op_x_q", "op_x_scale", "op_x_zero"], name="/output_projection/Quantize"),
        make("MatMulInteger", ["op_x_q", "output_projection.weight_quantized", "op_x_zero", zero], ["op_y_int"],
             name="/output_projection/MatMulInteger"),
        make("Cast", ["op_y_int"], ["op_y"], name="/output_projection/Cast", to=onnx.TensorProto.FLOAT),
        make("Mul", ["op_x_scale", scale], ["op_scale"], name="/output_projection/Scale"),
        make("Mul", ["op_y", "op_scale"], [out], name="/output_projection/Mul"),
    ]
    position = list(model.graph.node).index(matmul)
    model.graph.node.remove(matmul)
    model.graph.node.remove(transpose)
    for offset, node in enumerate(nodes):
        model.graph.node.insert(position - 1 + offset, node)
    used = {i for n in model.graph.node for i in n.input}
    if dequantize is not None and dequantize.output[0] not in used:
        model.graph.node.remove(dequantize)
    _drop_unused_initializers(model)
    return True


# -- the transforms: (source graph path, graph name, bundle manifest) -> ModelProto -------------------------------

GraphTransform = Callable[[Path, str, Manifest], tuple[onnx.ModelProto, dict]]


# Providers that run com.microsoft.MultiHeadAttention (others would hand it back to the CPU). On the CPU, with
# onnxruntime 1.32 on 2 cores, fused attention made a decoding step of the shipped model 0.114 against 0.138 ms,
# and of Transformer-base 5.80 against 6.15 ms (README: Benchmarks). An earlier measurement that found it slower
# was taken while idle onnxruntime threads spun (see Runtime).
ATTENTION_FUSION_PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider",
                              "ROCMExecutionProvider")


def fuse(level: str, provider: str, attention: bool) -> GraphTransform:
    from onnxruntime.transformers.optimizer import optimize_model

    def transform(path: Path, graph: str, manifest: Manifest) -> tuple[onnx.ModelProto, dict]:
        c = manifest.config
        # opt_level=0: only the transformer fusions here; onnxruntime's own passes run next, for the provider.
        fused = optimize_model(str(path), model_type="bart", num_heads=c["n_heads"], hidden_size=c["d_model"],
                               opt_level=0)
        stats = {k: v for k, v in fused.get_fused_operator_statistics().items() if v}
        if attention:  # the BART rules never match our attention; our own pass does
            stats["MultiHeadAttention"] = fuse_attention(fused.model, c["n_heads"])
        with tempfile.TemporaryDirectory() as tmp:
            fused.save_model_to_file(str(Path(tmp) / "fused.onnx"))
            options = ort.SessionOptions()
            options.graph_optimization_level = OPTIMIZATION_LEVELS[level]
            options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
            options.log_severity_level = 3
            ort.InferenceSession(str(Path(tmp) / "fused.onnx"), options, providers=[provider])
            proto = onnx.load(str(Path(tmp) / "optimized.onnx"))
        ops = Counter(n.op_type for n in proto.graph.node)
        return proto, {"fused_operators": stats, "operators": dict(ops.most_common())}

    return transform


def int8_dynamic(preset: str, keep: list[str]) -> GraphTransform:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if preset not in INT8_PRESETS:
        raise ValueError(f"unknown int8 preset {preset!r}; choose one of {', '.join(INT8_PRESETS)}")

    def transform(path: Path, graph: str, manifest: Manifest) -> tuple[onnx.ModelProto, dict]:
        model = with_types(onnx.load(str(path)))
        excluded = resolve_keep(model, keep)
        with tempfile.TemporaryDirectory() as tmp:
            # The quantizer cannot type the outputs of com.microsoft operators (after `optimize`) on its own
            # ("Unable to find data type for weight_name"): symbolic shape inference types them; where even it
            # cannot, DefaultTensorType says that what is left is float.
            quantize_dynamic(model, Path(tmp) / "q.onnx", op_types_to_quantize=["MatMul", "Gather"],
                             weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
                             extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
                             **INT8_PRESETS[preset])
            proto = onnx.load(str(Path(tmp) / "q.onnx"))
        tied = OUTPUT_PROJECTION not in keep and quantize_tied_projection_int8(proto)
        return proto, {"preset": preset, **INT8_PRESETS[preset], "kept_fp32": excluded, "tied_projection_int8": tied}

    return transform


def calibration_feeds(bundle: Path, texts: list[str] | None, size: int, steps: int = 12) -> dict[str, list[dict]]:
    """Inputs to calibrate activation ranges on, per graph, captured by decoding with the fp32 bundle: the user's
    texts, or else samples of the task's training split (never the held-out one the accuracy is measured on),
    or random ids for a bundle without a tokenizer."""
    rt = Runtime(bundle, threads=2)
    if rt.tokenizer is not None:
        texts = texts or [s for s, _ in get_task("dates").pairs(size, "train", seed=17)]
        sources = rt.tokenizer.encode_batch(texts[:size])
    else:
        if texts:
            raise ValueError(f"{bundle} has no tokenizer: calibration texts cannot be encoded")
        rng = np.random.default_rng(17)
        sources = [rng.integers(4, int(rt.config["src_vocab_size"]), rng.integers(2, 33)).tolist()
                   for _ in range(size)]
    feeds: dict[str, list[dict]] = {ENCODER: [], DECODER: []}
    for i in range(0, len(sources), 16):
        ids, mask = pad(sources[i: i + 16], int(rt.config["pad_id"]))
        feeds[ENCODER].append({"input_ids": ids, "attention_mask": mask})
        state = rt.step_model(ids, mask, 1)
        tokens = np.full(len(ids), int(rt.config["bos_id"]), dtype=np.int64)
        for _ in range(steps):
            feeds[DECODER].append({"input_ids": tokens[:, None], **state.inputs()})
            tokens = state.log_probs(tokens).argmax(-1)
    return feeds


def int8_static(preset: str, keep: list[str], feeds: dict[str, list[dict]]) -> GraphTransform:
    """QDQ: weights and activations int8, activation ranges calibrated (MinMax) on `feeds`."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    if preset not in INT8_PRESETS:
        raise ValueError(f"unknown int8 preset {preset!r}; choose one of {', '.join(INT8_PRESETS)}")

    class Reader(CalibrationDataReader):
        def __init__(self, items: list[dict]) -> None:
            self.items = iter(items)

        def get_next(self) -> dict | None:
            return next(self.items, None)

    def transform(path: Path, graph: str, manifest: Manifest) -> tuple[onnx.ModelProto, dict]:
        model = with_types(onnx.load(str(path)))
        excluded = resolve_keep(model, keep)
        with tempfile.TemporaryDirectory() as tmp:
            quantize_static(model, Path(tmp) / "q.onnx", Reader(feeds[graph]), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["MatMul"], activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
                            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
                            **INT8_PRESETS[preset])
            proto = onnx.load(str(Path(tmp) / "q.onnx"))
        return proto, {"preset": preset, "calibration_batches": len(feeds[graph]), "kept_fp32": excluded}

    return transform


def int4_weight_only(block_size: int, keep: list[str]) -> GraphTransform:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"int4 block size must be a power of two >= 16, got {block_size}")

    def transform(path: Path, graph: str, manifest: Manifest) -> tuple[onnx.ModelProto, dict]:
        model = onnx.load(str(path))
        if OUTPUT_PROJECTION not in keep:
            untie_projection(model)
        model = with_types(model)
        excluded = resolve_keep(model, keep)
        # accuracy_level 4: int8 activations inside MatMulNBits, the fast path of onnxruntime's CPU kernels.
        # Gather: the embedding tables, in blocks along d_model (GatherBlockQuantized).
        quantizer = MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=True, accuracy_level=4,
                                         nodes_to_exclude=excluded, op_types_to_quantize=("MatMul", "Gather"),
                                         quant_axes=(("MatMul", 0), ("Gather", 1)))
        with np.errstate(invalid="ignore", divide="ignore"):  # all-zero blocks get scale 0, handled inside
            quantizer.process()
        return quantizer.model.model, {"block_size": block_size, "kept_fp32": excluded}

    return transform


def fp16(keep: list[str]) -> GraphTransform:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    def transform(path: Path, graph: str, manifest: Manifest) -> tuple[onnx.ModelProto, dict]:
        model = onnx.load(str(path))
        excluded = resolve_keep(model, keep)
        # Inputs and outputs stay float32 where the runtime expects them; softmax and layer norm stay in float32,
        # where fp16's range and precision hurt accuracy.
        blocked_ops = [*DEFAULT_OP_BLOCK_LIST, "Softmax", "LayerNormalization"]
        converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=blocked_ops,
                                             node_block_list=excluded)
        OnnxModel(converted).topological_sort()  # the converter appends its Cast nodes out of order
        return converted, {"kept_fp32_ops": ["Softmax", "LayerNormalization"], "kept_fp32": excluded}

    return transform


# -- the pipeline -------------------------------------------------------------------------------------------------

def compare_with_source(source: Path, candidate: Path, provider: str = "cpu", n: int = 200,
                        steps: int = 16) -> dict:
    """The candidate bundle against the bundle it came from: per-step logits and greedy tokens on the held-out
    task inputs (random inputs for a bundle without a tokenizer), and the task's exact match where it has one."""
    ref, new = Runtime(source, threads=2), Runtime(candidate, providers=[provider, "cpu"], threads=2)
    if ref.tokenizer is not None:
        pairs = get_task("dates").pairs(n, "test")
        src = ref.tokenizer.encode_batch([s for s, _ in pairs])
    else:
        rng = np.random.default_rng(0)
        vocab = int(ref.config["src_vocab_size"])
        src = [rng.integers(4, vocab, rng.integers(2, 33)).tolist() for _ in range(min(n, 32))]
    worst, agree, total = 0.0, 0, 0
    for i in range(0, len(src), 50):
        chunk = src[i: i + 50]
        ids, mask = pad(chunk, int(ref.config["pad_id"]))
        a, b = ref.step_model(ids, mask, 1), new.step_model(ids, mask, 1)
        tokens = np.full(len(chunk), int(ref.config["bos_id"]), dtype=np.int64)
        for _ in range(steps):  # both fed the source bundle's greedy tokens
            la, lb = a.log_probs(tokens), b.log_probs(tokens)
            worst = max(worst, float(np.abs(la - lb).max()))
            agree += int((la.argmax(-1) == lb.argmax(-1)).sum())
            total += len(chunk)
            tokens = la.argmax(-1)
    figures: dict = {"against": f"{ref.manifest.variant} bundle", "provider": new.provider, "inputs": len(src),
                     "max_abs_logprob_diff": worst, "greedy_token_agreement": agree / total}
    if ref.tokenizer is not None:
        gen = GenerationConfig(max_new_tokens=16)
        targets = [t for _, t in pairs]
        figures["exact_match_source"] = _accuracy(ref.translate([s for s, _ in pairs], gen), targets)
        figures["exact_match"] = _accuracy(new.translate([s for s, _ in pairs], gen), targets)
    return figures


def _accuracy(outputs: list[str], targets: list[str]) -> float:
    return sum(o == t for o, t in zip(outputs, targets, strict=True)) / len(targets)


def check_target(variant: str, figures: dict) -> list[str]:
    target, misses = TARGETS[variant], []
    if target.max_logit_diff is not None and figures["max_abs_logprob_diff"] > target.max_logit_diff:
        misses.append(f"max |log-prob difference| {figures['max_abs_logprob_diff']:.3g} > {target.max_logit_diff}")
    if target.min_token_agreement is not None and figures["greedy_token_agreement"] < target.min_token_agreement:
        misses.append(f"greedy token agreement {figures['greedy_token_agreement']:.2%} < "
                      f"{target.min_token_agreement:.0%}")
    if target.max_accuracy_drop is not None and "exact_match" in figures:
        drop = 100 * (figures["exact_match_source"] - figures["exact_match"])
        if drop > target.max_accuracy_drop:
            misses.append(f"exact match drops {drop:.1f} points (allowed {target.max_accuracy_drop})")
    return misses


def derive(bundle: Path | str, out: Path | str, variant: str, transform: GraphTransform, settings: dict,
           force: bool = False, allow_drop: bool = False, provider: str = "cpu",
           log: Callable[[str], None] | None = None) -> VariantReport:
    """Apply `transform` to every graph of a bundle, check the result against the source, write it atomically."""
    with _quiet():
        return _derive(bundle, out, variant, transform, settings, force, allow_drop, provider, log)


def _derive(bundle: Path | str, out: Path | str, variant: str, transform: GraphTransform, settings: dict,
            force: bool, allow_drop: bool, provider: str, log: Callable[[str], None] | None) -> VariantReport:
    say = log or (lambda _msg: None)
    start = time.perf_counter()
    source = Manifest.load(Path(bundle))
    if variant == "fp32-optimized" and source.variant not in ("fp32", "fp32-optimized"):
        variant = source.variant  # optimizing a quantized bundle: it stays what it is, held to its own target
    elif variant in QUANTIZE_TARGETS and source.variant not in ("fp32", "fp32-optimized"):
        raise ValueError(f"{bundle} is already {source.variant}; quantize an fp32 (or optimized) bundle")
    with atomic_folder(Path(out), force=force) as tmp:
        protos, details = {}, {}
        for name in (ENCODER, DECODER):
            say(f"{variant}: {name} graph")
            protos[name], details[name] = transform(Path(bundle) / source.graph_files[name], name, source)
            dedupe_initializers(protos[name])  # onnxruntime's constant folding may have copied a tied table
        share_across_graphs(list(protos.values()), tmp)
        for name, proto in protos.items():
            save_graph(proto, tmp / source.graph_files[name])
        for name in tokenizer_files(Path(bundle)):
            shutil.copy(Path(bundle) / name, tmp / name)
        say(f"{variant}: checking against the {source.variant} bundle")
        # The parity check needs a loadable bundle: write a provisional manifest first, the final one after.
        manifest = Manifest(config=source.config, graphs=source.graphs, graph_files=source.graph_files,
                            variant=variant, opset=source.opset, tokenizer=source.tokenizer,
                            producer={**source.producer, "onnxruntime": ort.__version__}, exporter=source.exporter,
                            parity=source.parity, generation=source.generation)
        manifest.transforms = [*source.transforms, {"variant": variant, **settings, "graphs": details}]
        manifest.save(tmp)
        figures = compare_with_source(Path(bundle), tmp, provider=provider)
        misses = check_target(variant, figures)
        if misses and not allow_drop:
            raise ParityError(f"{variant} bundle misses its target against its source bundle: {'; '.join(misses)}. "
                              "Nothing was written; pass --allow-drop (allow_drop=True) to write it anyway")
        manifest.variant_parity = {**figures, "target": asdict(TARGETS[variant]), "misses": misses}
        manifest.save(tmp)
        size = manifest.bytes(tmp)
    source_size = source.bytes(bundle)
    return VariantReport(variant, time.perf_counter() - start, size, source_size, figures, misses)


def optimize(bundle: Path | str, out: Path | str, level: str = "extended", provider: str = "cpu",
             fuse_attention: bool | None = None, **kwargs: object) -> VariantReport:
    """Transformer fusions, then onnxruntime's offline graph optimization for a provider, saved.

    fuse_attention: None fuses attention into MultiHeadAttention for the providers that run it."""
    if level not in OPTIMIZATION_LEVELS or level == "disable":
        raise ValueError(f"unknown optimization level {level!r}; choose basic, extended or all")
    from edgeformer.runtime.session import PROVIDERS

    full = PROVIDERS.get(provider, provider)
    if full not in ort.get_available_providers():
        raise ValueError(f"cannot optimize for {full}: onnxruntime here has only {ort.get_available_providers()}; "
                         "optimize on a machine with that provider (for CUDA: onnxruntime-gpu and a GPU)")
    attention = full in ATTENTION_FUSION_PROVIDERS if fuse_attention is None else fuse_attention
    return derive(bundle, out, "fp32-optimized", fuse(level, full, attention),
                  {"step": "optimize", "level": level, "provider": full, "fuse_attention": attention},
                  provider=provider, **kwargs)  # type: ignore[arg-type]


def quantize(bundle: Path | str, out: Path | str, to: str, preset: str = "avx2", block_size: int = 32,
             keep: list[str] | None = None, method: str = "dynamic", calibration: list[str] | None = None,
             calibration_size: int = 64, **kwargs: object) -> VariantReport:
    """int8 (method 'dynamic', or 'static': QDQ calibrated on `calibration` texts or task samples), int4 or fp16."""
    keep = list(keep or [])
    settings: dict[str, object]
    if to == "int8" and method == "static":
        feeds = calibration_feeds(Path(bundle), calibration, calibration_size)
        transform, settings = int8_static(preset, keep, feeds), {"method": "static-qdq", "preset": preset,
                                                                  "calibration_inputs": calibration_size}
    elif to == "int8" and method != "dynamic":
        raise ValueError(f"unknown int8 method {method!r}; choose dynamic or static")
    elif to == "int8":
        transform, settings = int8_dynamic(preset, keep), {"method": "dynamic", "preset": preset}
    elif to == "int4":
        transform, settings = int4_weight_only(block_size, keep), {"method": "MatMulNBits", "block_size": block_size}
    elif to == "fp16":
        transform, settings = fp16(keep), {"method": "float16"}
    else:
        raise ValueError(f"unknown quantization {to!r}; choose one of {', '.join(QUANTIZE_TARGETS)}")
    return derive(bundle, out, to, transform, {"step": "quantize", **settings, "keep": keep}, **kwargs)  # type: ignore[arg-type]


def build_variants(fp32: Path | str, folder: Path | str, variants: Sequence[str],
                   log: Callable[[str], None] | None = None) -> dict[str, tuple[Path, VariantReport | None]]:
    """The bundles of `variants` from an exported fp32 bundle, chained as a CPU deployment would chain them:
    fusions first, then int8 or int4 quantization of the optimized bundle, so that they keep the fused attention
    (fp16, a GPU variant, is made from fp32). Returns {variant: (path, report)}; fp32 has no report."""
    unknown = set(variants) - {"fp32", "fp32-optimized", *QUANTIZE_TARGETS}
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; choose from fp32, fp32-optimized, "
                         f"{', '.join(QUANTIZE_TARGETS)}")
    built: dict[str, tuple[Path, VariantReport | None]] = {"fp32": (Path(fp32), None)}
    if {"fp32-optimized", "int8", "int4"} & set(variants):
        path = Path(folder) / "fp32-optimized"
        built["fp32-optimized"] = (path, optimize(fp32, path, log=log))
    for v in (v for v in variants if v in QUANTIZE_TARGETS):
        source = built["fp32" if v == "fp16" else "fp32-optimized"][0]
        path = Path(folder) / v
        built[v] = (path, quantize(source, path, to=v, log=log))
    return {v: built[v] for v in ("fp32", *variants) if v in built}
