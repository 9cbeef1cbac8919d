"""``python -m mmfw`` (what torchrun runs)."""

from .cli import main

main()
