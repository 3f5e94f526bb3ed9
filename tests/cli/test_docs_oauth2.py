"""pymailtools-oauth2's man page and completions: the page renders cleanly and documents every
option the parser has; bash, zsh and fish offer those options."""

import re
import subprocess
from pathlib import Path

from pymailtools.cli.oauth2 import parser
from tests.conftest import need_tool

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "man" / "man1" / "pymailtools-oauth2.1"
COMPLETIONS = ROOT / "completions"


def parser_options() -> set[str]:
    sub = next(a for a in parser()._actions if a.choices and "token" in a.choices)
    opts = set()
    for p in sub.choices.values():
        opts |= {o for a in p._actions for o in a.option_strings if o.startswith("--")}
    return opts - {"--help"}


def test_page_renders_without_warnings() -> None:
    groff = need_tool("groff", "groff-base")
    p = subprocess.run([groff, "-man", "-Tutf8", "-ww", "-z", str(PAGE)], capture_output=True,
                       text=True)
    assert (p.returncode, p.stderr) == (0, "")


def test_page_and_completions_cover_every_option() -> None:
    options = parser_options()
    assert {"--account", "--provider", "--client-secret-command", "--json"} <= options
    page = PAGE.read_text().replace("\\-", "-")
    for name in ("pymailtools-oauth2.bash", "_pymailtools-oauth2", "pymailtools-oauth2.fish"):
        text = (COMPLETIONS / name).read_text()
        text = re.sub(r"-l ([\w-]+)", r"--\1", text)  # fish spells long options -l name
        for opt in options:
            assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text), (name, opt)
    for opt in options:
        assert re.search(rf"^\.(?:B|BI|BR|RB)\b[^\n]*(?<![\w-]){re.escape(opt)}(?![\w-])",
                         page, re.M), opt
    for code in ("64", "69", "75", "77", "78"):
        assert re.search(rf"^\.B {code}$", page, re.M), code
