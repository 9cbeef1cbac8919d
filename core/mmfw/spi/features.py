"""A locked tower's outputs by input: what ``[model.lock_text]`` looks captions up in."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import MmfwError


class FeatureTable:
    """The outputs of a locked (frozen, eval-mode) tower for the inputs it has seen, by input.

    A key is the row's token ids (and other per-token tensors) where its attention mask is
    set, so the same caption padded to different lengths is one entry. Rows not in the table
    are computed by the tower (without gradients: it is locked) and not added, so what a step
    sees never depends on which captions earlier steps met (a resumed run is the unbroken one).
    """

    def __init__(self, keys: list[bytes], features: Tensor) -> None:
        self.index = {k: i for i, k in enumerate(keys)}
        self.values = features

    def __len__(self) -> int:
        return len(self.index)

    @staticmethod
    def keys(tokens: dict[str, Tensor]) -> list[bytes] | None:
        """One key per row, or None when the tokens carry no attention mask to trim by."""
        mask = tokens.get("attention_mask")
        if mask is None:
            return None
        mask = mask.bool().cpu()
        parts = [t.cpu() for k, t in sorted(tokens.items())
                 if k != "attention_mask" and t.shape == mask.shape]
        return [b"".join(p[i][mask[i]].numpy().tobytes() for p in parts)
                for i in range(mask.shape[0])]

    def features(self, tower: nn.Module, tokens: dict[str, Tensor]) -> Tensor:
        """The tower's output rows for ``tokens``: from the table where known."""
        if any(p.requires_grad for p in tower.parameters()):
            raise MmfwError("[model.lock_text]: the text tower has trainable parameters again "
                            "(a stage plan unfroze it?); a locked tower stays frozen")
        keys = self.keys(tokens)
        rows = None if keys is None else [self.index.get(k) for k in keys]
        if rows is None or None in rows:
            missing = list(range(len(rows))) if rows is None else \
                [i for i, r in enumerate(rows) if r is None]
            with torch.no_grad():
                computed = tower({k: v[missing] for k, v in tokens.items()})
            if rows is None or len(missing) == len(rows):
                return computed
            out = self.values.new_empty((len(rows), *self.values.shape[1:]))
            known = [i for i, r in enumerate(rows) if r is not None]
            out[known] = self.values[[rows[i] for i in known]].to(out.device)
            out[missing] = computed.to(out.dtype)
            return out
        return self.values[rows].to(tokens["attention_mask"].device)
