"""The recipe: TOML sections validated into frozen attrs classes, and its generated reference."""
