"""Importers, proven against references no one here wrote: Hugging Face's MarianMTModel (random weights from a
config, a SentencePiece vocabulary trained here) and PyTorch's translation-tutorial model on torch.nn.Transformer."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from edgeformer.export.onnx_export import export
from edgeformer.model.checkpoint import load_checkpoint
from edgeformer.model.importers.common import ImporterError
from edgeformer.model.importers.marian import import_marian
from edgeformer.model.importers.torch_transformer import TorchFacts, import_torch_transformer
from edgeformer.model.tasks import get_task
from edgeformer.runtime.session import Runtime
from edgeformer.transforms.derive import quantize

transformers = pytest.importorskip("transformers", reason="the Marian reference needs edgeformer[hf]")
spm = pytest.importorskip("sentencepiece", reason="the Marian tokenizer needs edgeformer[hf]")

from tests.helpers import marian_folder, texts  # noqa: E402  (after the skips: they import both)


@pytest.fixture(scope="module")
def marian(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(Hugging Face folder, imported checkpoint, exported bundle)."""
    root = tmp_path_factory.mktemp("marian")
    hf = marian_folder(root / "hf")
    import_marian(hf, root / "checkpoint")
    export(root / "checkpoint", root / "bundle")
    return hf, root / "checkpoint", root / "bundle"


def test_imported_marian_logits_match_hugging_face(marian) -> None:
    hf_dir, checkpoint, _ = marian
    reference = transformers.MarianMTModel.from_pretrained(str(hf_dir)).eval()
    tokenizer = transformers.MarianTokenizer.from_pretrained(str(hf_dir))
    model, _ = load_checkpoint(checkpoint)
    batch = tokenizer(texts(16), return_tensors="pt", padding=True)
    labels = tokenizer(text_target=[t for _, t in get_task("dates").pairs(16, "test")], return_tensors="pt",
                       padding=True)
    decoder_ids = torch.cat([torch.full((16, 1), reference.config.decoder_start_token_id),
                             labels.input_ids[:, :-1]], dim=1)
    with torch.no_grad():
        theirs = reference(**batch, decoder_input_ids=decoder_ids).logits
        ours = model(batch.input_ids, decoder_ids, batch.attention_mask)
    real = labels.attention_mask.bool()
    assert float((ours - theirs).abs()[real].max()) < 1e-4


def test_marian_tokenizer_in_the_bundle_equals_hugging_faces(marian) -> None:
    hf_dir, _, bundle = marian
    tokenizer = transformers.MarianTokenizer.from_pretrained(str(hf_dir))
    rt = Runtime(bundle)
    assert rt.tokenizer is not None
    inputs = [*texts(50, seed=3), ">>fr<< 12 mars 2001", "unknown ☃ glyphs", ""]
    assert rt.tokenizer.encode_batch(inputs) == tokenizer(inputs).input_ids
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 12))]
        assert rt.tokenizer.decode(ids) == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("num_beams", [1, 4], ids=["greedy", "beam4"])
