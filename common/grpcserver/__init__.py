"""The gRPC server bootstrap every modelfleet service uses."""

from common.grpcserver.host import ServiceHost

__all__ = ["ServiceHost"]
