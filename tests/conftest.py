"""Shared fixtures: tiny random models built in milliseconds, and bundles exported once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from edgeformer.model.checkpoint import save_checkpoint
from edgeformer.model.config import TransformerConfig
from edgeformer.model.transformer import Transformer

torch.set_num_threads(2)

TINY = {"src_vocab_size": 37, "tgt_vocab_size": 29, "d_model": 32, "n_heads": 4, "n_encoder_layers": 2,
        "n_decoder_layers": 2, "d_ff": 64, "dropout": 0.0}
# One random model of each position kind and norm placement (and the other options) for parity tests.
VARIANTS = {
    "post-sinusoidal": {},
    "pre-learned-gelu": {"norm": "pre", "position": "learned", "max_positions": 64, "activation": "gelu"},
    "shared-untied": {"share_embeddings": True, "tgt_vocab_size": 37, "tie_output": False, "n_decoder_layers": 3},
    # What imported models need: Marian's layout of sines, SiLU, a logits bias, the decoder starting from pad, and
    # nn.Transformer's final norm after post-norm layers.
    "marian-like": {"sinusoid": "halves", "activation": "silu", "output_bias": True, "final_norm": True,
                    "pad_id": 0, "bos_id": 0},
}


def tiny_model(seed: int = 0, **overrides: object) -> Transformer:
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


@pytest.fixture(scope="session")
def make_model() -> Callable[..., Transformer]:
    return tiny_model


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Transformer, Path]]:
    """variant name -> (PyTorch model, bundle folder), exported once per session."""
    from edgeformer.export.onnx_export import export

    cache: dict[str, tuple[Transformer, Path]] = {}

    def get(name: str) -> tuple[Transformer, Path]:
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            if name == "demo":
                from edgeformer.model.checkpoint import load_checkpoint

                model, _ = load_checkpoint()
                export(None, root / "bundle")
            else:
                model = tiny_model(**VARIANTS[name])  # type: ignore[arg-type]
                save_checkpoint(model, root / "checkpoint")
                export(root / "checkpoint", root / "bundle")
            cache[name] = (model, root / "bundle")
        return cache[name]

    return get
