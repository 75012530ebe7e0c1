"""A state dict of a model built on torch.nn.Transformer -> an edgeformer checkpoint:
`edgeformer import torch-transformer STATE_DICT OUT --heads N`."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor, nn

from edgeformer.model.checkpoint import save_checkpoint
from edgeformer.model.config import ConfigError, TransformerConfig
from edgeformer.model.importers.common import (
    ImporterError,
    compare,
    expand,
    modules_to_tensors,
    packed_qkv,
    place,
    read_tensors,
    refuse,
)
from edgeformer.model.transformer import PositionalEncoding, Transformer

TORCH_ENCODER_LAYER = {
    "encoder.layers.{i}.self_attn.out_proj": "{p}encoder.layers.{i}.self_attn.out_proj",
    "encoder.layers.{i}.self_attn_block.norm": "{p}encoder.layers.{i}.norm1",
    "encoder.layers.{i}.ffn.fc1": "{p}encoder.layers.{i}.linear1",
    "encoder.layers.{i}.ffn.fc2": "{p}encoder.layers.{i}.linear2",
    "encoder.layers.{i}.ffn_block.norm": "{p}encoder.layers.{i}.norm2",
}
TORCH_DECODER_LAYER = {
    "decoder.layers.{i}.self_attn.out_proj": "{p}decoder.layers.{i}.self_attn.out_proj",
    "decoder.layers.{i}.self_attn_block.norm": "{p}decoder.layers.{i}.norm1",
    "decoder.layers.{i}.cross_attn.out_proj": "{p}decoder.layers.{i}.multihead_attn.out_proj",
    "decoder.layers.{i}.cross_attn_block.norm": "{p}decoder.layers.{i}.norm2",
    "decoder.layers.{i}.ffn.fc1": "{p}decoder.layers.{i}.linear1",
    "decoder.layers.{i}.ffn.fc2": "{p}decoder.layers.{i}.linear2",
    "decoder.layers.{i}.ffn_block.norm": "{p}decoder.layers.{i}.norm3",
}
TORCH_FINAL_NORMS = {"encoder.norm": "{p}encoder.norm", "decoder.norm": "{p}decoder.norm"}


TORCH_ENCODER_TENSORS = {**modules_to_tensors(TORCH_ENCODER_LAYER), **packed_qkv("encoder", "self_attn", "self_attn")}
TORCH_DECODER_TENSORS = {**modules_to_tensors(TORCH_DECODER_LAYER), **packed_qkv("decoder", "self_attn", "self_attn"),
                         **packed_qkv("decoder", "cross_attn", "multihead_attn")}


# -- torch.nn.Transformer ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TorchFacts:
    """What a state dict cannot tell. The defaults are those of PyTorch's translation tutorial
    (Seq2SeqTransformer: TokenEmbedding scaled by sqrt(d_model), sinusoidal PositionalEncoding, `generator`)."""

    n_heads: int
    norm: str = "post"  # nn.Transformer(norm_first=False)
    activation: str = "relu"
    positions: str = "sinusoidal"  # sinusoidal (interleaved, the tutorial's) | learned (a table in the state dict)
    scale_embeddings: bool = True
    layer_norm_eps: float = 1e-5
    prefix: str = "transformer."  # where the nn.Transformer sits in the state dict
    src_embedding: str = "src_tok_emb.embedding.weight"
    tgt_embedding: str = "tgt_tok_emb.embedding.weight"
    generator: str = "generator"  # the output projection (Linear): its weight, and its bias if it has one
    position_table: str = "positional_encoding.pos_embedding"  # (max_len, 1, D) or (max_len, D)
    pad_id: int = 1  # the tutorial's special tokens: <unk> 0, <pad> 1, <bos> 2, <eos> 3
    bos_id: int = 2
    eos_id: int = 3


def _count_layers(theirs: dict[str, Tensor], stem: str) -> int:
    indices = {int(k[len(stem):].split(".")[0]) for k in theirs if k.startswith(stem)}
    return max(indices) + 1 if indices else 0


def torch_transformer_config(theirs: dict[str, Tensor], facts: TorchFacts) -> TransformerConfig:
    p = facts.prefix
    problems = []
    if facts.activation not in ("relu", "gelu"):
        problems.append(f"activation {facts.activation!r}: nn.Transformer layers take relu or gelu")
    if facts.positions not in ("sinusoidal", "learned"):
        problems.append(f"positions {facts.positions!r}: choose sinusoidal or learned")
    for name in (f"{p}encoder.layers.0.self_attn.in_proj_weight", f"{p}decoder.layers.0.self_attn.in_proj_weight",
                 facts.src_embedding, facts.tgt_embedding, f"{facts.generator}.weight"):
        if name not in theirs:
            problems.append(f"missing tensor {name}; the tensors are named like {sorted(theirs)[:4]} ... "
                            "(set the prefix and embedding names to match)")
    if f"{p}encoder.layers.0.self_attn.q_proj_weight" in theirs:
        problems.append("separate q/k/v projection weights (kdim/vdim != embed_dim) are not supported")
    if f"{p}encoder.layers.0.self_attn.in_proj_weight" in theirs and \
            f"{p}encoder.layers.0.self_attn.in_proj_bias" not in theirs:
        problems.append("attention without biases (nn.Transformer(bias=False)) is not supported")
    if (f"{p}encoder.norm.weight" in theirs) != (f"{p}decoder.norm.weight" in theirs):
        problems.append("a final norm on only one of encoder and decoder is not supported")
    refuse(problems, "this nn.Transformer state dict")
    d_model = theirs[f"{p}encoder.layers.0.self_attn.in_proj_weight"].shape[1]
    src_vocab, tgt_vocab = theirs[facts.src_embedding].shape[0], theirs[facts.tgt_embedding].shape[0]
    max_positions = 1024
    if facts.positions == "learned":
        if facts.position_table not in theirs:
            raise ImporterError(f"positions=learned but the state dict has no {facts.position_table}")
        max_positions = theirs[facts.position_table].shape[0]
    try:
        return TransformerConfig(
            src_vocab_size=src_vocab, tgt_vocab_size=tgt_vocab, d_model=d_model, n_heads=facts.n_heads,
            n_encoder_layers=_count_layers(theirs, f"{p}encoder.layers."),
            n_decoder_layers=_count_layers(theirs, f"{p}decoder.layers."),
            d_ff=theirs[f"{p}encoder.layers.0.linear1.weight"].shape[0], dropout=0.0, activation=facts.activation,
            position=facts.positions, sinusoid="interleaved", norm=facts.norm, max_positions=max_positions,
            final_norm=f"{p}encoder.norm.weight" in theirs, scale_embeddings=facts.scale_embeddings,
            share_embeddings=facts.src_embedding == facts.tgt_embedding,
            tie_output=False, output_bias=f"{facts.generator}.bias" in theirs, layer_norm_eps=facts.layer_norm_eps,
            pad_id=facts.pad_id, bos_id=facts.bos_id, eos_id=facts.eos_id)
    except ConfigError as e:
        raise ImporterError(str(e)) from None


def import_torch_transformer(state_dict: Path | str | dict[str, Tensor], out: Path | str, facts: TorchFacts,
                             force: bool = False, log: Callable[[str], None] | None = None) -> Path:
    """A state dict of a model built on torch.nn.Transformer (embeddings, positions and an output projection
    around it, as in PyTorch's translation tutorial) -> an edgeformer checkpoint at `out`."""
    say = log or (lambda _msg: None)
    theirs = dict(state_dict) if isinstance(state_dict, dict) else read_tensors(Path(state_dict))
    config = torch_transformer_config(theirs, facts)
    if facts.positions == "sinusoidal" and facts.position_table in theirs:
        stored = _flat(theirs.pop(facts.position_table))
        expected = PositionalEncoding(config.d_model)(torch.arange(stored.shape[0]))
        if stored.shape != expected.shape or float((stored.float() - expected).abs().max()) > 1e-4:
            raise ImporterError(f"{facts.position_table} is not the sinusoid table (sin, cos interleaved); "
                                "import it as a table with positions=learned")
    p = facts.prefix
    table = {**expand(TORCH_ENCODER_TENSORS, config.n_encoder_layers, p),
             **expand(TORCH_DECODER_TENSORS, config.n_decoder_layers, p),
             **expand(modules_to_tensors(TORCH_FINAL_NORMS), prefix=p),
             "encoder.embed.tokens.weight": facts.src_embedding,
             "decoder.embed.tokens.weight": facts.tgt_embedding,
             "decoder.output_projection.weight": f"{facts.generator}.weight",
             "decoder.output_bias": f"{facts.generator}.bias",
             "encoder.embed.positions.weight": facts.position_table,  # one table serves both sides
             "decoder.embed.positions.weight": facts.position_table}
    model = Transformer(config).eval()
    place(model, table, theirs, reshape={"encoder.embed.positions.weight": _flat,
                                         "decoder.embed.positions.weight": _flat})
    say("checking against torch.nn.Transformer")
    diff = compare(model, _torch_reference(config, facts, theirs), "the nn.Transformer model")
    say(f"max |logit difference| to nn.Transformer: {diff:.2e}")
    return save_checkpoint(model, Path(out), force=force)


def _flat(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


def _torch_reference(config: TransformerConfig, facts: TorchFacts,
                     theirs: dict[str, Tensor]) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """The tutorial's forward pass on a real nn.Transformer loaded with the original tensors, to check ours by.

    It is built from the same facts, so it proves the weight mapping, not the facts: a state dict cannot tell
    whether the model was trained post-norm or pre-norm, and both import cleanly. Say them right."""
    reference = nn.Transformer(config.d_model, config.n_heads, config.n_encoder_layers, config.n_decoder_layers,
                               config.d_ff, dropout=0.0, activation=config.activation, batch_first=True,
                               norm_first=config.norm == "pre", layer_norm_eps=config.layer_norm_eps).eval()
    p = facts.prefix
    reference.load_state_dict({k[len(p):]: v for k, v in theirs.items() if k.startswith(p)}, strict=True)
    scale = math.sqrt(config.d_model) if config.scale_embeddings else 1.0
    src_emb, tgt_emb = theirs[facts.src_embedding], theirs.get(facts.tgt_embedding, theirs[facts.src_embedding])
    weight, bias = theirs[f"{facts.generator}.weight"], theirs.get(f"{facts.generator}.bias")

    def positions(n: int) -> Tensor:
        if config.position == "learned":
            return _flat(theirs[facts.position_table])[:n]
        pe = torch.zeros(n, config.d_model)  # the tutorial's construction, independent of ours
        pos = torch.arange(n, dtype=torch.float32)[:, None]
        den = torch.exp(-torch.arange(0, config.d_model, 2, dtype=torch.float32) * math.log(10000) / config.d_model)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * den), torch.cos(pos * den)
        return pe

    def run(src: Tensor, src_mask: Tensor, tgt: Tensor, tgt_mask: Tensor) -> Tensor:
        s = src_emb[src] * scale + positions(src.shape[1])
        t = tgt_emb[tgt] * scale + positions(tgt.shape[1])
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        pad = src_mask == 0
        h = reference(s, t, tgt_mask=causal, src_key_padding_mask=pad, memory_key_padding_mask=pad,
                      tgt_is_causal=True)
        return h @ weight.t() + (bias if bias is not None else 0.0)

    return run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="STATE_DICT", help=".pt/.pth (read with weights_only=True) or .safetensors")
    parser.add_argument("--heads", type=int, required=True, help="nhead: the state dict cannot tell it")
    parser.add_argument("--norm", choices=["post", "pre"], default="post", help="pre for norm_first=True")
    parser.add_argument("--activation", choices=["relu", "gelu"], default="relu")
    parser.add_argument("--positions", choices=["sinusoidal", "learned"], default="sinusoidal",
                        help="learned: import --position-table as a table")
    parser.add_argument("--no-scale-embeddings", action="store_true", help="embeddings are not multiplied by sqrt(d)")
    parser.add_argument("--layer-norm-eps", type=float, default=TorchFacts.layer_norm_eps)
    parser.add_argument("--prefix", default=TorchFacts.prefix, help="where nn.Transformer sits in the state dict")
    parser.add_argument("--src-embedding", default=TorchFacts.src_embedding)
    parser.add_argument("--tgt-embedding", default=TorchFacts.tgt_embedding, help="= --src-embedding if shared")
    parser.add_argument("--generator", default=TorchFacts.generator, help="the output Linear (weight, and bias if any)")
    parser.add_argument("--position-table", default=TorchFacts.position_table)
    parser.add_argument("--pad-id", type=int, default=TorchFacts.pad_id)
    parser.add_argument("--bos-id", type=int, default=TorchFacts.bos_id)
    parser.add_argument("--eos-id", type=int, default=TorchFacts.eos_id)


def run(args: argparse.Namespace, out: Path, force: bool, log: Callable[[str], None] | None) -> Path:
    given = {f.name: getattr(args, f.name) for f in fields(TorchFacts) if hasattr(args, f.name)}
    facts = TorchFacts(**{**given, "n_heads": args.heads, "scale_embeddings": not args.no_scale_embeddings})
    return import_torch_transformer(Path(args.source), out, facts, force=force, log=log)
