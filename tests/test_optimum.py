"""Interop with Hugging Face Optimum, both ways, against Optimum itself: folders we write in its layout load in
`ORTModelForSeq2SeqLM` and generate our tokens; its own exports of random Marian, BART, T5 and M2M100 models run in
our runtime with its tokens. Nothing is downloaded: the models are built from random configurations here."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeformer.runtime.errors import BundleError
from edgeformer.runtime.optimum import OptimumRuntime, OptimumSteps
from edgeformer.runtime.options import GenerationConfig
from edgeformer.runtime.session import Runtime
from tests.helpers import edgeformer, marian_folder, random_sources, texts

pytest.importorskip("optimum.onnxruntime", reason="the Optimum side needs edgeformer[optimum]")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from optimum.onnxruntime import ORTModelForSeq2SeqLM  # noqa: E402  (after the skips)

pytestmark = pytest.mark.filterwarnings("ignore")  # transformers' and Optimum's advice on every call

SMALL = {"d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
         "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "vocab_size": 60,
         "max_position_embeddings": 64}
FAMILIES: dict[str, Any] = {
    "marian": lambda: transformers.MarianConfig(**SMALL, pad_token_id=59, eos_token_id=0, decoder_start_token_id=59,
                                                forced_eos_token_id=0),
    "bart": lambda: transformers.BartConfig(**SMALL),
    "m2m100": lambda: transformers.M2M100Config(**SMALL),
    "t5": lambda: transformers.T5Config(vocab_size=60, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                        num_heads=4, decoder_start_token_id=0),
}


def optimum_export(root: Path, config: Any, merged: bool) -> Path:
    """Optimum's export of a random model: with merged, as `optimum-cli export onnx --task
    text2text-generation-with-past` writes it (the merged decoder too), else as `from_pretrained(export=True)`."""
    torch.manual_seed(0)
    model = transformers.AutoModelForSeq2SeqLM.from_config(config).eval()
    with torch.no_grad():  # spread the logits: near-ties would make token equality a matter of float noise
        model.get_output_embeddings().weight.mul_(8.0)
    model.save_pretrained(root / "hf")
    out = root / "onnx"
    if merged:
        from optimum.exporters.onnx import main_export

        main_export(str(root / "hf"), str(out), task="text2text-generation-with-past")
    else:
        ORTModelForSeq2SeqLM.from_pretrained(str(root / "hf"), export=True).save_pretrained(str(out))
    return out


def batch(sources: list[list[int]], pad: int) -> tuple[Any, Any]:
    longest = max(map(len, sources))
    ids = torch.tensor([s + [pad] * (longest - len(s)) for s in sources])
    return ids, (torch.arange(longest)[None] < torch.tensor([len(s) for s in sources])[:, None]).long()


def optimum_tokens(model: Any, sources: list[list[int]], pad: int, eos: int, beams: int, new: int) -> list[list[int]]:
    """Optimum's generate, its sequences as our hypotheses: the new tokens before EOS."""
    ids, mask = batch(sources, pad)
    out = model.generate(input_ids=ids, attention_mask=mask, num_beams=beams, do_sample=False, max_new_tokens=new)
    return [row[1: row.index(eos, 1)] if eos in row[1:] else row[1:] for row in out.tolist()]


def sources_for(rt: Runtime, n: int, seed: int) -> list[list[int]]:
    """Random sources ending in EOS, with no pad or EOS inside."""
    c = rt.config
    rng = np.random.default_rng(seed)
    found = []
    for _ in range(n):
        ids = [int(t) for t in rng.integers(3, c["src_vocab_size"], rng.integers(2, 12))]
        found.append([t for t in ids if t not in (c["pad_id"], c["eos_id"])] + [c["eos_id"]])
    return found


def assert_same_tokens(rt: Runtime, model: Any, sources: list[list[int]], new: int = 12) -> None:
    c = rt.config
    for beams in (1, 4):
        gen = dataclasses.replace(rt.generation, strategy="beam" if beams > 1 else "greedy", num_beams=beams,
                                  max_new_tokens=new, num_return_sequences=1)
        ours = [h[0].tokens for h in rt.generate(sources, gen)]
        theirs = optimum_tokens(model, sources, c["pad_id"], c["eos_id"], beams, new)
        assert ours == theirs, f"beams {beams}"


def assert_same_log_probs(rt: Runtime, model: Any, sources: list[list[int]], steps: int = 4) -> None:
    """Our step model's log-probabilities against Optimum's model fed the same tokens one step at a time with its
    cache, as its generate does (a dynamically quantized graph scales its activations per call: the whole
    sequence at once would not compare like with like)."""
    c = rt.config
    ids, mask = batch(sources, c["pad_id"])
    rng = np.random.default_rng(0)
    tokens = np.concatenate([np.full((len(sources), 1), c["bos_id"]),
                             rng.integers(3, rt.config["tgt_vocab_size"], (len(sources), steps - 1))], 1)
    step_model = rt.step_model(ids.numpy(), mask.numpy(), 1)
    encoded, past = None, None
    for step in range(steps):
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, encoder_outputs=encoded, past_key_values=past,
                        decoder_input_ids=torch.tensor(tokens[:, step: step + 1]), use_cache=True)
        encoded = encoded or transformers.modeling_outputs.BaseModelOutput(
            last_hidden_state=out.encoder_last_hidden_state)
        past = out.past_key_values
        theirs = torch.log_softmax(out.logits[:, -1].float(), -1).numpy()
        ours = step_model.log_probs(tokens[:, step])
        assert np.abs(ours - theirs).max() < 1e-4, f"step {step}"


@pytest.fixture(scope="module")
def optimum_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("optimum")
    return {name: optimum_export(root / name, make(), merged=name == "marian") for name, make in FAMILIES.items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_runtime_on_optimums_export_gives_optimums_tokens_and_log_probs(optimum_folders, family: str) -> None:
    folder = optimum_folders[family]
    rt = Runtime(folder)
    assert isinstance(rt, OptimumRuntime)
    model = ORTModelForSeq2SeqLM.from_pretrained(str(folder))
    sources = sources_for(rt, 16, seed=1)
    assert_same_tokens(rt, model, sources)
    assert_same_log_probs(rt, model, sources[:6])


def test_the_merged_decoder_and_the_two_decoders_give_the_same_tokens(optimum_folders, tmp_path: Path) -> None:
    """Optimum's CLI writes both forms; the runtime takes the merged one and, without it, the pair."""
    pair = Path(shutil.copytree(optimum_folders["marian"], tmp_path / "pair"))
    (pair / "decoder_model_merged.onnx").unlink()
    merged, two = Runtime(optimum_folders["marian"]), Runtime(pair)
    assert merged.graphs.merged and not two.graphs.merged
    sources = sources_for(merged, 8, seed=2)
    gen = GenerationConfig(strategy="beam", num_beams=4, max_new_tokens=10)
    assert merged.generate(sources, gen) == two.generate(sources, gen)


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_optimum_generates_from_our_layout_what_our_runtime_does(exported, tmp_path: Path, variant: str) -> None:
    """The tokens of `ORTModelForSeq2SeqLM.from_pretrained(folder)`, with its defaults, on 100 inputs, greedy and
    beam 4: those of our runtime on the same folder (and, for fp32, on the bundle exported the usual way)."""
    _, bundle = exported("post-sinusoidal")
    folder = tmp_path / "optimum"
    if variant == "fp32":  # what `export --layout optimum` does after exporting (its command: the Marian test)
        from edgeformer.transforms.optimum_layout import write_optimum

        write_optimum(bundle, folder, random_sources(32, 37, seed=3))
    else:
        done = edgeformer("quantize", str(bundle), str(folder), "--to", "int8", "--layout", "optimum")
        assert done.returncode == 0, done.stderr
    assert {p.name for p in folder.iterdir()} >= {"encoder_model.onnx", "encoder_model.onnx_data",
                                                  "decoder_model_merged.onnx", "decoder_model_merged.onnx_data",
                                                  "config.json", "generation_config.json"}
    rt, model = Runtime(folder), ORTModelForSeq2SeqLM.from_pretrained(str(folder))
    sources = [[*s, rt.config["eos_id"]] for s in random_sources(100, 37, seed=4)]
    assert_same_tokens(rt, model, sources)
    assert_same_log_probs(rt, model, sources[:6])
    if variant == "fp32":
        gen = dataclasses.replace(rt.generation, strategy="beam", num_beams=4, max_new_tokens=12)
        assert [h[0].tokens for h in rt.generate(sources, gen)] == [
            h[0].tokens for h in Runtime(bundle).generate(sources, gen)]


def test_optimums_quantized_folder_runs_by_its_file_names(optimum_folders, tmp_path: Path) -> None:
    """ORTQuantizer's `*_quantized.onnx`, alone in a folder: run as Optimum runs it when told the names; a folder
    with two such sets, neither the export's, is refused."""
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    source, folder = optimum_folders["bart"], tmp_path / "int8"
    config = AutoQuantizationConfig.avx2(is_static=False, per_channel=False)
    for graph in sorted(source.glob("*.onnx")):
        ORTQuantizer.from_pretrained(str(source), file_name=graph.name).quantize(save_dir=str(folder),
                                                                                quantization_config=config)
    for path in source.glob("*.json"):
        shutil.copy(path, folder / path.name)
    names = {f"{kind}_file_name": f"{graph}_quantized.onnx" for kind, graph in (
        ("encoder", "encoder_model"), ("decoder", "decoder_model"), ("decoder_with_past", "decoder_with_past_model"))}
    rt = Runtime(folder)
    assert rt.folder.encoder.name == "encoder_model_quantized.onnx"
    assert_same_tokens(rt, ORTModelForSeq2SeqLM.from_pretrained(str(folder), **names), sources_for(rt, 8, seed=9))
    shutil.copy(folder / "encoder_model_quantized.onnx", folder / "encoder_model_fp16.onnx")
    with pytest.raises(BundleError, match="several sets of graphs"):
        Runtime(folder)


def test_our_decoder_takes_its_past_layer_by_layer_as_optimums_does(exported, optimum_folders) -> None:
    """The caches can be exchanged by position as well as by name."""
    import onnxruntime as ort

    _, bundle = exported("post-sinusoidal")
    ours = [i.name for i in ort.InferenceSession(str(bundle / "decoder.onnx")).get_inputs()
            if i.name.startswith("past_key_values.")]
    theirs = [i.name for i in ort.InferenceSession(str(optimum_folders["bart"] / "decoder_with_past_model.onnx"))
              .get_inputs() if i.name.startswith("past_key_values.")]
    assert ours == theirs


def test_a_marian_import_in_optimums_layout_carries_hugging_faces_tokenizer(tmp_path: Path) -> None:
    """The tokenizer files of the import, as MarianTokenizer reads them; text in, text out, in both."""
    from edgeformer.model.importers.marian import import_marian

    hf = marian_folder(tmp_path / "hf")
    import_marian(hf, tmp_path / "checkpoint")
    done = edgeformer("export", str(tmp_path / "checkpoint"), str(tmp_path / "optimum"), "--layout", "optimum")
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "optimum"
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    rt = Runtime(folder)
    inputs = texts(12, seed=5)
    assert tokenizer(inputs)["input_ids"] == rt.tokenize(inputs)
    model = ORTModelForSeq2SeqLM.from_pretrained(str(folder))
    encoded = tokenizer(inputs, return_tensors="pt", padding=True)
    decoded = tokenizer.batch_decode(model.generate(**encoded, max_new_tokens=20), skip_special_tokens=True)
    assert decoded == rt.translate(inputs, rt.generation_config(max_new_tokens=20))
    # a translation pipeline over the folder translates as one over the original PyTorch model
    original = transformers.pipeline("translation", model=transformers.MarianMTModel.from_pretrained(str(hf)),
                                     tokenizer=transformers.AutoTokenizer.from_pretrained(str(hf)))
    ours = transformers.pipeline("translation", model=model, tokenizer=tokenizer)
    assert [r["translation_text"] for r in ours(inputs, max_new_tokens=20)] == [
        r["translation_text"] for r in original(inputs, max_new_tokens=20)]


def test_the_layout_refuses_a_cache_in_buffers_and_a_search_graph(exported, tmp_path: Path) -> None:
    _, bundle = exported("post-sinusoidal")
    done = edgeformer("optimize", str(bundle), str(tmp_path / "a"), "--layout", "optimum", "--cache", "buffer")
    assert done.returncode != 0 and "--cache buffer" in done.stderr and "Traceback" not in done.stderr
    done = edgeformer("export", str(tmp_path / "b"), "--layout", "optimum", "--search", "beam")
    assert done.returncode != 0 and "--search" in done.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def _copy(folder: Path, where: Path) -> Path:
    return Path(shutil.copytree(folder, where / "copy"))


def _edit_json(path: Path, **changes: Any) -> None:
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


@pytest.mark.parametrize(("settings", "named"), [
    ({"no_repeat_ngram_size": 3, "forced_bos_token_id": 0}, r"no_repeat_ngram_size=3.*forced_bos_token_id=0"),
    ({"typical_p": 0.5, "min_new_tokens": 3}, r"typical_p=0.5.*min_new_tokens=3"),
    ({"do_sample": True, "num_beams": 4}, r"beam sampling"),
    ({"num_beams": "4"}, r"num_beams='4' \(not a whole number\)"),
    ({"bad_words_ids": 7}, r"bad_words_ids=7 \(not a list"),
])
def test_settings_without_a_rule_are_refused_by_name(optimum_folders, tmp_path: Path, settings: dict,
                                                     named: str) -> None:
    folder = _copy(optimum_folders["bart"], tmp_path)
    _edit_json(folder / "generation_config.json", **settings)
    with pytest.raises(BundleError, match=named):
        Runtime(folder)
    done = edgeformer("info", str(folder))
    assert done.returncode != 0 and "Traceback" not in done.stderr and "generation_config.json" in done.stderr


def test_an_encoder_that_does_not_take_token_ids_is_refused(optimum_folders, tmp_path: Path) -> None:
    """A speech or vision encoder (input_features, pixel_values) is not a text seq2seq model."""
    import onnx
    from onnx import TensorProto, helper

    folder = _copy(optimum_folders["t5"], tmp_path)
    graph = helper.make_graph([helper.make_node("Identity", ["input_features"], ["last_hidden_state"])], "speech",
                              [helper.make_tensor_value_info("input_features", TensorProto.FLOAT, ["b", 80, "t"])],
                              [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["b", 80, "t"])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), folder / "encoder_model.onnx")
    with pytest.raises(BundleError, match=r"input_ids and attention_mask"):
        Runtime(folder)


def test_our_sinusoidal_model_keeps_no_length_bound_in_optimums_layout(exported, tmp_path: Path) -> None:
    from edgeformer.transforms.optimum_layout import write_optimum

    _, bundle = exported("post-sinusoidal")
    write_optimum(bundle, tmp_path / "ours", random_sources(8, 37, seed=10))
    from edgeformer.runtime.options import Limits

    rt = Runtime(tmp_path / "ours", limits=Limits(source_tokens=2048))
    assert rt.max_positions is None and Runtime(bundle).max_positions is None
    assert rt.generate([[5] * 1030 + [2]], GenerationConfig(max_new_tokens=3))  # past config.json's 1024


def test_a_folder_without_a_cached_decoder_is_refused(optimum_folders, tmp_path: Path) -> None:
    folder = _copy(optimum_folders["t5"], tmp_path)
    (folder / "decoder_with_past_model.onnx").unlink()
    with pytest.raises(BundleError, match="text2text-generation-with-past"):
        Runtime(folder)


def test_external_data_outside_the_folder_is_refused_before_onnxruntime_reads_it(exported, tmp_path: Path) -> None:
    import onnx

    _, bundle = exported("post-sinusoidal")
    from edgeformer.transforms.optimum_layout import write_optimum

    write_optimum(bundle, tmp_path / "ours", random_sources(8, 37, seed=6))
    graph = onnx.load(str(tmp_path / "ours" / "encoder_model.onnx"), load_external_data=False)
    for t in graph.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "../secret.bin"
    (tmp_path / "secret.bin").write_bytes((tmp_path / "ours" / "encoder_model.onnx_data").read_bytes())
    onnx.save(graph, str(tmp_path / "ours" / "encoder_model.onnx"))
    with pytest.raises(BundleError, match="not a plain file name"):
        Runtime(tmp_path / "ours", verify=False)


def test_a_changed_file_of_our_layout_fails_its_recorded_sha256(exported, tmp_path: Path) -> None:
    _, bundle = exported("post-sinusoidal")
    from edgeformer.transforms.optimum_layout import write_optimum

    write_optimum(bundle, tmp_path / "ours", random_sources(8, 37, seed=7))
    data = tmp_path / "ours" / "decoder_model_merged.onnx_data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 1
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="sha256"):
        Runtime(tmp_path / "ours")
    assert isinstance(Runtime(tmp_path / "ours", verify=False), OptimumRuntime)  # verify=False: the user's call


def test_step_models_of_optimums_graphs_keep_sources_apart_when_rows_leave(optimum_folders) -> None:
    """Rows that end leave the batch: the per-row encoder states follow them (a beam search of sources that end
    apart gives each the tokens it gives alone)."""
    rt = Runtime(optimum_folders["bart"])
    sources = sources_for(rt, 6, seed=8)
    gen = GenerationConfig(strategy="beam", num_beams=3, max_new_tokens=15)
    together = rt.generate(sources, gen)
    assert together == [rt.generate([s], gen)[0] for s in sources]
    assert isinstance(rt.step_model(np.array([[5, 6]]), np.array([[1, 1]]), 2), OptimumSteps)


def test_the_layout_check_takes_a_near_tie_and_refuses_another_answer(exported) -> None:
    """Where the layouts' numbers part in the last bits, a choice the bundle itself scores as good within the bound
    may fall either way; an answer it scores worse is refused."""
    from edgeformer.runtime.options import Hypothesis
    from edgeformer.transforms.compare import NEAR_TIE, near_tie

    _, bundle = exported("post-sinusoidal")
    rt = Runtime(bundle)
    first, second = random_sources(2, 37, seed=6)
    for gen in (GenerationConfig(strategy="greedy", max_new_tokens=10),
                GenerationConfig(strategy="beam", num_beams=4, length_penalty=0.6, max_new_tokens=10)):
        best = rt.generate([first], gen)[0][0]
        another = rt.generate([second], gen)[0][0]  # the best answer to another input
        assert another.tokens != best.tokens
        assert near_tie(rt, first, gen, best, Hypothesis(list(best.tokens), 0.0))
        assert not near_tie(rt, first, gen, best, another, NEAR_TIE)
        assert near_tie(rt, first, gen, best, another, bound=1e9)
