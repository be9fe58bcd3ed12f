"""Compression service: pruning, L1-constrained and distilled fine-tuning and
quantization of registered MLPs, run as jobs on the shared queue."""
