"""smtpchat's man page and completions: render cleanly, parse, and match the real options."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import click
import pytest

from pymailtools.chat import status
from pymailtools.cli.smtpchat import command
from tests.conftest import need_tool

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "man" / "man1" / "smtpchat.1"
BASH = ROOT / "completions" / "smtpchat.bash"
ZSH = ROOT / "completions" / "_smtpchat"
FISH = ROOT / "completions" / "smtpchat.fish"


def cli_options() -> set[str]:
    out: set[str] = set()
    for param in command.params:
        if isinstance(param, click.Option):
            out.update(param.opts + param.secondary_opts)
    return out | {"--help"}


def man_text() -> str:
    return MAN.read_text().replace("\\-", "-").replace("\\&", "")


def test_man_page_renders_without_warnings() -> None:
    groff = need_tool("groff", "groff")
    r = subprocess.run([groff, "-t", "-man", "-Tutf8", "-ww", "-z", str(MAN)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_man_page_documents_every_option() -> None:
    text = man_text()
    missing = [o for o in sorted(cli_options())
               if not re.search(r"(?<![\w-])" + re.escape(o) + r"(?![\w-])", text)]
    assert missing == []


def test_man_page_exit_codes_match_the_code() -> None:
    table = man_text().split(".SH EXIT STATUS", 1)[1].split(".TE", 1)[0]
    documented = {int(m) for m in re.findall(r"(?m)^(\d+)\t", table)}
    codes = {v for k, v in vars(status).items() if k.isupper() and isinstance(v, int)}
    assert documented == codes


def _offered(path: Path) -> set[str]:
    text = path.read_text()
    if path == FISH:
        found = set()
        for line in text.splitlines():
            found.update("--" + m for m in re.findall(r"(?<!\S)-l ([\w-]+)", line))
            found.update("-" + m for m in re.findall(r"(?<!\S)-[so] ([\w-]+)", line))
        return found
    return set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", text))


@pytest.mark.parametrize("path", [BASH, ZSH, FISH], ids=["bash", "zsh", "fish"])
def test_completions_offer_exactly_the_options(path: Path) -> None:
    offered = {o for o in _offered(path) if o.startswith("--")}
    assert offered == {o for o in cli_options() if o.startswith("--")}
    short = {o for o in cli_options() if not o.startswith("--")}
    text = path.read_text()
    for o in short:
        bare = o[1:]
        assert re.search(r"(?<![\w-])(" + re.escape(o) + r"|-[so] " + re.escape(bare)
                         + r")(?![\w-])", text), o


@pytest.mark.parametrize(("shell", "package", "path"), [
    ("bash", "bash", BASH), ("zsh", "zsh", ZSH), ("fish", "fish", FISH)])
def test_completions_parse(shell: str, package: str, path: Path) -> None:
    exe = need_tool(shell, package)
    r = subprocess.run([exe, "-n", str(path)], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 0, r.stderr


def test_bash_completion_offers_quit_after_steps() -> None:
    bash = need_tool("bash", "bash")
    r = subprocess.run(
        [bash, "-c", f'source "{BASH}"; COMP_WORDS=(smtpchat --quit-after r); COMP_CWORD=2; '
         '_pymailtools_smtpchat; echo "${COMPREPLY[@]}"; COMP_WORDS=(smtpchat --pipe); '
         'COMP_CWORD=1; _pymailtools_smtpchat; echo "${COMPREPLY[@]}"'],
        capture_output=True, text=True, timeout=60, check=False)
    assert r.stdout.splitlines() == ["rcpt", "--pipeline"]


def test_help_lists_the_options() -> None:
    from tests.support.chat import smtpchat

    r = smtpchat("--help")
    assert r.returncode == 0
    for o in ("--quit-after", "--raw-line", "--chunking", "--tls-on-connect", "--json"):
        assert o in r.stdout
    v = smtpchat("--version")
    assert v.returncode == 0 and "smtpchat, version 0.1.0" in v.stdout
