"""``modelfleet up`` checks its ports as the servers bind them: a port in
TIME-WAIT after a restart is free, a listening one is refused naming the variable."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from common.errors import FailedPrecondition
from common.settings import Settings
from services.cli.fleet import Fleet


def _time_wait_port() -> int:
    """A port whose server side closed first, so its socket sits in TIME-WAIT. The
    listener sets SO_REUSEADDR as gRPC servers do (Linux lets a new bind share a
    TIME-WAIT port only when both sockets set it)."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = int(listener.getsockname()[1])
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the active close: this end (port) enters TIME-WAIT
        client.recv(1)
        client.close()
    return port


def test_a_port_in_time_wait_is_free_and_a_listening_one_is_not(settings: Settings, tmp_path: Path) -> None:
    port = _time_wait_port()
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))  # what the check did before: refused
    Fleet(
        settings.replace(host="127.0.0.1", training_port=port, metrics_port=0), home=tmp_path
    )._check_ports()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = int(busy.getsockname()[1])
        with pytest.raises(FailedPrecondition, match=f"port {taken} for training .*MODELFLEET_TRAINING_PORT"):
            Fleet(settings.replace(training_port=taken, metrics_port=0), home=tmp_path)._check_ports()
