"""Pure-torch compression operations on MLP models (no gRPC, no Redis)."""
