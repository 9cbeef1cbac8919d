"""mmfw-loss-example: the decoupled contrastive loss (DCL, DCLW) as an mmfw plugin."""

from .dcl import DCL, DCLOptions

__all__ = ["DCL", "DCLOptions"]
