"""Developer benchmarks that print numbers: checkpoint conversion memory, data pipeline, Mamba kernels, safe load."""
