"""Importers: weights that users already have -> an edgeformer checkpoint (config.json + model.safetensors).

Each importer is two things, as in CTranslate2's converters: a translation of the other tool's settings into a
`TransformerConfig`, which refuses by name every setting it cannot express, and a flat table from our tensor names
to theirs. Every tensor of ours must be found and every tensor of theirs must be placed (or be a checked copy of
one that was); otherwise the import stops with the whole list. Before anything is written, the imported model is
run against the original (Hugging Face's MarianMTModel, or torch.nn.Transformer) and must agree to 1e-4.

No pickle is ever executed: safetensors files are read directly; PyTorch `.pt`/`.bin` files only through
`torch.load(weights_only=True)`, whose loader accepts tensors and plain containers and nothing else.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from edgeformer.model.checkpoint import save_checkpoint
from edgeformer.model.config import ConfigError, TransformerConfig
from edgeformer.model.transformer import PositionalEncoding, Transformer
from edgeformer.runtime.options import GenerationConfig
from edgeformer.runtime.tokenizer import MARIAN_FILES, MarianTokenizer

TOLERANCE = 1e-4  # max |logit difference| between the imported model and the original


class ImporterError(ValueError):
    """A model that cannot be imported faithfully; the message lists every reason."""


@dataclass(frozen=True)
class Part:
    """One of `parts` equal slices along the first axis: q, k, v of a packed in_proj_weight."""

    name: str
    index: int
    parts: int = 3


Source = str | Part


# -- the tables: our name -> theirs; {i} is a layer, {p} a prefix; a module entry maps its weight and its bias ----

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


def modules_to_tensors(table: dict[str, str]) -> dict[str, Source]:
    return {f"{ours}.{kind}": f"{theirs}.{kind}" for ours, theirs in table.items() for kind in ("weight", "bias")}


def packed_qkv(side: str, ours: str, theirs: str) -> dict[str, Source]:
    """nn.MultiheadAttention packs q, k and v into one in_proj tensor: ours are its thirds."""
    return {f"{side}.layers.{{i}}.{ours}.{proj}_proj.{kind}":
            Part(f"{{p}}{side}.layers.{{i}}.{theirs}.in_proj_{kind}", index)
            for index, proj in enumerate("qkv") for kind in ("weight", "bias")}


TORCH_ENCODER_TENSORS = {**modules_to_tensors(TORCH_ENCODER_LAYER), **packed_qkv("encoder", "self_attn", "self_attn")}
TORCH_DECODER_TENSORS = {**modules_to_tensors(TORCH_DECODER_LAYER), **packed_qkv("decoder", "self_attn", "self_attn"),
                         **packed_qkv("decoder", "cross_attn", "multihead_attn")}


def expand(table: dict[str, Source], layers: int = 1, prefix: str = "") -> dict[str, Source]:
    """The table with {i} filled in for each of `layers` layers and {p} with `prefix`."""
    def fill(source: Source, i: int) -> Source:
        if isinstance(source, Part):
            return Part(source.name.format(i=i, p=prefix), source.index, source.parts)
        return source.format(i=i, p=prefix)

    return {ours.format(i=i): fill(theirs, i) for ours, theirs in table.items() for i in range(layers)}


def _raise_if(problems: list[str], headline: str) -> None:
    if problems:
        raise ImporterError(f"{headline}:\n  " + "\n  ".join(problems))


def place(model: Transformer, table: dict[str, Source], theirs: dict[str, Tensor],
          reshape: Mapping[str, Callable[[Tensor], Tensor]] | None = None) -> None:
    """Fill every parameter of `model` from `theirs` through `table`; collect every problem before raising."""
    problems, used = [], set()
    params = dict(model.named_parameters())
    for ours, p in params.items():
        source = table.get(ours)
        if source is None:
            problems.append(f"edgeformer has no rule for its tensor {ours} (an importer bug: please report it)")
            continue
        name = source.name if isinstance(source, Part) else source
        if name not in theirs:
            problems.append(f"missing tensor {name} (needed for {ours} {tuple(p.shape)})")
            continue
        t = theirs[name]
        if isinstance(source, Part):
            if t.shape[0] % source.parts:
                problems.append(f"tensor {name} {tuple(t.shape)} does not split into {source.parts} parts")
                continue
            t = t.chunk(source.parts, dim=0)[source.index]
        if reshape and ours in reshape:
            t = reshape[ours](t)
        if t.shape != p.shape:
            problems.append(f"tensor {name} has shape {tuple(t.shape)}, {ours} needs {tuple(p.shape)}")
            continue
        with torch.no_grad():
            p.copy_(t.float())
        used.add(name)
    left = sorted(set(theirs) - used)
    problems += [f"unexpected tensor {n} {tuple(theirs[n].shape)}: the config has no place for it" for n in left]
    _raise_if(problems, "cannot import these weights")


def _refuse(problems: list[str], what: str) -> None:
    _raise_if(problems, f"{what} uses options edgeformer cannot express faithfully")


def read_tensors(path: Path) -> dict[str, Tensor]:
    """A safetensors file, a sharded safetensors index, or a PyTorch state dict read with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise ImporterError(f"{path}: no such file")
    if path.name.endswith(".index.json"):
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in read_tensors(path.parent / shard).items()}
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ImporterError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... for files it will not read safely
        raise ImporterError(f"{path}: not a plain state dict that can be read safely (weights_only=True): "
                            f"{str(e).splitlines()[0]}. Save `model.state_dict()` (torch.save) or a safetensors "
                            "file instead of the whole module") from None
    for key in ("state_dict", "model_state_dict", "model"):  # training scripts often wrap the state dict
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        raise ImporterError(f"{path}: holds no tensors by name; save `model.state_dict()`")
    return tensors


