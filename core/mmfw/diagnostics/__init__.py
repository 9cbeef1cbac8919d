"""Collapse measurements: similarity statistics, effective rank, spectra, gradient norms
(public: the diagnostics callback and the plots use them)."""