def test_runtime_equals_marian_generate_token_for_token(marian, num_beams: int) -> None:
    hf_dir, _, bundle = marian
    reference = transformers.MarianMTModel.from_pretrained(str(hf_dir)).eval()
    tokenizer = transformers.MarianTokenizer.from_pretrained(str(hf_dir))
    rt = Runtime(bundle)
    # The bundle carries Hugging Face's defaults (max_length 20, forced EOS); only the beam count is set here.
    gen = rt.generation_config(strategy="beam" if num_beams > 1 else "greedy", num_beams=num_beams)
    inputs = texts(100, seed=2)
    pad, eos = reference.config.pad_token_id, reference.config.eos_token_id
    for i in range(0, len(inputs), 25):  # padded batches of mixed lengths
        batch = tokenizer(inputs[i: i + 25], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = reference.generate(**batch, num_beams=num_beams, do_sample=False)
        theirs = [[t for t in row[1:] if t not in (pad, eos)] for row in out.tolist()]
        ours = rt.generate(tokenizer(inputs[i: i + 25]).input_ids, gen)
        assert [h[0].tokens for h in ours] == theirs
        assert rt.translate(inputs[i: i + 25], gen) == tokenizer.batch_decode(out, skip_special_tokens=True)


def test_marian_bundle_quantizes_and_keeps_its_tokenizer_and_defaults(marian, tmp_path: Path) -> None:
    _, _, bundle = marian
    quantize(bundle, tmp_path / "int8", to="int8", allow_drop=True)  # random weights: agreement is not the point
    rt, fp32 = Runtime(tmp_path / "int8"), Runtime(bundle)
    assert rt.generation == fp32.generation and rt.generation.forced_eos
    assert rt.translate(texts(4)) and rt.tokenizer is not None


def test_pytorch_model_bin_is_read_without_running_pickled_code(tmp_path: Path, marian) -> None:
    hf_dir, checkpoint, _ = marian
    copy = tmp_path / "hf"
    shutil.copytree(hf_dir, copy)
    torch.save(load_file(str(copy / "model.safetensors")), copy / "pytorch_model.bin")
    (copy / "model.safetensors").unlink()
    import_marian(copy, tmp_path / "ck")
    ours, _ = load_checkpoint(tmp_path / "ck")
    ref, _ = load_checkpoint(checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values(), strict=True))
    torch.save(nn.Linear(2, 2), copy / "pytorch_model.bin")  # a pickled module, not a state dict
    with pytest.raises(ImporterError, match="weights_only=True"):
        import_marian(copy, tmp_path / "ck2")
    assert not (tmp_path / "ck2").exists()


@pytest.mark.parametrize("overrides, message", [
    ({"activation_function": "gelu_new"}, "activation_function='gelu_new'"),
    ({"decoder_attention_heads": 2}, "encoder_attention_heads"),
    ({"decoder_ffn_dim": 32}, "encoder_ffn_dim"),
    ({"normalize_before": True}, "normalize_before=True"),
    ({"no_repeat_ngram_size": 3}, "no_repeat_ngram_size=3"),
    ({"bad_words_ids": [[5, 6]]}, r"bad_words_ids entry \[5, 6\]"),
])
def test_unsupported_marian_options_are_refused_by_name(marian, tmp_path: Path, overrides: dict,
                                                        message: str) -> None:
    hf_dir, _, _ = marian
    folder = tmp_path / "hf"
    shutil.copytree(hf_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **overrides}))
    (folder / "generation_config.json").unlink()  # the settings then come from config.json, as in old folders
    with pytest.raises(ImporterError, match=message):
        import_marian(folder, tmp_path / "out", check=False)
    assert not (tmp_path / "out").exists()


def test_missing_and_unexpected_marian_tensors_are_listed(marian, tmp_path: Path) -> None:
    hf_dir, _, _ = marian
    folder = tmp_path / "hf"
    shutil.copytree(hf_dir, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.decoder.layers.1.fc2.bias"]
    tensors["model.decoder.layers.0.extra_gate.weight"] = torch.zeros(3)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ImporterError) as e:
        import_marian(folder, tmp_path / "out", check=False)
    assert "missing tensor model.decoder.layers.1.fc2.bias" in str(e.value)
    assert "unexpected tensor model.decoder.layers.0.extra_gate.weight" in str(e.value)


# -- torch.nn.Transformer, as PyTorch's translation tutorial builds it --------------------------------------------

