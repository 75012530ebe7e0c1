"""What every importer shares: tables from our tensor names to theirs, placing tensors, reading weight files
without running pickled code, and the check against the original model.

Importers turn weights that users already have into an edgeformer checkpoint (config.json + model.safetensors).

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from edgeformer.model.transformer import Transformer

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

def modules_to_tensors(table: dict[str, str]) -> dict[str, Source]:
    return {f"{ours}.{kind}": f"{theirs}.{kind}" for ours, theirs in table.items() for kind in ("weight", "bias")}


def packed_qkv(side: str, ours: str, theirs: str) -> dict[str, Source]:
    """nn.MultiheadAttention packs q, k and v into one in_proj tensor: ours are its thirds."""
    return {f"{side}.layers.{{i}}.{ours}.{proj}_proj.{kind}":
            Part(f"{{p}}{side}.layers.{{i}}.{theirs}.in_proj_{kind}", index)
            for index, proj in enumerate("qkv") for kind in ("weight", "bias")}


def expand(table: dict[str, Source], layers: int = 1, prefix: str = "") -> dict[str, Source]:
    """The table with {i} filled in for each of `layers` layers and {p} with `prefix`."""
    def fill(source: Source, i: int) -> Source:
        if isinstance(source, Part):
            return Part(source.name.format(i=i, p=prefix), source.index, source.parts)
        return source.format(i=i, p=prefix)

    return {ours.format(i=i): fill(theirs, i) for ours, theirs in table.items() for i in range(layers)}


def raise_if(problems: list[str], headline: str) -> None:
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
    raise_if(problems, "cannot import these weights")


def refuse(problems: list[str], what: str) -> None:
    raise_if(problems, f"{what} uses options edgeformer cannot express faithfully")


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")  # Hugging Face's, by choice


def hf_config(folder: Path) -> dict[str, Any]:
    """A Hugging Face model folder's config.json."""
    try:
        return dict(json.loads((folder / "config.json").read_text()))
    except FileNotFoundError:
        raise ImporterError(f"{folder / 'config.json'}: missing; is {folder} a Hugging Face model folder?") from None


def hf_tensors(folder: Path, say: Callable[[str], None]) -> dict[str, Tensor]:
    """A Hugging Face model folder's weights, from the first of WEIGHT_FILES it holds."""
    weights = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if weights is None:
        raise ImporterError(f"{folder}: no model.safetensors or pytorch_model.bin")
    say(f"reading {weights.name}")
    return read_tensors(weights)


def hf_reference(model_class: str, folder: Path, say: Callable[[str], None], **kwargs: Any) -> Any:
    """transformers' `model_class` loaded from `folder`, in float32 and eval mode, to check an import against; None,
    said, where transformers is not installed."""
    try:
        import transformers
    except ImportError:
        say("transformers is not installed: skipped the check against Hugging Face (pip install edgeformer[hf])")
        return None
    say(f"checking against Hugging Face's {model_class}")
    return getattr(transformers, model_class).from_pretrained(str(folder), **kwargs).eval().float()


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


def compare(model: Transformer, reference: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor], what: str) -> float:
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
