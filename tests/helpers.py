"""What the tests build on: tiny random models built in milliseconds, random sources, a bundle's graphs opened
as onnxruntime sessions. Tests import from here, never from each other or from conftest."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from edgeformer.runtime.bundle import MANIFEST_FILE, Manifest
from edgeformer.runtime.engine import open_session

if TYPE_CHECKING:  # torch and onnx only where a test builds a model or a graph: the runtime's tests need neither
    import onnx

    from edgeformer.model.transformer import Transformer

TINY = {"src_vocab_size": 37, "tgt_vocab_size": 29, "d_model": 32, "n_heads": 4, "n_encoder_layers": 2,
        "n_decoder_layers": 2, "d_ff": 64, "dropout": 0.0}
# One random model of each position kind and norm placement (and the other options) for parity tests.
VARIANTS = {
    "post-sinusoidal": {},
    "pre-learned-gelu": {"norm": "pre", "position": "learned", "max_positions": 64, "activation": "gelu"},
    "shared-untied": {"share_embeddings": True, "tgt_vocab_size": 37, "tie_output": False, "n_decoder_layers": 3},
    "shared-tied": {"share_embeddings": True, "tgt_vocab_size": 37},  # one table: both embeddings and the logits
    # What imported models need: Marian's layout of sines, SiLU, a logits bias, the decoder starting from pad, and
    # nn.Transformer's final norm after post-norm layers.
    "marian-like": {"sinusoid": "halves", "activation": "silu", "output_bias": True, "final_norm": True,
                    "pad_id": 0, "bos_id": 0},
}
# Bundles of two of them ship in tests/data (tests/data/make_bundles.py), for the runtime's tests without torch.
SHIPPED_BUNDLES = ("post-sinusoidal", "pre-learned-gelu")
DATA = Path(__file__).resolve().parent / "data"


def tiny_model(seed: int = 0, **overrides: object) -> Transformer:
    import torch

    from edgeformer.model.config import TransformerConfig
    from edgeformer.model.transformer import Transformer

    torch.manual_seed(seed)
    model = Transformer(TransformerConfig(**{**TINY, **overrides}))  # type: ignore[arg-type]
    # Random but decisive: a larger output projection spreads the logits, so that near-ties of the argmax (where
    # 1e-6 of float noise could flip a greedy token) are rare.
    with torch.no_grad():
        projection = model.decoder.output_projection or model.decoder.embed.tokens
        projection.weight.mul_(4.0)
        for name, p in model.named_parameters():  # zero biases would hide a bias that is never applied
            if name.endswith("bias"):
                p.normal_(std=0.1)
    return model.eval()


def tiny_vit(seed: int = 0, **overrides: object) -> Any:
    """A random ViT of 12x12 RGB images in 3x3 patches, small enough to export in a second."""
    import torch

    from edgeformer.model.vit import ViT, ViTConfig

    torch.manual_seed(seed)
    settings: dict[str, Any] = {"image_size": 12, "patch_size": 3, "channels": 3, "num_classes": 7, "d_model": 32,
                                "n_heads": 4, "n_layers": 2, "d_ff": 64, "labels": tuple("abcdefg"),
                                "mean": (0.4, 0.5, 0.6), "std": (0.2, 0.3, 0.25), **overrides}
    model = ViT(ViTConfig(**settings))
    with torch.no_grad():  # random but decisive logits, and biases that would show if one were left out
        model.head.weight.mul_(8.0)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    return model.eval()


def hf_vit_folder(root: Path, **overrides: object) -> Path:
    """A random Hugging Face ViTForImageClassification (32x32 RGB, patches of 8), weights spread so that logits are
    far from zero, saved with an image processor of ImageNet's mean and std."""
    import torch
    import transformers

    settings: dict[str, Any] = {"image_size": 32, "patch_size": 8, "num_channels": 3, "hidden_size": 48,
                                "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 96,
                                "id2label": {i: f"class{i}" for i in range(5)},
                                "label2id": {f"class{i}": i for i in range(5)}, **overrides}
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(**settings)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    folder = root / "hf-vit"
    model.save_pretrained(str(folder))
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.485, 0.456, 0.406],
                                   image_std=[0.229, 0.224, 0.225]).save_pretrained(str(folder))
    return folder


