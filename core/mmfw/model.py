"""The dual encoder: two encoders and their adapters into one embedding space."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config.recipe import ModelConfig
from .registry import create
from .spi.capabilities import check
from .spi.contracts import asset_dir
from .spi.features import FeatureTable


class DualEncoder(nn.Module):
    """``encode_image`` / ``encode_text`` give raw (unnormalised) ``[B, embed_dim]`` embeddings.

    Normalising is left to the loss and to evaluation (cosine similarity), as the loss contract
    says, so a loss that needs norms (VICReg) still sees them.
    """

    def __init__(self, vision: nn.Module, text: nn.Module, vision_adapter: nn.Module,
                 text_adapter: nn.Module, fusion: nn.Module | None = None) -> None:
        super().__init__()
        self.vision, self.text = vision, text
        self.vision_adapter, self.text_adapter = vision_adapter, text_adapter
        #: ``[model.fusion]``: an image–text matching head over token features, or None
        self.fusion = fusion
        #: a locked text tower's outputs for known captions (``[model.lock_text]``), or None
        self.text_table: FeatureTable | None = None

    def train(self, mode: bool = True) -> DualEncoder:
        super().train(mode)
        if self.text_table is not None:  # a locked tower is deterministic: its table's
            self.text.eval()              # outputs are what it gives for a new caption
        return self

    @property
    def embed_dim(self) -> int:
        return int(self.vision_adapter.out_dim)

    def prepare_pixels(self, pixels: Tensor) -> Tensor:
        """Float pixels for the vision encoder: a uint8 batch from the loader (``data.uint8``)
        is normalised by the encoder's ``normalize`` where it now lies (the device)."""
        if pixels.dtype == torch.uint8:
            return self.vision.normalize(pixels)
        return pixels

    def encode_image(self, pixels: Tensor) -> Tensor:
        return self.vision_adapter(self.vision(pixels))

    def encode_text(self, tokens: dict[str, Tensor]) -> Tensor:
        if self.text_table is not None:
            return self.text_adapter(self.text_table.features(self.text, tokens))
        return self.text_adapter(self.text(tokens))

    def forward(self, pixels: Tensor, tokens: dict[str, Tensor], with_tokens: bool = False
                ) -> tuple[Tensor, ...]:
        """``(image, text)`` embeddings; ``with_tokens`` adds each side's token features and
        masks from the same pass: ``(image, text, image_tokens, image_mask, text_tokens,
        text_mask)`` (what the fusion head needs while training)."""
        if not with_tokens:
            return self.encode_image(pixels), self.encode_text(tokens)
        img, vt, vm = _embed_with_tokens(self.vision, self.vision_adapter, pixels)
        txt, tt, tm = _embed_with_tokens(self.text, self.text_adapter, tokens)
        return img, txt, vt, vm, tt, tm

    def encode_image_tokens(self, pixels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(embedding [B, D], tokens [B, L, w], mask [B, L])`` of images in one pass."""
        return _embed_with_tokens(self.vision, self.vision_adapter, pixels)

    def encode_text_tokens(self, tokens: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        return _embed_with_tokens(self.text, self.text_adapter, tokens)

    def match_scores(self, image: Tensor | tuple[Tensor, Tensor],
                     text: dict[str, Tensor] | tuple[Tensor, Tensor],
                     pairs: tuple[Tensor, Tensor]) -> Tensor:
        """ITM logits ``[P]`` of pairs ``(image_rows, text_rows)``.

        ``image`` is pixels or ``(tokens, mask)``; ``text`` a tokenizer's dict or
        ``(tokens, mask)``. Raw inputs are encoded here (one pass per call).
        """
        if self.fusion is None:
            from .spi.errors import MmfwError

            raise MmfwError("this model has no fusion head: add [model.fusion] with "
                            'name = "cross-attention" to the recipe')
        if not isinstance(image, tuple):
            image = self.encode_image_tokens(image)[1:]
        if not isinstance(text, tuple):
            text = self.encode_text_tokens(text)[1:]
        (vt, vm), (tt, tm), (ri, rt) = image, text, pairs
        return self.fusion(vt[ri], vm[ri], tt[rt], tm[rt])

    # encoders' own files (tokenizers) ---------------------------------------------------------
    def save_assets(self, run_dir: Path) -> None:
        for enc in (self.vision, self.text):
            if callable(getattr(enc, "save_assets", None)):
                enc.save_assets(asset_dir(run_dir, enc.modality))

    def load_assets(self, run_dir: Path) -> None:
        for enc in (self.vision, self.text):
            if callable(getattr(enc, "load_assets", None)):
                enc.load_assets(asset_dir(run_dir, enc.modality))


def build_model(cfg: ModelConfig) -> DualEncoder:
    """Create encoders and adapters from a recipe's [model] section."""
    vision = _encoder(cfg.vision.name, cfg.vision.options, "image")
    text = _encoder(cfg.text.name, cfg.text.options, "text")
    adapters = [
        create("adapter", cfg.adapter.name, options=cfg.adapter.options, in_dim=enc.dim,
               out_dim=cfg.embed_dim)
        for enc in (vision, text)
    ]
    fusion = getattr(cfg, "fusion", None)
    if fusion is None:
        return DualEncoder(vision, text, *adapters)
    for enc, section in ((vision, "model.vision"), (text, "model.text")):
        if not callable(getattr(enc, "forward_tokens", None)):
            from .spi.errors import RecipeError

            raise RecipeError(f"[model.fusion] needs token features, but encoder "
                              f"'{type(enc).__name__}' has no forward_tokens()",
                              key=f"{section}.name", expected="an encoder with forward_tokens "
                              "(scratch-*, hf-*, timm-vision)")
    head = create("adapter", fusion.name, options=fusion.options, in_dim=_token_dim(text),
                  out_dim=cfg.embed_dim, other_dim=_token_dim(vision))
    return DualEncoder(vision, text, *adapters, fusion=head)


def _token_dim(enc: nn.Module) -> int:
    return int(getattr(enc, "token_dim", enc.dim))


def _embed_with_tokens(enc: nn.Module, adapter: nn.Module, x: Any
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """Adapted embedding, tokens and mask; one encoder pass where it has ``pool_tokens``."""
    tokens, mask = enc.forward_tokens(x)
    pool = getattr(enc, "pool_tokens", None)
    pooled = pool(tokens, mask) if callable(pool) else enc(x)
    return adapter(pooled), tokens, mask


def fusion_of(model: nn.Module) -> nn.Module | None:
    """The fusion head of a DualEncoder (or of one wrapped by DDP), None without one."""
    return getattr(getattr(model, "module", model), "fusion", None)


class Match:
    """``match(image_rows, text_rows) -> logits [P]``: the fusion head's ITM logits of pairs,
    from the token features of the forward pass that made the embeddings.

    ``rows`` are the slices of the loss's image and text batches those token features belong
    to, and the indices a call takes count from their starts. On one process that is the whole
    batch; under torchrun the loss sees the gathered batch, but token features stay on their
    rank (gathering ``[B, L, width]`` tokens would cost more than the whole contrastive
    gather), so a rank scores pairs of its own rows: ALBEF's per-GPU ITM negatives.
    """

    def __init__(self, head: nn.Module, image_tokens: tuple[Tensor, Tensor],
                 text_tokens: tuple[Tensor, Tensor],
                 rows: tuple[slice, slice] = (slice(None), slice(None))) -> None:
        self.head, self.image_tokens, self.text_tokens, self.rows = (
            head, image_tokens, text_tokens, rows)

    def __call__(self, image_rows: Tensor, text_rows: Tensor) -> Tensor:
        (vt, vm), (tt, tm) = self.image_tokens, self.text_tokens
        return self.head(vt[image_rows], vm[image_rows], tt[text_rows], tm[text_rows])

    def within(self, image_rows: slice, text_rows: slice) -> Match:
        """The same scorer, its rows placed at these slices of a larger (gathered) batch."""
        return Match(self.head, self.image_tokens, self.text_tokens, (image_rows, text_rows))


def fused_forward(model: nn.Module, pixels: Tensor, tokens: dict[str, Tensor],
                  context: dict[str, Any]) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Embeddings of one batch and the loss context with ``match``, a :class:`Match` over this
    same forward pass's token features."""
    img, txt, vt, vm, tt, tm = model(pixels, tokens, with_tokens=True)
    return img, txt, {**context, "match": Match(fusion_of(model), (vt, vm), (tt, tm))}


def _encoder(name: str, options: Any, modality: str) -> nn.Module:
    enc = create("encoder", name, options=options)
    check(enc, f"encoder '{name}'")  # half a capability is a plugin bug: said at build time
    if getattr(enc, "modality", None) != modality:
        from .spi.errors import RecipeError

        section = "model.vision" if modality == "image" else "model.text"
        raise RecipeError(f"encoder '{name}' encodes {getattr(enc, 'modality', '?')}, not "
                          f"{modality}", key=f"{section}.name", given=name)
    return enc
