"""Tokenizers, described by `tokenizer.json` beside a checkpoint and inside a bundle.

Two kinds: `char` (the built-in tasks; pure Python) and `marian` (SentencePiece models plus a vocabulary, as
Hugging Face's MarianTokenizer reads them; needs the `sentencepiece` package, no torch, no transformers).
The runtime, the model and the exporter read the same files the same way through `load_tokenizer`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from edgeformer.runtime.errors import BundleError


def parse_ids(text: str) -> list[int]:
    """Token ids written as text: separated by spaces or commas. ValueError where one is not an integer."""
    return [int(t) for t in text.replace(",", " ").split()]


SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(len(SPECIALS))
TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class CharVocab:
    """One id per character, after the special tokens."""

    chars: str

    def __post_init__(self) -> None:
        if len(set(self.chars)) != len(self.chars):
            raise ValueError("a character vocabulary lists each character once")

    def __len__(self) -> int:
        return len(SPECIALS) + len(self.chars)

    @property
    def index(self) -> dict[str, int]:
        return {c: i + len(SPECIALS) for i, c in enumerate(self.chars)}

    def encode(self, text: str, add_eos: bool = True) -> list[int]:
        index = self.index
        ids = [index.get(c, UNK_ID) for c in text]
        return [*ids, EOS_ID] if add_eos else ids

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if len(SPECIALS) <= i < len(self):
                out.append(self.chars[i - len(SPECIALS)])
            elif i == UNK_ID or i >= len(self):  # an id the vocabulary lacks (a model larger than its tokenizer)
                out.append("\N{REPLACEMENT CHARACTER}")
        return "".join(out)


@dataclass(frozen=True)
class CharTokenizer:
    source: CharVocab
    target: CharVocab

    files: ClassVar[tuple[str, ...]] = (TOKENIZER_FILE,)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.source.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return self.target.decode(ids)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "char", "specials": list(SPECIALS), "source": self.source.chars,
                "target": self.target.chars}

    def save(self, folder: Path) -> None:
        (Path(folder) / TOKENIZER_FILE).write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n")

    @classmethod
    def from_dict(cls, folder: Path, d: dict[str, Any]) -> CharTokenizer:
        where = Path(folder) / TOKENIZER_FILE
        if d.get("specials") != list(SPECIALS):
            raise BundleError(f"{where}: special tokens {d.get('specials')} are not {list(SPECIALS)}")
        if not isinstance(d.get("source"), str) or not isinstance(d.get("target"), str):
            raise BundleError(f"{where}: source and target must be the vocabularies' characters, as text")
        try:
            return cls(CharVocab(d["source"]), CharVocab(d["target"]))
        except ValueError as e:
            raise BundleError(f"{where}: {e}") from None


class Tokenizer(Protocol):
    files: ClassVar[tuple[str, ...]]  # every file it needs, all in one folder, TOKENIZER_FILE first

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def save(self, folder: Path) -> None: ...

    def to_dict(self) -> dict[str, Any]: ...


MARIAN_FILES = {"source_spm": "source.spm", "target_spm": "target.spm", "vocab": "vocab.json"}


class MarianTokenizer:
    """What Hugging Face's MarianTokenizer does, with sentencepiece alone: source pieces -> ids through the shared
    vocabulary (unknown pieces -> <unk>), then </s>; ids -> pieces, special tokens dropped, joined by SentencePiece.

    A leading language code such as `>>fr<<` is one token, as in multilingual OPUS-MT models.
    """

    files: ClassVar[tuple[str, ...]] = (TOKENIZER_FILE, *MARIAN_FILES.values())

    def __init__(self, folder: Path, vocab: dict[str, int], eos: str = "</s>", unk: str = "<unk>",
                 pad: str = "<pad>", decode_with: str = "source") -> None:
        try:
            import sentencepiece
        except ImportError:
            raise ImportError("this tokenizer needs sentencepiece: pip install sentencepiece "
                              "(or edgeformer[hf])") from None
        folder = Path(folder)
        try:
            self.source = sentencepiece.SentencePieceProcessor(model_file=str(folder / MARIAN_FILES["source_spm"]))
            self.target = sentencepiece.SentencePieceProcessor(model_file=str(folder / MARIAN_FILES["target_spm"]))
        except (OSError, RuntimeError) as e:  # sentencepiece's own failures are RuntimeErrors
            raise BundleError(f"{folder}: cannot read the SentencePiece models ({e})") from None
        where = folder / MARIAN_FILES["vocab"]
        if not isinstance(vocab, dict) or not all(isinstance(p, str) and isinstance(i, int) and not isinstance(
                i, bool) for p, i in vocab.items()):
            raise BundleError(f"{where}: the vocabulary must map pieces to integer ids")
        missing = [t for t in (eos, unk, pad) if not isinstance(t, str) or t not in vocab]
        if missing:
            raise BundleError(f"{where}: the vocabulary lacks the special tokens {missing}")
        self.folder, self.vocab, self.eos, self.unk, self.pad = folder, vocab, eos, unk, pad
        self.pieces = {i: p for p, i in vocab.items()}
        self.special_ids = {vocab[eos], vocab[unk], vocab[pad]}
        # MarianTokenizer decodes with the source model unless the vocabularies are separate.
        self.decode_with = decode_with

    def encode(self, text: str) -> list[int]:
        code: list[str] = []
        if text.startswith(">>") and (end := text.find("<<")) != -1:
            code, text = [text[: end + 2]], text[end + 2:]
        unk = self.vocab[self.unk]
        return [self.vocab.get(p, unk) for p in code + self.source.encode(text, out_type=str)] + [self.vocab[self.eos]]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        spm = self.source if self.decode_with == "source" else self.target
        size = spm.get_piece_size()

        def piece(i: int) -> str:  # an id neither the vocabulary nor the model has: a model larger than its tokenizer
            return self.pieces.get(i) or (spm.id_to_piece(i) if 0 <= i < size else "\N{REPLACEMENT CHARACTER}")

        pieces = [piece(int(i)) for i in ids if int(i) not in self.special_ids]
        return str(spm.decode_pieces(pieces)).replace("\N{LOWER ONE EIGHTH BLOCK}", " ").strip()

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "marian", **MARIAN_FILES, "eos": self.eos, "unk": self.unk, "pad": self.pad,
                "decode_with": self.decode_with}

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        for key in ("source_spm", "target_spm"):
            name = MARIAN_FILES[key]
            if (self.folder / name).resolve() != (folder / name).resolve():
                shutil.copyfile(self.folder / name, folder / name)
        (folder / MARIAN_FILES["vocab"]).write_text(json.dumps(self.vocab, ensure_ascii=False, indent=1) + "\n")
        (folder / TOKENIZER_FILE).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, folder: Path, d: dict[str, Any]) -> MarianTokenizer:
        vocab = _read_json(Path(folder) / MARIAN_FILES["vocab"], "the vocabulary")
        if d.get("decode_with") not in ("source", "target"):
            raise BundleError(f"{Path(folder) / TOKENIZER_FILE}: decode_with must be source or target")
        return cls(folder, vocab, eos=d.get("eos", "</s>"), unk=d.get("unk", "<unk>"), pad=d.get("pad", "<pad>"),
                   decode_with=d["decode_with"])


KINDS: dict[str, type[CharTokenizer] | type[MarianTokenizer]] = {"char": CharTokenizer, "marian": MarianTokenizer}


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # unreadable, not UTF-8, not JSON, nested too deep
        raise BundleError(f"{path}: cannot read {what} ({str(e)[:200]})") from None


def _described(folder: Path, listed: Container[str] | None = None,
               ) -> tuple[type[CharTokenizer] | type[MarianTokenizer], dict[str, Any]] | None:
    """The tokenizer kind in `folder` and its tokenizer.json, or None without one. With `listed` (a bundle's
    files), a tokenizer needing a file not among them is refused before anything is read."""
    path = Path(folder) / TOKENIZER_FILE
    if listed is not None and TOKENIZER_FILE not in listed:
        raise BundleError(f"{path}: not among the bundle's listed files")
    if not path.is_file():
        return None
    d = _read_json(path, "the tokenizer")
    if not isinstance(d, dict) or d.get("kind") not in KINDS:
        kind = d.get("kind") if isinstance(d, dict) else None
        raise BundleError(f"{path}: unsupported tokenizer kind {kind!r}; this version reads {', '.join(KINDS)}")
    kind = KINDS[d["kind"]]
    unlisted = [f for f in kind.files if listed is not None and f not in listed]
    if unlisted:
        raise BundleError(f"{path}: a {d['kind']} tokenizer reads {', '.join(unlisted)}, which the bundle does not "
                          "list; they are not read")
    return kind, d


def tokenizer_files(folder: Path, listed: Container[str] | None = None) -> tuple[str, ...]:
    """The files of the tokenizer in `folder` (none without tokenizer.json), read without loading it."""
    described = _described(folder, listed)
    return described[0].files if described else ()


def load_tokenizer(folder: Path, listed: Container[str] | None = None) -> Tokenizer | None:
    """The tokenizer a checkpoint or bundle folder carries, or None when it has no tokenizer.json. `listed`: the
    files a bundle's manifest lists and checked; the tokenizer reads none but them."""
    described = _described(folder, listed)
    return described[0].from_dict(Path(folder), described[1]) if described else None
