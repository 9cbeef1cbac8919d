"""Runs on disk: the run directory, checkpoints, finished runs, ensembles, dispatch."""
