"""Built-in data plugins: datasets and batch samplers."""
