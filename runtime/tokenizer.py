"""Tokenizers, described by `tokenizer.json` beside a checkpoint and inside a bundle.

Two kinds: `char` (the built-in tasks; pure Python) and `marian` (SentencePiece models plus a vocabulary, as
Hugging Face's MarianTokenizer reads them; needs the `sentencepiece` package, no torch, no transformers).
The runtime, the model and the exporter read the same files the same way through `load_tokenizer`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

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
            if i >= len(SPECIALS):
                out.append(self.chars[i - len(SPECIALS)])
            elif i == UNK_ID:
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

    def to_dict(self) -> dict[str, object]:
        return {"kind": "char", "specials": list(SPECIALS), "source": self.source.chars,
                "target": self.target.chars}

    def save(self, folder: Path) -> None:
        (Path(folder) / TOKENIZER_FILE).write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n")

    @classmethod
    def from_dict(cls, folder: Path, d: dict[str, Any]) -> CharTokenizer:
        if d.get("specials") != list(SPECIALS):
            raise ValueError(f"{Path(folder) / TOKENIZER_FILE}: special tokens {d.get('specials')} are not "
                             f"{list(SPECIALS)}")
        return cls(CharVocab(d["source"]), CharVocab(d["target"]))


class Tokenizer(Protocol):
    files: ClassVar[tuple[str, ...]]  # every file it needs, all in one folder, TOKENIZER_FILE first

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def save(self, folder: Path) -> None: ...


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
        self.source = sentencepiece.SentencePieceProcessor(model_file=str(folder / MARIAN_FILES["source_spm"]))
        self.target = sentencepiece.SentencePieceProcessor(model_file=str(folder / MARIAN_FILES["target_spm"]))
        missing = [t for t in (eos, unk, pad) if t not in vocab]
        if missing:
            raise ValueError(f"{folder / MARIAN_FILES['vocab']}: the vocabulary lacks the special tokens {missing}")
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
        pieces = [self.pieces.get(int(i)) or spm.id_to_piece(int(i)) for i in ids if int(i) not in self.special_ids]
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
        vocab_path = Path(folder) / MARIAN_FILES["vocab"]
        try:
            vocab = json.loads(vocab_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{vocab_path}: cannot read the vocabulary ({e})") from None
        return cls(folder, vocab, eos=d["eos"], unk=d["unk"], pad=d["pad"], decode_with=d["decode_with"])


KINDS: dict[str, type[CharTokenizer] | type[MarianTokenizer]] = {"char": CharTokenizer, "marian": MarianTokenizer}


def _described(folder: Path) -> tuple[type[CharTokenizer] | type[MarianTokenizer], dict[str, Any]] | None:
    """The tokenizer kind in `folder` and its tokenizer.json, or None without one."""
    path = Path(folder) / TOKENIZER_FILE
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the tokenizer ({e})") from None
    if d.get("kind") not in KINDS:
        raise ValueError(f"{path}: unsupported tokenizer kind {d.get('kind')!r}; this version reads "
                         f"{', '.join(KINDS)}")
    return KINDS[d["kind"]], d


def tokenizer_files(folder: Path) -> tuple[str, ...]:
    """The files of the tokenizer in `folder` (none without tokenizer.json), read without loading it."""
    described = _described(folder)
    return described[0].files if described else ()


def load_tokenizer(folder: Path) -> Tokenizer | None:
    """The tokenizer a checkpoint or bundle folder carries, or None when it has no tokenizer.json."""
    described = _described(folder)
    return described[0].from_dict(Path(folder), described[1]) if described else None
