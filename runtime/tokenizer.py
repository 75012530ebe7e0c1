"""Character tokenizers, stored as `tokenizer.json` beside a checkpoint and inside a bundle.

Pure Python, so that the runtime, the model and the exporter read the same file the same way.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

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

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharVocab:
        return cls("".join(sorted(set("".join(texts)))))


@dataclass(frozen=True)
class CharTokenizer:
    source: CharVocab
    target: CharVocab

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.source.encode(t) for t in texts]

    def decode_batch(self, ids: Sequence[Sequence[int]]) -> list[str]:
        return [self.target.decode(i) for i in ids]

    def to_dict(self) -> dict[str, object]:
        return {"kind": "char", "specials": list(SPECIALS), "source": self.source.chars,
                "target": self.target.chars}

    def save(self, folder: Path) -> None:
        (Path(folder) / TOKENIZER_FILE).write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n")

    @classmethod
    def load(cls, folder: Path) -> CharTokenizer:
        path = Path(folder) / TOKENIZER_FILE
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read the tokenizer ({e})") from None
        if d.get("kind") != "char" or d.get("specials") != list(SPECIALS):
            raise ValueError(f"{path}: unsupported tokenizer kind {d.get('kind')!r}; this version reads 'char'")
        return cls(CharVocab(d["source"]), CharVocab(d["target"]))
