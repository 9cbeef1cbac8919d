"""A word vocabulary built from the training captions (the tokenisation of VSE++ and SCAN)."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

#: lower-cased words, and each punctuation mark as its own token
TOKEN = re.compile(r"\w+|[^\w\s]")
SPECIALS = ("<pad>", "<unk>", "<start>", "<end>")
PAD, UNK, START, END = range(len(SPECIALS))


def words(text: str) -> list[str]:
    return TOKEN.findall(text.lower())


class Vocabulary:
    """Words by id: the specials first, then words by frequency (ties alphabetical, so the
    same captions always give the same vocabulary)."""

    def __init__(self, itos: Sequence[str]) -> None:
        if tuple(itos[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary starts with {SPECIALS}, got {list(itos[:4])}")
        self.itos = list(itos)
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def build(cls, texts: Iterable[str], size: int, min_count: int = 1) -> Vocabulary:
        counts = Counter(w for text in texts for w in words(text))
        kept = sorted((w for w, c in counts.items() if c >= min_count),
                      key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *kept[: size - len(SPECIALS)]])

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str, max_length: int) -> list[int]:
        """``<start> w1 ... wn <end>``, words cut so the whole fits ``max_length``."""
        ids = [self.stoi.get(w, UNK) for w in words(text)][: max_length - 2]
        return [START, *ids, END]

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"words": self.itos}, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        return cls(json.loads(path.read_text(encoding="utf-8"))["words"])
