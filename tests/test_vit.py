"""The Vision Transformer family: our encoder blocks fed patches, exported through the same seam as the
encoder-decoder, run by the runtime (numpy + onnxruntime) with the bundle's own preprocessing, refusing what it
cannot classify; the digits task and the model trained on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgeformer.runtime.classifier import Classifier
from edgeformer.runtime.errors import InputError, LimitError
from edgeformer.runtime.options import Limits
from edgeformer.runtime.session import Runtime
from tests.helpers import edgeformer, tiny_vit


@pytest.fixture(scope="module")
def vit_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    from edgeformer.export.onnx_export import export
    from edgeformer.model.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("vit")
    model = tiny_vit()
    save_checkpoint(model, root / "checkpoint")
    export(root / "checkpoint", root / "bundle")
    return model, root / "bundle"


def images(n: int, seed: int = 0, size: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def torch_logits(model: object, batch: np.ndarray) -> np.ndarray:
    import torch

    from edgeformer.runtime.classifier import preprocess

    with torch.no_grad():
        return model(torch.from_numpy(preprocess(batch, model.config))).numpy()  # type: ignore[operator,attr-defined]


def test_the_vit_blocks_are_the_transformers_encoder_layers() -> None:
    from edgeformer.model.transformer import EncoderLayer

    model = tiny_vit()
    assert all(type(layer) is EncoderLayer for layer in model.layers)
    assert model.layers[0].self_attn_block.pre_norm and model.layers[0].ffn.activation.__class__.__name__ == "GELU"


def test_runtime_of_a_vit_bundle_classifies_as_pytorch_does_at_any_batch(vit_bundle) -> None:
    model, bundle = vit_bundle
    rt = Runtime(bundle)
    assert isinstance(rt, Classifier) and rt.variant == "fp32"
    for n in (1, 5, 16):  # the batch axis is dynamic
        batch = images(n, seed=n)
        got, want = rt.logits(batch), torch_logits(model, batch)
        assert got.shape == (n, 7) and np.abs(got - want).max() < 1e-4
        top = rt.classify(batch, top_k=3)
        assert [[label for label, _ in t] for t in top] == [
            [model.config.labels[i] for i in np.argsort(-w, kind="stable")[:3]] for w in want]
        for t in top:
            probs = [p for _, p in t]
            assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-9
    # float images in [0, 1] are the uint8 ones rescaled
    batch = images(4)
    assert np.allclose(rt.logits(batch.astype(np.float32) / 255), rt.logits(batch), atol=1e-5)


def test_the_manifest_carries_the_preprocessing_and_the_parity(vit_bundle) -> None:
    from edgeformer.runtime.bundle import Manifest

    _, bundle = vit_bundle
    m = Manifest.load(bundle)
    assert m.family == "vit" and m.graph_files == {"model": "model.onnx"}
    assert (m.config["mean"], m.config["std"], m.config["rescale"]) == ([0.4, 0.5, 0.6], [0.2, 0.3, 0.25], 1 / 255)
    assert m.parity["max_abs_diff"]["model"] < 1e-4 and m.parity["batches"] == [1, 3, 8]
    out = edgeformer("info", str(bundle))
    assert out.returncode == 0, out.stderr
    assert "model: ViT, 12x12 images of 3 channels" in out.stdout and "top-1 agreement 100.00%" in out.stdout


@pytest.mark.parametrize(("bad", "message"), [
    (np.zeros((2, 16, 16, 3), np.uint8), "resize them to 12x12"),
    (np.zeros((2, 12, 12), np.uint8), r"takes \(N, 12, 12, 3\)"),
    (np.zeros((0, 12, 12, 3), np.uint8), "no images"),
    (np.full((1, 12, 12, 3), 2.0, np.float32), r"in \[0, 1\]"),
    (np.full((1, 12, 12, 3), np.nan, np.float32), r"finite"),
    (np.zeros((1, 12, 12, 3), np.int32), "dtype int32"),
    ([[0]], "a numpy array"),
])
def test_images_it_cannot_classify_are_refused_by_name(vit_bundle, bad: object, message: str) -> None:
    with pytest.raises(InputError, match=message):
        Runtime(vit_bundle[1]).classify(bad)


def test_too_many_images_or_a_bad_top_k_are_refused(vit_bundle) -> None:
    rt = Runtime(vit_bundle[1], limits=Limits(rows=4))
    with pytest.raises(LimitError, match="5 images in one call, above the limit of 4"):
        rt.classify(images(5))
    for top_k in (0, 1.5, True):
        with pytest.raises(InputError, match="top_k"):
            rt.classify(images(1), top_k=top_k)  # type: ignore[arg-type]


def test_the_cli_classifies_image_files_and_refuses_generate(vit_bundle, tmp_path: Path) -> None:
    from PIL import Image

    model, bundle = vit_bundle
    paths = []
    for i, image in enumerate(images(2, seed=9)):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(paths[-1])
    out = edgeformer("classify", str(bundle), *map(str, paths), "--top-k", "2", "--json")
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    want = torch_logits(model, images(2, seed=9))  # the files hold the images at the model's size: no resizing
    assert [f["top"][0]["label"] for f in found] == [model.config.labels[int(w.argmax())] for w in want]
    bad = edgeformer("classify", str(bundle), str(tmp_path / "nothing.png"))
    assert bad.returncode != 0 and bad.stderr.startswith("edgeformer classify: error: ")
    wrong = edgeformer("generate", str(bundle), "5 6")
    assert wrong.returncode != 0 and "image classifier's bundle" in wrong.stderr


def test_the_digits_are_the_shipped_split_and_a_short_training_saves_a_loadable_vit(tmp_path: Path) -> None:
    from edgeformer.model.checkpoint import load_checkpoint
    from edgeformer.model.digits import digits
    from edgeformer.model.vit import ViT
    from edgeformer.model.vit_train import DIGITS_CONFIG, DigitsTraining, train_digits

    (train_x, _), (test_x, test_y) = digits("train"), digits("test")
    assert train_x.shape == (1437, 8, 8, 1) and test_x.shape == (360, 8, 8, 1) and train_x.dtype == np.uint8
    assert train_x.max() == 255 and sorted(set(test_y.tolist())) == list(range(10))
    found = train_digits(tmp_path / "vit", DigitsTraining(steps=20), progress=False)
    assert 0 <= found["accuracy"] <= 1
    model, _ = load_checkpoint(tmp_path / "vit")
    assert isinstance(model, ViT) and model.config == DIGITS_CONFIG


def test_the_shipped_digits_model_is_at_least_97_percent_right_through_the_runtime(tmp_path: Path) -> None:
    from edgeformer.export.families import family_export
    from edgeformer.export.onnx_export import export
    from edgeformer.model.checkpoint import DIGITS_CHECKPOINT

    export(DIGITS_CHECKPOINT, tmp_path / "digits")
    report = family_export("vit").runtime_parity(tmp_path / "digits", DIGITS_CHECKPOINT, n=360)
    assert report["images"] == 360 and report["top-1 identical to PyTorch"] == 1.0
    assert report["accuracy (runtime)"] == report["accuracy (PyTorch)"] >= 0.97


@pytest.mark.parametrize(("to", "method"), [("int8", "dynamic"), ("int8", "static"), ("int4", "dynamic"),
                                            ("fp16", "dynamic")])
def test_each_quantized_vit_is_judged_on_images_and_classifies_as_its_source(vit_bundle, tmp_path: Path, to: str,
                                                                            method: str) -> None:
    from edgeformer.runtime.bundle import Manifest
    from edgeformer.transforms.derive import Judging, quantize
    from edgeformer.transforms.registry import TRANSFORMS

    _, bundle = vit_bundle
    report = quantize(bundle, tmp_path / to, to=to, method=method, calibration_size=32, judging=Judging(inputs=48))
    figures = Manifest.load(tmp_path / to).variant_parity
    assert figures["judged_on"]["inputs"] == "random images" and figures["agreement"] == "top-1"
    gate = TRANSFORMS[to].gate  # random weights: held to the gate, as every variant
    assert report.misses == [] and figures["greedy_token_agreement"] >= (gate.min_token_agreement or 0)
    assert Runtime(tmp_path / to).logits(images(6, seed=4)).shape == (6, 7)


def test_the_shipped_digits_model_fuses_its_attention_and_in_int8_keeps_96_percent_held_out(tmp_path: Path) -> None:
    from edgeformer.export.onnx_export import export
    from edgeformer.model.checkpoint import DIGITS_CHECKPOINT
    from edgeformer.runtime.bundle import Manifest
    from edgeformer.transforms.derive import Judging, optimize, quantize

    export(DIGITS_CHECKPOINT, tmp_path / "fp32")
    optimize(tmp_path / "fp32", tmp_path / "opt", judging=Judging(inputs=360))
    manifest = Manifest.load(tmp_path / "opt")
    fused = manifest.transforms[-1]["graphs"]["model"]["fused_operators"]  # no mask: the zero bias fuses away
    assert fused["MultiHeadAttention"] == manifest.config["n_layers"]
    # on the CPU the norms stay Add + LayerNormalization and Add + Gelu (README: "Fusions on the CPU")
    ops = manifest.transforms[-1]["graphs"]["model"]["operators"]
    layers = manifest.config["n_layers"]
    assert ops["LayerNormalization"] == 2 * layers + 1 and ops["Gelu"] == layers
    assert "SkipLayerNormalization" not in ops and "BiasGelu" not in ops
    report = quantize(tmp_path / "opt", tmp_path / "int8", to="int8", judging=Judging(inputs=360))
    assert report.figures["judged_on"]["inputs"] == "the built-in digits, test split"
    assert report.figures["inputs"] == 360
    assert report.figures["metric_source"] >= 97.0 and report.figures["metric_variant"] >= 96.0


def test_a_vit_session_on_the_cpu_keeps_add_and_layer_norm_apart_where_onnxruntime_alone_fuses_them(
        tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from edgeformer.runtime.engine import open_session, session_options
    from edgeformer.runtime.vit import VIT

    x = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [2, 3, 8]) for n in ("x", "skip", "y")]
    weights = [numpy_helper.from_array(np.full(8, v, np.float32), n) for n, v in (("gamma", 1.0), ("beta", 0.0))]
    graph = helper.make_graph([helper.make_node("Add", ["x", "skip"], ["sum"]), helper.make_node(
        "LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1)], "g", x[:2], x[2:], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "g.onnx"))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "plain.onnx")
    ort.InferenceSession(str(tmp_path / "g.onnx"), options, providers=["CPUExecutionProvider"])
    open_session(tmp_path / "g.onnx", session_options("all", optimized_path=tmp_path / "vit.onnx"),
                 cpu_unfused=VIT.cpu_unfused)
    plain, vit = ({n.op_type for n in onnx.load(str(tmp_path / f)).graph.node} for f in ("plain.onnx", "vit.onnx"))
    assert plain == {"SkipLayerNormalization"} and vit == {"Add", "LayerNormalization"}


def test_a_hugging_face_vit_imports_with_its_preprocessing_and_classifies_as_hugging_face(tmp_path: Path) -> None:
    import torch
    import transformers

    from edgeformer.export.onnx_export import export
    from tests.helpers import hf_vit_folder

    folder = hf_vit_folder(tmp_path)
    out = edgeformer("import", "vit", str(folder), str(tmp_path / "ckpt"))
    assert out.returncode == 0, out.stderr
    export(tmp_path / "ckpt", tmp_path / "bundle")
    rt = Runtime(tmp_path / "bundle")
    assert rt.labels == [f"class{i}" for i in range(5)] and rt.config["mean"] == [0.485, 0.456, 0.406]
    batch = images(4, seed=2, size=32)
    # Hugging Face's own pipeline: its image processor, then its model
    processor = transformers.ViTImageProcessor.from_pretrained(str(folder))
    reference = transformers.ViTForImageClassification.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        want = reference(**processor(images=list(batch), return_tensors="pt")).logits.numpy()
    got = rt.logits(batch)
    assert np.abs(want).max() > 1 and np.abs(got - want).max() < 1e-4
    assert [t[0][0] for t in rt.classify(batch)] == [f"class{i}" for i in want.argmax(-1)]


@pytest.mark.parametrize(("overrides", "message"), [
    ({"hidden_act": "relu"}, "hidden_act='relu': only gelu"),
    ({"qkv_bias": False}, "qkv_bias=false"),
    ({"image_size": [32, 16]}, "square sizes only"),
])
def test_a_vit_the_importer_cannot_express_is_refused_by_name(tmp_path: Path, overrides: dict, message: str) -> None:
    from edgeformer.model.importers.common import ImporterError
    from edgeformer.model.importers.vit import import_vit
    from tests.helpers import hf_vit_folder

    folder = hf_vit_folder(tmp_path, **overrides)
    with pytest.raises(ImporterError, match=message):
        import_vit(folder, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_the_vit_bench_times_ours_and_pytorch_on_the_same_weights_and_writes_ratios(tmp_path: Path) -> None:
    from edgeformer.benchmarks.vit import run, write
    from edgeformer.export.onnx_export import export
    from edgeformer.model.importers.vit import import_vit
    from tests.helpers import hf_vit_folder

    folder = tmp_path / "bench"
    folder.mkdir()
    hf_vit_folder(tmp_path).rename(folder / "hf")
    import_vit(folder / "hf", folder / "edgeformer-ckpt")
    export(folder / "edgeformer-ckpt", folder / "edgeformer-fp32")
    ours, torch_ = (run(folder, s, batch=3, threads=2, repeats=2) for s in ("edgeformer-fp32", "torch-fp32"))
    for found in (ours, torch_):
        assert found["batch"] == 3 and found["ms_per_image"] > 0
        assert found["images_per_s"] == pytest.approx(1000 / found["ms_per_image"])
    rows = [{"system": s, "batch": 3, "threads": 2, "ms_per_image": m, "images_per_s": 1000 / m,
             "rounds_ms_per_image": [m], "peak_rss_mb": 100.0, "vs_torch-fp32": v, "vs_optimum-int8": None,
             "vs_optimum-int8-vnni": None}
            for s, m, v in (("torch-fp32", 10.0, 1.0), ("edgeformer-int8", 2.5, 4.0))]
    write(rows, tmp_path / "out", "torch-fp32")
    text = (tmp_path / "out" / "results.md").read_text()
    assert "edgeformer-int8  3      2.50      400.0     4.00x" in text
    assert (tmp_path / "out" / "ms_per_image.png").stat().st_size > 1000


def test_the_providers_command_runs_a_vit_bundle_on_each_provider(vit_bundle) -> None:
    out = edgeformer("providers", str(vit_bundle[1]), "--json")
    assert out.returncode == 0, out.stderr
    cpu = next(r for r in json.loads(out.stdout)["variants"] if r["choice"] == "cpu")
    assert cpu["tokens as CPU"] is True and cpu["variant"] == "fp32"
