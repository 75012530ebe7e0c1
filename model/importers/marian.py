"""Hugging Face MarianMT (OPUS-MT) -> an edgeformer checkpoint with its tokenizer and generation defaults:
`edgeformer import marian HF_FOLDER OUT`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from edgeformer.model.checkpoint import save_checkpoint
from edgeformer.model.config import ConfigError, TransformerConfig
from edgeformer.model.importers.common import (
    ImporterError,
    Source,
    compare,
    expand,
    hf_config,
    hf_reference,
    hf_tensors,
    modules_to_tensors,
    place,
    raise_if,
    refuse,
)
from edgeformer.model.transformer import PositionalEncoding, Transformer
from edgeformer.runtime.hf_generation import from_hugging_face, unsupported
from edgeformer.runtime.options import GenerationConfig
from edgeformer.runtime.tokenizer import MARIAN_FILES, MarianTokenizer

MARIAN_ENCODER_LAYER = {
    "encoder.layers.{i}.self_attn.q_proj": "model.encoder.layers.{i}.self_attn.q_proj",
    "encoder.layers.{i}.self_attn.k_proj": "model.encoder.layers.{i}.self_attn.k_proj",
    "encoder.layers.{i}.self_attn.v_proj": "model.encoder.layers.{i}.self_attn.v_proj",
    "encoder.layers.{i}.self_attn.out_proj": "model.encoder.layers.{i}.self_attn.out_proj",
    "encoder.layers.{i}.self_attn_block.norm": "model.encoder.layers.{i}.self_attn_layer_norm",
    "encoder.layers.{i}.ffn.fc1": "model.encoder.layers.{i}.fc1",
    "encoder.layers.{i}.ffn.fc2": "model.encoder.layers.{i}.fc2",
    "encoder.layers.{i}.ffn_block.norm": "model.encoder.layers.{i}.final_layer_norm",
}
MARIAN_DECODER_LAYER = {
    "decoder.layers.{i}.self_attn.q_proj": "model.decoder.layers.{i}.self_attn.q_proj",
    "decoder.layers.{i}.self_attn.k_proj": "model.decoder.layers.{i}.self_attn.k_proj",
    "decoder.layers.{i}.self_attn.v_proj": "model.decoder.layers.{i}.self_attn.v_proj",
    "decoder.layers.{i}.self_attn.out_proj": "model.decoder.layers.{i}.self_attn.out_proj",
    "decoder.layers.{i}.self_attn_block.norm": "model.decoder.layers.{i}.self_attn_layer_norm",
    "decoder.layers.{i}.cross_attn.q_proj": "model.decoder.layers.{i}.encoder_attn.q_proj",
    "decoder.layers.{i}.cross_attn.k_proj": "model.decoder.layers.{i}.encoder_attn.k_proj",
    "decoder.layers.{i}.cross_attn.v_proj": "model.decoder.layers.{i}.encoder_attn.v_proj",
    "decoder.layers.{i}.cross_attn.out_proj": "model.decoder.layers.{i}.encoder_attn.out_proj",
    "decoder.layers.{i}.cross_attn_block.norm": "model.decoder.layers.{i}.encoder_attn_layer_norm",
    "decoder.layers.{i}.ffn.fc1": "model.decoder.layers.{i}.fc1",
    "decoder.layers.{i}.ffn.fc2": "model.decoder.layers.{i}.fc2",
    "decoder.layers.{i}.ffn_block.norm": "model.decoder.layers.{i}.final_layer_norm",
}
MARIAN_TENSORS: dict[str, Source] = {
    "encoder.embed.tokens.weight": "model.shared.weight",  # model.encoder.embed_tokens.weight when not shared
    "decoder.embed.tokens.weight": "model.decoder.embed_tokens.weight",  # only when not shared
    "decoder.output_projection.weight": "lm_head.weight",  # only when not tied
    "decoder.output_bias": "final_logits_bias",
}
# Hugging Face may also store copies of a tied or shared table (model.encoder.embed_tokens.weight, lm_head.weight,
# ...): import_marian checks that they are equal and places the table once.

# -- Hugging Face Marian (OPUS-MT) ----------------------------------------------------------------------------

# Settings of the BART family that MarianConfig does not use; a config that turns one on is not a Marian model.
MARIAN_FOREIGN = {"normalize_before": False, "add_final_layer_norm": False, "normalize_embedding": False,
                  "layernorm_embedding": False, "static_position_embeddings": True, "add_bias_logits": False}
MARIAN_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "swish": "silu", "silu": "silu"}


def marian_config(hf: dict[str, Any]) -> TransformerConfig:
    problems = []
    if hf.get("model_type") != "marian":
        problems.append(f"model_type is {hf.get('model_type')!r}, not 'marian'")
    archs = hf.get("architectures") or ["MarianMTModel"]
    if archs != ["MarianMTModel"]:
        problems.append(f"architectures {archs}: only MarianMTModel (encoder-decoder) is supported")
    if hf.get("is_decoder"):
        problems.append("is_decoder=true (a decoder-only MarianForCausalLM)")
    for key in ("attention_heads", "ffn_dim"):
        if hf.get(f"encoder_{key}") != hf.get(f"decoder_{key}"):
            problems.append(f"encoder_{key} ({hf.get(f'encoder_{key}')}) != decoder_{key} "
                            f"({hf.get(f'decoder_{key}')}): edgeformer uses one value for both")
    activation = hf.get("activation_function", "gelu")
    if activation not in MARIAN_ACTIVATIONS:
        problems.append(f"activation_function={activation!r}; supported: {', '.join(MARIAN_ACTIVATIONS)}")
    for key, default in MARIAN_FOREIGN.items():
        if key in hf and hf[key] != default:
            problems.append(f"{key}={hf[key]!r} (Marian models have {default})")
    if not isinstance(hf.get("eos_token_id"), int):
        problems.append(f"eos_token_id={hf.get('eos_token_id')!r}: one EOS id is supported")
    if hf.get("decoder_start_token_id") is None:
        problems.append("decoder_start_token_id is not set")
    refuse(problems, "this Marian config")
    shared = hf.get("share_encoder_decoder_embeddings", True)
    vocab = hf["vocab_size"]
    try:
        return TransformerConfig(
            src_vocab_size=vocab, tgt_vocab_size=vocab if shared else (hf.get("decoder_vocab_size") or vocab),
            d_model=hf["d_model"], n_heads=hf["encoder_attention_heads"], n_encoder_layers=hf["encoder_layers"],
            n_decoder_layers=hf["decoder_layers"], d_ff=hf["encoder_ffn_dim"], dropout=0.0,
            activation=MARIAN_ACTIVATIONS[activation], position="sinusoidal", sinusoid="halves", norm="post",
            final_norm=False, max_positions=hf.get("max_position_embeddings", 1024),
            scale_embeddings=bool(hf.get("scale_embedding", False)), share_embeddings=shared,
            tie_output=bool(hf.get("tie_word_embeddings", True)), output_bias=True, layer_norm_eps=1e-5,
            pad_id=hf["pad_token_id"], bos_id=hf["decoder_start_token_id"], eos_id=hf["eos_token_id"])
    except (ConfigError, KeyError) as e:
        raise ImporterError(f"this Marian config cannot be read: {e}") from None


def marian_generation(hf: dict[str, Any], eos_id: int) -> GenerationConfig:
    """Hugging Face's generation settings for this model, so that `generate` with the bundle's defaults does what
    `MarianMTModel.generate()` does."""
    refuse(unsupported(hf, eos_id), "the generation settings")
    return from_hugging_face(hf, eos_id)


def _marian_positions_ok(theirs: dict[str, Tensor], config: TransformerConfig) -> list[str]:
    """Older checkpoints store the sinusoid tables; they must be the ones we compute."""
    problems = []
    pe = PositionalEncoding(config.d_model, "halves")
    for side in ("encoder", "decoder"):
        table = theirs.pop(f"model.{side}.embed_positions.weight", None)
        if table is not None:
            expected = pe(torch.arange(table.shape[0]))
            if table.shape != expected.shape or float((table.float() - expected).abs().max()) > 1e-4:
                problems.append(f"model.{side}.embed_positions.weight is not Marian's sinusoid table")
    return problems


def import_marian(folder: Path | str, out: Path | str, force: bool = False, check: bool = True,
                  use_generation_settings: bool = True, log: Callable[[str], None] | None = None) -> Path:
    """A Hugging Face MarianMT folder (config.json, model.safetensors or pytorch_model.bin, source.spm,
    target.spm, vocab.json) -> an edgeformer checkpoint at `out`, with its tokenizer and generation defaults."""
    say = log or (lambda _msg: None)
    folder = Path(folder)
    hf = hf_config(folder)
    config = marian_config(hf)
    theirs = hf_tensors(folder, say)
    problems = _marian_positions_ok(theirs, config)
    shared = "model.shared.weight" if config.share_embeddings else "model.encoder.embed_tokens.weight"
    target = "model.shared.weight" if config.share_embeddings else "model.decoder.embed_tokens.weight"
    copies = {"model.encoder.embed_tokens.weight": shared, "model.decoder.embed_tokens.weight": target,
              "lm_head.weight": target if config.tie_output else None}
    for copy, original in copies.items():
        if original is None or copy == original or copy not in theirs:
            continue
        if original not in theirs:
            theirs[original] = theirs.pop(copy)  # the only stored copy of a tied table
        elif torch.equal(theirs[copy], theirs[original]):
            theirs.pop(copy)
        else:
            problems.append(f"{copy} differs from {original}, but the config says they are tied")
    raise_if(problems, "cannot import these weights")
    table = {**expand(modules_to_tensors(MARIAN_ENCODER_LAYER), config.n_encoder_layers),
             **expand(modules_to_tensors(MARIAN_DECODER_LAYER), config.n_decoder_layers),
             **MARIAN_TENSORS, "encoder.embed.tokens.weight": shared}
    model = Transformer(config).eval()
    place(model, table, theirs, reshape={"decoder.output_bias": lambda t: t.reshape(-1)})
    if check:
        _check_marian(model, folder, say)
    tokenizer = _marian_tokenizer(folder, say)
    generation = None
    if use_generation_settings:
        gen_file = folder / "generation_config.json"
        settings = json.loads(gen_file.read_text()) if gen_file.is_file() else hf
        generation = marian_generation(settings, config.eos_id)
    return save_checkpoint(model, Path(out), tokenizer, force=force, generation=generation)


def _marian_tokenizer(folder: Path, say: Callable[[str], None]) -> MarianTokenizer | None:
    missing = [n for n in MARIAN_FILES.values() if not (folder / n).is_file()]
    if missing:
        say(f"no tokenizer ({', '.join(missing)} missing): the bundle will take and return token ids")
        return None
    tc_path = folder / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text()) if tc_path.is_file() else {}
    if tc.get("separate_vocabs"):
        raise ImporterError("tokenizer_config.json: separate_vocabs=true (two vocabularies) is not supported")

    def token(key: str, default: str) -> str:
        value = tc.get(key, default)
        return str(value["content"] if isinstance(value, dict) else value)

    vocab = json.loads((folder / MARIAN_FILES["vocab"]).read_text())
    return MarianTokenizer(folder, vocab, eos=token("eos_token", "</s>"), unk=token("unk_token", "<unk>"),
                           pad=token("pad_token", "<pad>"), decode_with="source")


def _check_marian(model: Transformer, folder: Path, say: Callable[[str], None]) -> None:
    reference = hf_reference("MarianMTModel", folder, say)
    if reference is None:
        return

    def run(src: Tensor, src_mask: Tensor, tgt: Tensor, tgt_mask: Tensor) -> Tensor:
        return reference(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt).logits

    diff = compare(model, run, "Hugging Face's MarianMTModel")
    say(f"max |logit difference| to Hugging Face: {diff:.2e}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="HF_FOLDER")
    parser.add_argument("--no-check", action="store_true", help="skip the comparison with transformers' MarianMTModel")
    parser.add_argument("--no-generation-settings", action="store_true",
                        help="do not carry generation_config.json (beams, max length, forced EOS...) into the bundle")


def run(args: argparse.Namespace, out: Path, force: bool, log: Callable[[str], None] | None) -> Path:
    return import_marian(Path(args.source), out, force=force, check=not args.no_check,
                         use_generation_settings=not args.no_generation_settings, log=log)