def _compare(model: Transformer, reference: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor], what: str) -> float:
    """Both models on the same padded batch; the max |logit difference| over the real (unpadded) positions."""
    config = model.config
    g = torch.Generator().manual_seed(0)
    low = 0 if config.pad_id != 0 else 1
    src = torch.randint(low, config.src_vocab_size, (4, 11), generator=g)
    tgt = torch.randint(low, config.tgt_vocab_size, (4, 7), generator=g)
    src[src == config.pad_id] = (config.pad_id + 1) % config.src_vocab_size
    tgt[tgt == config.pad_id] = (config.pad_id + 1) % config.tgt_vocab_size
    src_mask, tgt_mask = torch.ones_like(src), torch.ones_like(tgt)
    src_mask[1, 7:], src_mask[3, 3:], tgt_mask[2, 4:] = 0, 0, 0  # right padding of different lengths
    src = src.masked_fill(src_mask == 0, config.pad_id)
    tgt = tgt.masked_fill(tgt_mask == 0, config.pad_id)
    with torch.no_grad():
        a, b = model(src, tgt, src_mask), reference(src, src_mask, tgt, tgt_mask)
    diff = float((a - b).abs()[tgt_mask.bool()].max())
    scale = max(1.0, float(b.abs().max()))
    if not diff <= TOLERANCE * scale:
        raise ImporterError(f"the imported model does not reproduce {what}: max |logit difference| {diff:.2e} "
                            f"> {TOLERANCE * scale:.1e}; nothing was written")
    return diff


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
    _refuse(problems, "this Marian config")
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


# Hugging Face generation settings and what they become here; those without a rule are refused by name.
HF_GENERATION_DEFAULTS: dict[str, Any] = {"num_beams": 1, "max_length": None, "min_length": 0, "do_sample": False,
                          "early_stopping": False, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
                          "repetition_penalty": 1.0, "num_return_sequences": 1, "temperature": 1.0, "top_k": 50,
                          "top_p": 1.0, "bad_words_ids": None, "forced_eos_token_id": None,
                          "forced_bos_token_id": None, "max_new_tokens": None, "encoder_no_repeat_ngram_size": 0,
                          "diversity_penalty": 0.0, "num_beam_groups": 1, "suppress_tokens": None,
                          "begin_suppress_tokens": None, "renormalize_logits": False}
