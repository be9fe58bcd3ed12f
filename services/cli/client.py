"""What every client command shares: channels built from settings (TLS and
mutual TLS from the ``MODELFLEET_TLS_*`` client paths), the bearer token, and
output as a table or JSON (``--output json``) for scripts."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from common.settings import Settings

T = TypeVar("T")
# Upload chunk size: well under any message limit, large enough to keep calls few.
CHUNK_BYTES = 1024 * 1024


def add_target(parser: argparse.ArgumentParser, default_port_field: str) -> None:
    """``--target host:port``; the default is 127.0.0.1 and the service's port from settings."""
    parser.add_argument(
        "--target",
        default=None,
        help=f"service address (default 127.0.0.1:$MODELFLEET_{default_port_field.upper()})",
    )
    parser.set_defaults(port_field=default_port_field)


def add_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", "-o", choices=("table", "json"), default="table", help="output format")


def channel_options(settings: Settings) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Keepalive pings keep long WatchJob/StreamBatches streams alive through proxies.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
    ]


def target_of(args: argparse.Namespace, settings: Settings) -> str:
    return args.target or f"127.0.0.1:{getattr(settings, args.port_field)}"


def channel_credentials(settings: Settings) -> grpc.ChannelCredentials | None:
    """TLS credentials when a CA or a client certificate is configured, else None (plaintext)."""
    if not settings.client_tls:
        return None

    def read(path: str) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(
        root_certificates=read(settings.tls_ca_file),
        private_key=read(settings.tls_client_key_file),
        certificate_chain=read(settings.tls_client_cert_file),
    )


def connect(target: str, settings: Settings) -> grpc.Channel:
    """A channel to ``target`` with the size limits and TLS from settings; every client uses this."""
    options = channel_options(settings)
    credentials = channel_credentials(settings)
    if credentials is None:
        return grpc.insecure_channel(target, options=options)
    if settings.tls_server_name:
        options.append(("grpc.ssl_target_name_override", settings.tls_server_name))
    return grpc.secure_channel(target, credentials, options=options)


def open_channel(args: argparse.Namespace, settings: Settings | None = None) -> grpc.Channel:
    settings = settings or Settings.from_env()
    return connect(target_of(args, settings), settings)


def call_metadata(settings: Settings | None = None) -> list[tuple[str, str]]:
    """Bearer token from MODELFLEET_TOKEN, else (development) the first plain server token."""
    configured = (settings or Settings.from_env()).auth_tokens
    token = os.environ.get("MODELFLEET_TOKEN") or next(iter(configured), "")
    return [("authorization", f"Bearer {token}")] if token else []


def to_dict(message: Message) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True)


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def all_pages(fetch: Callable[[str], tuple[Sequence[T], str]]) -> list[T]:
    """Every item of a paged listing: ``fetch(page_token)`` returns one page's
    items and the next token ("" on the last page)."""
    items: list[T] = []
    token = ""
    while True:
        page, token = fetch(token)
        items.extend(page)
        if not token:
            return items


def file_chunks(path: Path | str) -> Iterator[bytes]:
    """A file's bytes in CHUNK_BYTES pieces, for client-streamed uploads."""
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            yield chunk
