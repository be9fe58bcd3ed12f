"""``modelfleet auth hash-token``: the line to put in the tokens file for a client.

The token comes from stdin (so it never shows in the process list or shell
history) or, with ``--generate``, is made here and printed once on stderr.
"""

from __future__ import annotations

import argparse
import sys

from common.auth import Principal, Role, hash_token, new_token, parse_token_lines
from common.errors import InvalidArgument


def register(sub: argparse._SubParsersAction) -> None:
    auth = sub.add_parser("auth", help="API tokens")
    commands = auth.add_subparsers(dest="auth_command", required=True, metavar="COMMAND")
    hashed = commands.add_parser(
        "hash-token",
        help="print 'sha256:<hex> <role> <name>' for MODELFLEET_AUTH_TOKENS_FILE",
    )
    hashed.add_argument("--role", required=True, choices=[r.label for r in Role], help="the client's role")
    hashed.add_argument("--name", required=True, help="client name, recorded on its jobs")
    hashed.add_argument(
        "--generate", action="store_true", help="make a random token (shown on stderr), not read stdin"
    )
    hashed.set_defaults(handler=_hash_token)


def token_line(token: str, role: Role, name: str) -> str:
    """The tokens-file line for ``token``, checked by the same parser the server uses."""
    if not token:
        raise InvalidArgument("token is empty")
    line = f"{hash_token(token)} {role.label} {name}"
    parse_token_lines([line], "the new line")
    return line


def _hash_token(args: argparse.Namespace) -> int:
    principal = Principal(args.name, Role.parse(args.role))
    if args.generate:
        token = new_token()
        print(f"token (give it to {principal.name}; it is not stored anywhere): {token}", file=sys.stderr)
    else:
        token = sys.stdin.readline().strip()
    print(token_line(token, principal.role, principal.name))
    return 0
