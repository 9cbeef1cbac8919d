"""Built-in encoders: from-scratch image and text towers (and, later, pretrained HF/timm ones)."""
