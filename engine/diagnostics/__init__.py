"""Machine diagnostics: the environment check and the all-reduce bandwidth measurement."""
