"""Changes measured here before they are proposed for the plugins (benchmarks only)."""
