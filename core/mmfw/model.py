"""The dual encoder: two encoders and their adapters into one embedding space."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .contracts import asset_dir
from .recipe import ModelConfig
from .registry import create


class DualEncoder(nn.Module):
    """``encode_image`` / ``encode_text`` give raw (unnormalised) ``[B, embed_dim]`` embeddings.

    Normalising is left to the loss and to evaluation (cosine similarity), as the loss contract
    says, so a loss that needs norms (VICReg) still sees them.
    """

    def __init__(self, vision: nn.Module, text: nn.Module, vision_adapter: nn.Module,
                 text_adapter: nn.Module) -> None:
        super().__init__()
        self.vision, self.text = vision, text
        self.vision_adapter, self.text_adapter = vision_adapter, text_adapter

    @property
    def embed_dim(self) -> int:
        return int(self.vision_adapter.out_dim)

    def encode_image(self, pixels: Tensor) -> Tensor:
        return self.vision_adapter(self.vision(pixels))

    def encode_text(self, tokens: dict[str, Tensor]) -> Tensor:
        return self.text_adapter(self.text(tokens))

    def forward(self, pixels: Tensor, tokens: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return self.encode_image(pixels), self.encode_text(tokens)

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
    return DualEncoder(vision, text, *adapters)


def _encoder(name: str, options: Any, modality: str) -> nn.Module:
    enc = create("encoder", name, options=options)
    if getattr(enc, "modality", None) != modality:
        from .errors import RecipeError

        section = "model.vision" if modality == "image" else "model.text"
        raise RecipeError(f"encoder '{name}' encodes {getattr(enc, 'modality', '?')}, not "
                          f"{modality}", key=f"{section}.name", given=name)
    return enc
