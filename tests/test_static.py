"""The static checks run with the suite: ruff over src/ and tests/, mypy (strict, over src/)
and import-linter's layer contract, each configured in pyproject.toml. The test extra
installs all three next to the interpreter running the tests."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("command", [["ruff", "check", "src", "tests"], ["mypy"],
                                     ["lint-imports"]], ids=["ruff", "mypy", "lint-imports"])
def test_static_check(command: list[str]) -> None:
    tool = BIN / command[0]
    assert tool.exists(), f"{tool} missing: pip install -e '.[test]'"
    p = subprocess.run([str(tool), *command[1:]], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, f"{' '.join(command)} failed:\n{p.stdout}{p.stderr}"