class TutorialPositionalEncoding(nn.Module):
    def __init__(self, emb_size: int, maxlen: int = 5000) -> None:
        super().__init__()
        den = torch.exp(-torch.arange(0, emb_size, 2) * math.log(10000) / emb_size)
        pos = torch.arange(0, maxlen).reshape(maxlen, 1)
        pos_embedding = torch.zeros((maxlen, emb_size))
        pos_embedding[:, 0::2] = torch.sin(pos * den)
        pos_embedding[:, 1::2] = torch.cos(pos * den)
        self.register_buffer("pos_embedding", pos_embedding.unsqueeze(-2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pos_embedding[: x.size(0), :]


class TokenEmbedding(nn.Module):
    def __init__(self, vocab_size: int, emb_size: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, emb_size)
        self.emb_size = emb_size

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding(tokens.long()) * math.sqrt(self.emb_size)


class Seq2SeqTransformer(nn.Module):
    """The tutorial's model (sequence-first tensors), with norm_first and activation as options."""

    def __init__(self, norm_first: bool = False, activation: str = "relu", src_vocab: int = 41,
                 tgt_vocab: int = 37) -> None:
        super().__init__()
        self.transformer = nn.Transformer(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=3,
                                          dim_feedforward=64, dropout=0.1, activation=activation,
                                          norm_first=norm_first)
        self.generator = nn.Linear(32, tgt_vocab)
        self.src_tok_emb = TokenEmbedding(src_vocab, 32)
        self.tgt_tok_emb = TokenEmbedding(tgt_vocab, 32)
        self.positional_encoding = TutorialPositionalEncoding(32)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_padding_mask: torch.Tensor) -> torch.Tensor:
        tgt_mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[0])
        outs = self.transformer(self.positional_encoding(self.src_tok_emb(src)),
                                self.positional_encoding(self.tgt_tok_emb(tgt)), None, tgt_mask, None,
                                src_padding_mask, None, src_padding_mask)
        return self.generator(outs)


def tutorial_model(seed: int = 0, **options: object) -> Seq2SeqTransformer:
    torch.manual_seed(seed)
    model = Seq2SeqTransformer(**options)  # type: ignore[arg-type]
    with torch.no_grad():
        model.generator.weight.mul_(4.0)  # decisive logits, as in conftest
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    return model.eval()


def padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    src, tgt = torch.randint(4, 41, (6, 13), generator=g), torch.randint(4, 37, (6, 9), generator=g)
    mask = torch.ones_like(src)
    for row, length in enumerate([13, 9, 5, 13, 2, 11]):
        mask[row, length:] = 0
    return src.masked_fill(mask == 0, 1), tgt, mask


@pytest.mark.parametrize("options", [{}, {"norm_first": True, "activation": "gelu"}], ids=["post-relu", "pre-gelu"])
def test_imported_nn_transformer_matches_the_original_module(tmp_path: Path, options: dict) -> None:
    original = tutorial_model(**options)
    path = tmp_path / "model.pt"
    torch.save(original.state_dict(), path)
    facts = TorchFacts(n_heads=4, norm="pre" if options else "post", activation=options.get("activation", "relu"))
    import_torch_transformer(path, tmp_path / "ck", facts)
    ours, _ = load_checkpoint(tmp_path / "ck")
    src, tgt, mask = padded_batch()
    with torch.no_grad():
        theirs = original(src.T, tgt.T, mask == 0).transpose(0, 1)  # the tutorial is sequence-first
        mine = ours(src, tgt, mask)
    assert float((mine - theirs).abs().max()) < 1e-5


def test_imported_nn_transformer_runs_in_the_runtime_like_the_original(tmp_path: Path) -> None:
    original = tutorial_model(seed=1)
    import_torch_transformer(original.state_dict(), tmp_path / "ck", TorchFacts(n_heads=4))
    export(tmp_path / "ck", tmp_path / "bundle")
    rt = Runtime(tmp_path / "bundle")
    src, _, mask = padded_batch(seed=1)
    ours = rt.generate([row[row_mask.bool()].tolist() for row, row_mask in zip(src, mask, strict=True)],
                       rt.generation_config(max_new_tokens=12))
    # Greedy decoding with the original module, the tutorial's way: re-run the whole prefix each step.
    ys = torch.full((1, len(src)), 2)  # <bos> = 2
    finished = torch.zeros(len(src), dtype=torch.bool)
    theirs: list[list[int]] = [[] for _ in src]
    with torch.no_grad():
        for _ in range(12):
            nxt = original(src.T, ys, mask == 0)[-1].argmax(-1)
            for r, t in enumerate(nxt.tolist()):
                finished[r] |= t == 3  # <eos> = 3
                if not finished[r]:
                    theirs[r].append(t)
            ys = torch.cat([ys, nxt[None]], dim=0)
    assert [h[0].tokens for h in ours] == theirs


