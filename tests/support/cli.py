"""Our console scripts as a test runs them: installed, or sendmail's main() as another user."""

from __future__ import annotations

import pwd
import subprocess
from pathlib import Path

from tests.conftest import run_as, script


def run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The installed console script ``tool`` with ``args``; its output as text."""
    return subprocess.run([script(tool), *args], capture_output=True, text=True, timeout=120)


def submit_as(user: pwd.struct_passwd, cfg_path: Path, argv: list[str], stdin: Path) -> int:
    """Run sendmail's main() as ``user`` in a forked child (the venv's interpreter lives under
    /root, which other users cannot execute, so the child keeps the already loaded one)."""
    import pymailtools.address  # noqa: F401  (import before dropping privileges)
    import pymailtools.cli.sendmail as cli
    import pymailtools.qmgr.trigger  # noqa: F401
    import pymailtools.submit.submission  # noqa: F401

    return run_as(user, lambda: cli.main(["sendmail", *argv]), config=cfg_path, stdin=stdin)
