"""The model registry service (hosted by the inference server) and model uploads."""
