"""Built-in device backends: cpu, cuda, mps and auto."""
