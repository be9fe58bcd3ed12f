"""The tokens file: its format, rotation without a restart, dev tokens, and
the CLI line that goes into it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.auth import Authenticator, Principal, Role, hash_token, parse_token_lines
from common.errors import InvalidArgument, Unauthenticated


def auth_header(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def test_file_maps_tokens_to_principals(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# comment\n\n{hash_token('a')} reader svc-a\n{hash_token('b')} ADMIN ops  # trailing\n")
    auth = Authenticator(tokens_file=path)
    assert auth.enabled
    assert auth.authenticate(auth_header("a")) == Principal("svc-a", Role.READER)
    assert auth.authenticate(auth_header("b")) == Principal("ops", Role.ADMIN)
    with pytest.raises(Unauthenticated):
        auth.authenticate(auth_header("c"))
    with pytest.raises(Unauthenticated, match="missing bearer token"):
        auth.authenticate([("authorization", "Basic YTpi")])


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("a" * 64 + " reader x", "sha256:"),
        ("sha256:abc reader x", "64 hex digits"),
        (f"{hash_token('t')} root x", "role must be one of"),
        (f"{hash_token('t')} reader ../x", "client name"),
        (f"{hash_token('t')} reader", "expected"),
        (f"{hash_token('t')} reader x\n{hash_token('t')} admin y", "listed twice"),
    ],
)
def test_bad_lines_name_the_line(line: str, problem: str) -> None:
    with pytest.raises(InvalidArgument, match=problem) as err:
        parse_token_lines(line.splitlines(), "tokens")
    assert "tokens line" in err.value.message


def test_rotation_takes_effect_and_a_bad_file_keeps_the_last_good(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"{hash_token('old')} submitter ci\n")
    auth = Authenticator(tokens_file=path, reload_interval_s=0)
    assert auth.authenticate(auth_header("old")).name == "ci"
    # Rotation step 1: both tokens valid; step 2: only the new one.
    path.write_text(f"{hash_token('old')} submitter ci\n{hash_token('new')} submitter ci\n")
    assert auth.authenticate(auth_header("new")).name == "ci"
    path.write_text(f"{hash_token('new')} submitter ci\n")
    with pytest.raises(Unauthenticated):
        auth.authenticate(auth_header("old"))
    path.write_text("not a valid line at all\n")
    assert auth.authenticate(auth_header("new")).name == "ci"


def test_dev_tokens_are_admins() -> None:
    auth = Authenticator(plain_tokens=("dev-secret",))
    assert auth.authenticate(auth_header("dev-secret")) == Principal("dev-1", Role.ADMIN)
    assert not Authenticator().enabled


def test_cli_hash_token_line_is_accepted(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli.main",
            "auth",
            "hash-token",
            "--role",
            "reader",
            "--name",
            "svc-a",
        ],
        input="my-token\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    (entry,) = parse_token_lines(done.stdout.splitlines())
    assert entry.principal == Principal("svc-a", Role.READER)
    assert done.stdout.startswith(hash_token("my-token"))
    assert "my-token" not in done.stdout
