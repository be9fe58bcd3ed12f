"""A listing piped to a reader that closes early (``| head``) exits quietly."""

from __future__ import annotations

import subprocess
import sys


def test_broken_pipe_is_quiet() -> None:
    code = (
        "import sys, argparse\n"
        "from services.cli import main as m\n"
        "def big(args):\n"
        "    for i in range(200000):\n"
        "        print('row', i)\n"
        "    return 0\n"
        "class P:\n"
        "    def parse_args(self, a):\n"
        "        return argparse.Namespace(handler=big)\n"
        "m.build_parser = P\n"
        "sys.exit(m.main([]))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(10)
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    rc = proc.wait(timeout=60)
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
    assert rc in (0, 141)