HF_GENERATION_IGNORED = {"bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "use_cache",
                         "transformers_version", "_from_model_config", "output_attentions", "output_hidden_states",
                         "output_scores", "return_dict_in_generate"}


def marian_generation(hf: dict[str, Any], eos_id: int) -> GenerationConfig:
    """Hugging Face's generation settings for this model, so that `generate` with the bundle's defaults does what
    `MarianMTModel.generate()` does."""
    s = {k: hf.get(k, v) for k, v in HF_GENERATION_DEFAULTS.items()}
    problems = [f"{k}={s[k]!r}" for k in ("no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
                                          "repetition_penalty", "diversity_penalty", "num_beam_groups",
                                          "forced_bos_token_id", "begin_suppress_tokens", "renormalize_logits")
                if s[k] != HF_GENERATION_DEFAULTS[k]]
    suppress = [int(t) for t in s["suppress_tokens"] or []]
    for words in s["bad_words_ids"] or []:
        if len(words) == 1:
            suppress.append(int(words[0]))
        else:
            problems.append(f"bad_words_ids entry {words} (only single tokens are supported)")
    if s["forced_eos_token_id"] not in (None, eos_id):
        problems.append(f"forced_eos_token_id={s['forced_eos_token_id']} is not the EOS id {eos_id}")
    if s["early_stopping"] not in (True, False):
        problems.append(f"early_stopping={s['early_stopping']!r}")
    _refuse(problems, "the generation settings")
    # max_length counts the decoder start token; unset, Hugging Face generates 20 new tokens.
    max_new = s["max_new_tokens"] or (s["max_length"] - 1 if s["max_length"] else 20)
    sample = bool(s["do_sample"])
    return GenerationConfig(strategy="sample" if sample else "beam" if s["num_beams"] > 1 else "greedy",
                            max_new_tokens=max_new, min_new_tokens=max(0, min(s["min_length"] - 1, max_new)),
                            num_beams=s["num_beams"], length_penalty=float(s["length_penalty"]),
                            num_return_sequences=s["num_return_sequences"], early_stopping=bool(s["early_stopping"]),
                            temperature=float(s["temperature"]), top_k=int(s["top_k"]) if sample else 0,
                            top_p=float(s["top_p"]), suppress_tokens=tuple(sorted(set(suppress))),
                            forced_eos=s["forced_eos_token_id"] is not None)


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
    try:
        hf = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise ImporterError(f"{folder / 'config.json'}: missing; is {folder} a Hugging Face model folder?") from None
    config = marian_config(hf)
    weights = next((folder / n for n in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
                    if (folder / n).is_file()), None)
    if weights is None:
        raise ImporterError(f"{folder}: no model.safetensors or pytorch_model.bin")
    say(f"reading {weights.name}")
    theirs = read_tensors(weights)
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
    _raise_if(problems, "cannot import these weights")
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
    try:
        from transformers import MarianMTModel
    except ImportError:
        say("transformers is not installed: skipped the check against Hugging Face (pip install edgeformer[hf])")
        return
    say("checking against Hugging Face's MarianMTModel")
    reference = MarianMTModel.from_pretrained(str(folder)).eval().float()

    def run(src: Tensor, src_mask: Tensor, tgt: Tensor, tgt_mask: Tensor) -> Tensor:
        return reference(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt).logits

    diff = _compare(model, run, "Hugging Face's MarianMTModel")
    say(f"max |logit difference| to Hugging Face: {diff:.2e}")


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
    _refuse(problems, "this nn.Transformer state dict")
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
    diff = _compare(model, _torch_reference(config, facts, theirs), "the nn.Transformer model")
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
