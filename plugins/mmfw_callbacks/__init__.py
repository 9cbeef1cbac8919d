"""Built-in callbacks: the run-level features of mmfw, on the lifecycle hooks."""
