"""Regenerate the checked-in Python code for every .proto under protos/.

Output goes to common/api/ (one importable package). protoc writes absolute
imports such as ``from modelfleet.jobs.v1 import jobs_pb2``; they are rewritten
once here to ``common.api.modelfleet...`` so the package works when installed.
Run with ``make protos``; CI runs it and fails on any diff.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "common" / "api"
PACKAGE = "common.api"
# Top-level proto packages whose imports get prefixed.
TOP_LEVEL = ("modelfleet", "inference")


def main() -> int:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={OUT}",
        f"--mypy_out={OUT}",
        f"--grpc_python_out={OUT}",
        f"--mypy_grpc_out={OUT}",
        *sources,
    ]
    if protoc.main(args) != 0:
        print("protoc failed", file=sys.stderr)
        return 1
    pattern = re.compile(rf"^(from|import) ({'|'.join(TOP_LEVEL)})(\.| )", re.MULTILINE)
    for path in OUT.rglob("*.py*"):
        text = pattern.sub(rf"\1 {PACKAGE}.\2\3", path.read_text())
        path.write_text(text)
    for directory in [OUT, *(p for p in OUT.rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()
    print(f"generated {len(sources)} proto files into {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
