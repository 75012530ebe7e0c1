"""Quantization transforms, each onnxruntime's own tool: int8 dynamic (`quantize_dynamic`), int8 static QDQ
calibrated on the user's inputs (`quantize_static`), int4 weight-only (`MatMulNBitsQuantizer`), fp16
(`transformers.float16`)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx

from edgeformer.runtime.bundle import Manifest
from edgeformer.runtime.encoder_decoder import SEARCH_HEAD
from edgeformer.transforms.fusion import remove_dead_nodes
from edgeformer.transforms.graph_edits import (
    OUTPUT_PROJECTION,
    GraphTransform,
    quantize_tied_projection_int8,
    resolve_keep,
    signed_tables,
    skip_float16_round_trips,
    untie_projection,
    with_types,
)
from edgeformer.transforms.options import INT8_PRESETS, QuantizeOptions
from edgeformer.transforms.registry import family_judging


def int8(options: QuantizeOptions, bundle: Path) -> tuple[GraphTransform, dict]:
    """int8, dynamic or static; the settings recorded in the manifest."""
    if options.method == "static":
        if options.calibration is None:
            raise ValueError("static int8 needs calibration inputs (QuantizeOptions.calibration)")
        family = Manifest.load(bundle, verify=False).family
        feeds = family_judging(family).calibration_feeds(bundle, options.calibration)
        return int8_static(options.preset, options.keep, feeds), {
            "method": "static-qdq", "preset": options.preset, "calibration_inputs": len(options.calibration.sources),
            "calibrated_on": options.calibration.judged_on["inputs"]}
    return int8_dynamic(options.preset, options.keep), {"method": "dynamic", "preset": options.preset}


def int4(options: QuantizeOptions, bundle: Path) -> tuple[GraphTransform, dict]:
    return int4_weight_only(options.block_size, options.keep), {"method": "MatMulNBits",
                                                                 "block_size": options.block_size}


def fp16(options: QuantizeOptions, bundle: Path) -> tuple[GraphTransform, dict]:
    return fp16_transform(options.keep), {"method": "float16"}


def int8_dynamic(preset: str, keep: list[str]) -> GraphTransform:
    from onnxruntime.quantization import QuantType, quantize_dynamic

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
        # in every graph, so that a table both graphs hold stays one file; the 7-bit presets keep it uint8, as a
        # 7-bit table cost precision (README: Optimize and quantize)
        signed = [] if INT8_PRESETS[preset]["reduce_range"] else signed_tables(proto)
        tied = OUTPUT_PROJECTION not in keep and quantize_tied_projection_int8(proto)
        return proto, {"preset": preset, **INT8_PRESETS[preset], "kept_fp32": excluded, "tied_projection_int8": tied,
                       "signed_tables": signed}

    return transform


def int8_static(preset: str, keep: list[str], feeds: dict[str, list[dict]]) -> GraphTransform:
    """QDQ: weights and activations int8, activation ranges calibrated (MinMax) on `feeds`."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

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


FP32_OPS = ("Softmax", "LayerNormalization", "LogSoftmax", "TopK")  # kept in float32 by the fp16 transform


def fp16_transform(keep: list[str]) -> GraphTransform:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    def transform(path: Path, graph: str, manifest: Manifest) -> tuple[onnx.ModelProto, dict]:
        model = onnx.load(str(path))
        excluded = resolve_keep(model, keep)
        # Inputs and outputs stay float32 where the runtime expects them; softmax, layer norm and the search head
        # (its Add too, which an op list would not catch) stay in float32, where fp16 hurts accuracy.
        head = [n.name for n in model.graph.node if n.name.startswith(SEARCH_HEAD)]
        blocked_ops = [*DEFAULT_OP_BLOCK_LIST, *FP32_OPS]
        converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=blocked_ops,
                                             node_block_list=[*excluded, *head])
        skip_float16_round_trips(converted)  # the head's outputs: float32 through, not rounded to float16 and back
        remove_dead_nodes(converted)
        OnnxModel(converted).topological_sort()  # the converter appends its Cast nodes out of order
        return converted, {"kept_fp32_ops": list(FP32_OPS), "kept_fp32": [*excluded, *head]}

    return transform
