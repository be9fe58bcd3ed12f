"""Platform code shared by every modelfleet service and worker."""

import os

# modelfleet forks only to exec (subprocesses, spawned DDP ranks), so gRPC's
# fork handlers buy nothing, and with grpc.aio they can stall the poller.
# Set before gRPC is first imported by anything in the process.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
