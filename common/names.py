"""Validation of user-chosen names (models, datasets, aliases).

Names become Redis key parts and appear in paths, so they are restricted to a
safe alphabet: no separators, no '..', nothing that could traverse a path.
"""

from __future__ import annotations

import re

from common.errors import InvalidArgument

# fullmatch, not match: "$" also matches before a trailing newline.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_ALIAS = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


def validate_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is 1-128 chars of letters, digits, '.', '-', '_'
    starting with a letter or digit and without '..'; else InvalidArgument."""
    if not _NAME.fullmatch(name) or ".." in name:
        raise InvalidArgument(
            f"{what} {name!r} is invalid: use 1-128 letters, digits, '.', '-', '_' (no '..', no '/')"
        )
    return name


def validate_alias(alias: str, what: str = "alias") -> str:
    """Aliases start with a letter so they never collide with version numbers."""
    if not _ALIAS.fullmatch(alias):
        raise InvalidArgument(f"{what} {alias!r} is invalid: start with a letter; letters, digits, '-', '_'")
    return alias
