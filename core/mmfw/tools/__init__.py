"""Tools outside the training import path, imported lazily by the CLI and callbacks: plots,
the HTML report and sweeps. Nothing here is imported by ``import mmfw``."""
