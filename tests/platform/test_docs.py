"""The README documents every setting, and documents nothing that is not one."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from common.settings import ENV_PREFIX, Settings

README = Path(__file__).resolve().parents[2] / "README.md"
CLIENT_ONLY = {"MODELFLEET_TOKEN"}


def test_readme_lists_every_setting() -> None:
    text = README.read_text()
    documented = set(re.findall(r"`(MODELFLEET_[A-Z0-9_]+)`", text)) - CLIENT_ONLY
    settings = {ENV_PREFIX + f.name.upper() for f in fields(Settings)}
    assert settings - documented == set(), "settings missing from README's Configuration table"
    assert documented - settings == set(), "README documents variables that are not settings"
