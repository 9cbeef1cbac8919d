"""Retrieval evaluation: Recall@K both ways, rsum, ensembles, fusion re-ranking (public API)."""
