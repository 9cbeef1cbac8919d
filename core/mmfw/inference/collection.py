"""Saved embeddings (``mmfw embed``) and exact top-k search over them (``mmfw search``).

A collection is ``N`` L2-normalised embeddings with an integer id and a label (a path or a
caption, ``""`` where none is known) per row, written one of two ways:

- ``.safetensors``: tensors ``embeddings`` (float32 ``[N, D]``) and ``ids`` (int64 ``[N]``);
  metadata ``modality``, ``run``, ``embed_dim`` and ``labels`` (a JSON list of strings);
- ``.npy``: the embeddings (float32 ``[N, D]``) and beside it ``<name>.ids.json`` holding
  ``ids``, ``labels``, ``modality``, ``run`` and ``embed_dim``.

Search is one matrix product and ``topk`` (exact); with faiss installed and more than
``faiss_above`` rows it is faiss's exact inner-product index (``IndexFlatIP``), which is
faster on very large collections and gives the same ranking.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

import attrs
import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..spi.errors import DataError, MmfwError

#: rows above which search uses faiss (when installed); below it a matmul is as fast
FAISS_ABOVE = 200_000
SUFFIXES = (".safetensors", ".npy")


@attrs.frozen
class Collection:
    """Embeddings ``[N, D]`` (float32, unit rows), their ``ids`` ``[N]`` (int64), a label per
    row, the modality they were made from and the run that made them."""

    embeddings: Tensor
    ids: Tensor
    labels: tuple[str, ...]
    modality: str
    run: str

    def __attrs_post_init__(self) -> None:
        n = self.embeddings.shape[0]
        if self.embeddings.ndim != 2 or self.ids.shape != (n,) or len(self.labels) != n:
            raise MmfwError(f"a collection needs embeddings [N, D], ids [N] and N labels; got "
                            f"{tuple(self.embeddings.shape)}, {tuple(self.ids.shape)}, "
                            f"{len(self.labels)}")

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def embed_dim(self) -> int:
        return int(self.embeddings.shape[1])

    def save(self, path: str | Path) -> Path:
        """Write to ``path`` (``.safetensors`` or ``.npy``, see the module docs)."""
        p = Path(path).expanduser()
        if p.suffix not in SUFFIXES:
            raise MmfwError(f"{p}: a collection is written as {' or '.join(SUFFIXES)}")
        p.parent.mkdir(parents=True, exist_ok=True)
        meta = {"modality": self.modality, "run": self.run, "embed_dim": str(self.embed_dim)}
        emb = self.embeddings.float().contiguous()
        if p.suffix == ".safetensors":
            save_file({"embeddings": emb, "ids": self.ids.long().contiguous()}, str(p),
                      metadata={**meta, "labels": json.dumps(list(self.labels))})
        else:
            np.save(p, emb.numpy())
            sidecar(p).write_text(json.dumps({**meta, "embed_dim": self.embed_dim,
                                              "ids": self.ids.tolist(),
                                              "labels": list(self.labels)}), encoding="utf-8")
        return p

    @classmethod
    def load(cls, path: str | Path) -> Collection:
        """Read a collection; a missing, damaged or inconsistent file is a DataError naming
        it."""
        p = Path(path).expanduser()
        if not p.is_file():
            raise DataError(f"collection {p} does not exist")
        if p.suffix not in SUFFIXES:
            raise DataError(f"{p} is not a collection: expected a {' or '.join(SUFFIXES)} "
                            "file written by `mmfw embed`")
        try:
            if p.suffix == ".safetensors":
                with safe_open(str(p), framework="pt") as f:
                    meta = f.metadata() or {}
                    names = set(f.keys())
                    if not {"embeddings", "ids"} <= names:
                        raise ValueError(f"it holds {sorted(names)}, not 'embeddings' and 'ids'")
                    emb, ids = f.get_tensor("embeddings"), f.get_tensor("ids")
                labels = json.loads(meta.get("labels", "null")) or [""] * len(ids)
            else:
                emb = torch.from_numpy(np.load(p, allow_pickle=False))
                side = sidecar(p)
                if not side.is_file():
                    raise ValueError(f"its ids file {side} is missing")
                meta = json.loads(side.read_text(encoding="utf-8"))
                ids, labels = torch.tensor(meta["ids"], dtype=torch.long), meta["labels"]
            return cls(emb.float(), ids.long(), tuple(str(s) for s in labels),
                       str(meta.get("modality", "")), str(meta.get("run", "")))
        except (OSError, ValueError, KeyError, TypeError, SafetensorError, MmfwError) as err:
            raise DataError(f"collection {p} is damaged or not a collection: {err}") from None


def sidecar(path: Path) -> Path:
    """Where the ids of a ``.npy`` collection live: ``name.npy`` -> ``name.ids.json``."""
    return path.with_suffix(".ids.json")


def top_k(index: Tensor, queries: Tensor, k: int, faiss_above: int = FAISS_ABOVE
          ) -> tuple[Tensor, Tensor]:
    """Scores and rows ``[Q, min(k, N)]`` of the ``index`` rows with the largest inner
    product with each query, best first (exact either way)."""
    if k < 1:
        raise MmfwError(f"k must be at least 1, not {k}")
    k = min(k, index.shape[0])
    if index.shape[0] > faiss_above and importlib.util.find_spec("faiss") is not None:
        import faiss

        flat = faiss.IndexFlatIP(index.shape[1])
        flat.add(np.ascontiguousarray(index.float().numpy()))
        scores, rows = flat.search(np.ascontiguousarray(queries.float().numpy()), k)
        return torch.from_numpy(scores), torch.from_numpy(rows).long()
    scores, rows = (queries.float() @ index.float().T).topk(k, dim=1)
    return scores, rows


def make_collection(embeddings: Tensor, ids: Sequence[int], labels: Sequence[str],
                    modality: str, run: str) -> Collection:
    return Collection(embeddings.float(), torch.tensor(list(ids), dtype=torch.long),
                      tuple(labels), modality, run)


__all__ = ["FAISS_ABOVE", "Collection", "make_collection", "sidecar", "top_k"]