def test_learned_position_table_is_imported_as_one(tmp_path: Path) -> None:
    original = tutorial_model()
    with torch.no_grad():
        original.positional_encoding.pos_embedding.add_(torch.randn_like(original.positional_encoding.pos_embedding))
    with pytest.raises(ImporterError, match="not the sinusoid table"):
        import_torch_transformer(original.state_dict(), tmp_path / "a", TorchFacts(n_heads=4))
    import_torch_transformer(original.state_dict(), tmp_path / "b", TorchFacts(n_heads=4, positions="learned"))
    ours, _ = load_checkpoint(tmp_path / "b")
    src, tgt, mask = padded_batch()
    with torch.no_grad():
        assert float((ours(src, tgt, mask) - original(src.T, tgt.T, mask == 0).transpose(0, 1)).abs().max()) < 1e-5


def test_unplaceable_tensors_and_impossible_facts_are_refused(tmp_path: Path) -> None:
    state = tutorial_model().state_dict()
    with pytest.raises(ImporterError, match="activation 'swish'"):
        import_torch_transformer(state, tmp_path / "a", TorchFacts(n_heads=4, activation="swish"))
    with pytest.raises(ImporterError, match="must be divisible by n_heads"):
        import_torch_transformer(state, tmp_path / "b", TorchFacts(n_heads=5))
    extra = {**state, "adapter.weight": torch.zeros(4, 4)}
    with pytest.raises(ImporterError, match=r"unexpected tensor adapter\.weight"):
        import_torch_transformer(extra, tmp_path / "c", TorchFacts(n_heads=4))
    no_bias = tutorial_model().state_dict()
    for key in [k for k in no_bias if k.endswith("in_proj_bias")]:
        del no_bias[key]
    with pytest.raises(ImporterError, match=r"nn\.Transformer\(bias=False\)"):
        import_torch_transformer(no_bias, tmp_path / "d", TorchFacts(n_heads=4))
    with pytest.raises(ImporterError, match=r"missing tensor model\.src_emb\.weight"):
        import_torch_transformer(state, tmp_path / "e", TorchFacts(n_heads=4, src_embedding="model.src_emb.weight"))
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_command_line_imports_exports_and_translates_an_opus_mt_folder(marian, tmp_path: Path) -> None:
    from tests.helpers import edgeformer

    hf_dir, _, _ = marian
    out = edgeformer("import", "marian", str(hf_dir), str(tmp_path / "ck"))
    assert out.returncode == 0, out.stderr
    assert "max |logit difference| to Hugging Face" in out.stdout
    assert edgeformer("export", str(tmp_path / "ck"), str(tmp_path / "bundle")).returncode == 0
    info = edgeformer("info", str(tmp_path / "bundle"))
    assert "forced_eos True" in info.stdout and "silu" in info.stdout
    inputs = texts(3, seed=5)
    out = edgeformer("generate", str(tmp_path / "bundle"), *inputs, "--beams", "4", "--strategy", "beam", "--json")
    assert out.returncode == 0, out.stderr
    reference = transformers.MarianMTModel.from_pretrained(str(hf_dir)).eval()
    tokenizer = transformers.MarianTokenizer.from_pretrained(str(hf_dir))
    with torch.no_grad():
        expected = reference.generate(**tokenizer(inputs, return_tensors="pt", padding=True), num_beams=4)
    assert [o[0]["output"] for o in json.loads(out.stdout)["outputs"]] == tokenizer.batch_decode(
        expected, skip_special_tokens=True)
    bad = edgeformer("import", "torch-transformer", str(tmp_path / "none.pt"), str(tmp_path / "x"), "--heads", "4")
    assert bad.returncode != 0 and "none.pt: no such file" in bad.stderr
