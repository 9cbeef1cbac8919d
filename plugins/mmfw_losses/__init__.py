"""Built-in contrastive and regularising losses (calling convention in mmfw.spi.contracts.Loss)."""