def random_sources(n: int, vocab: int, seed: int, longest: int = 20) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(4, vocab, rng.integers(1, longest + 1)).tolist() for _ in range(n)]


def session_of(model: onnx.ModelProto) -> ort.InferenceSession:
    """An onnxruntime CPU session of an in-memory graph."""
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def graph_sessions(bundle: Path) -> dict[str, ort.InferenceSession]:
    """Every graph of a bundle, opened on the CPU as its manifest names them."""
    m = Manifest.load(bundle)
    return {name: open_session(Path(bundle) / file) for name, file in m.graph_files.items()}


def edgeformer(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeformer.cli", *args], capture_output=True, text=True,
                          input=stdin, check=False)


def search_head_feed(vocab: int, k: int = 1) -> dict[str, np.ndarray]:
    """The decoder's search-head inputs: no token masked, the k best."""
    return {"logits_mask": np.zeros(vocab, np.float32), "top_k": np.array([k], np.int64)}


def copy_bundle(bundle: Path, where: Path, name: str = "bundle") -> Path:
    """A copy of a bundle to tamper with."""
    return Path(shutil.copytree(bundle, where / name))


def edit_manifest(bundle: Path, edit: Callable[[Any], Any]) -> None:
    """Rewrite a bundle's manifest as `edit` (given the parsed JSON, returning it or changing it in place) makes it."""
    path = Path(bundle) / MANIFEST_FILE
    d = json.loads(path.read_text())
    changed = edit(d)
    path.write_text(json.dumps(d if changed is None else changed))


def relist(bundle: Path, *names: str) -> None:
    """Record these files' present size and sha256 in the manifest, as a tamperer who knows the format would."""
    def edit(d: dict) -> None:
        for name in names:
            data = (Path(bundle) / name).read_bytes()
            d["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    edit_manifest(bundle, edit)


def texts(n: int, seed: int = 0) -> list[str]:
    """Sources of the built-in dates task."""
    import random

    from edgeformer.model.tasks import get_task

    rng = random.Random(seed)
    return [s for s, _ in (get_task("dates").sample(rng, "test") for _ in range(n))]


def _train_spm(corpus: list[str], path: Path) -> None:
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=120,
                                   character_coverage=1.0, bos_id=-1, eos_id=-1, unk_id=0, minloglevel=2)
    path.write_bytes(model.getvalue())


def marian_folder(root: Path, **overrides: object) -> Path:
    """A MarianMT folder as `save_pretrained` writes one: random weights, vocabularies trained on task texts
    (needs edgeformer[hf])."""
    import sentencepiece as spm
    import torch
    import transformers

    from edgeformer.model.tasks import get_task

    root.mkdir(parents=True)
    _train_spm(texts(2000, seed=1), root / "source.spm")
    _train_spm([t for _, t in get_task("dates").pairs(500, "train")], root / "target.spm")
    pieces = []
    for name in ("source.spm", "target.spm"):
        sp = spm.SentencePieceProcessor(model_file=str(root / name))
        pieces += [sp.id_to_piece(i) for i in range(1, sp.get_piece_size())]
    vocab = ["</s>", "<unk>", *dict.fromkeys(pieces), "<pad>"]  # OPUS-MT's order: eos 0, unk 1, pad last
    (root / "vocab.json").write_text(json.dumps({p: i for i, p in enumerate(vocab)}))
    tokenizer = transformers.MarianTokenizer(str(root / "source.spm"), str(root / "target.spm"),
                                             str(root / "vocab.json"))
    pad = len(vocab) - 1
    settings = {"vocab_size": len(vocab), "d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
                "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 64,
                "decoder_ffn_dim": 64, "max_position_embeddings": 256, "pad_token_id": pad,
                "decoder_start_token_id": pad, "eos_token_id": 0, "forced_eos_token_id": 0, "scale_embedding": True,
                "activation_function": "swish", "init_std": 0.3, **overrides}
    torch.manual_seed(0)
    model = transformers.MarianMTModel(transformers.MarianConfig(**settings)).eval()
    with torch.no_grad():
        model.final_logits_bias.normal_(std=0.5)  # zero would hide a bias that is never applied
    model.save_pretrained(str(root))
    tokenizer.save_pretrained(str(root))
    return root
