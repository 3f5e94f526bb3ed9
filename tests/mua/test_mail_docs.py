"""mail.1 renders cleanly and documents every option; the mail completions parse and complete."""

import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import need_tool

ROOT = Path(__file__).resolve().parents[2]
MAN = ROOT / "man" / "man1" / "mail.1"
COMPLETIONS = ROOT / "completions"
# Every option pymailtools.cli.mail accepts.
OPTIONS = ["-s", "-c", "-b", "-a", "-r", "-S", "-A", "-:", "-t", "-E", "-v", "-n", "-N", "-H",
           "-e", "-f", "-u", "-i", "-I", "-d", "-h", "-V", "--read-recipients", "--fetch", "--keep",
           "--help", "--version"]


def test_man_page_renders_without_warnings() -> None:
    groff = need_tool("groff", "groff-base")
    r = subprocess.run([groff, "-man", "-Tutf8", "-ww", "-z", str(MAN)], capture_output=True,
                       timeout=60)
    assert r.returncode == 0 and r.stderr == b""


def test_man_page_documents_every_option_and_the_t_and_a_clashes() -> None:
    text = MAN.read_text()
    tags = re.findall(r"^\.(?:TP|TQ)\n\.BI? (\\-\\-[\w\\-]+|\\-[\w:])", text, re.MULTILINE)
    documented = {t.replace("\\-", "-") for t in tags}
    assert set(OPTIONS) <= documented, set(OPTIONS) - documented
    plain = text.replace("\\-", "-")
    assert "--read-recipients" in plain and "mail -t smtp.example.com" in plain
    assert "Content-Type: text/html" in plain and "fail2ban" in plain


@pytest.mark.parametrize("shell,name", [("bash", "mail.bash"), ("zsh", "_mail"),
                                        ("fish", "mail.fish")])
def test_completion_parses(shell: str, name: str) -> None:
    exe = need_tool(shell, shell)
    r = subprocess.run([exe, "-n", str(COMPLETIONS / name)], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_bash_completion_offers_options_and_s_variables() -> None:
    bash = need_tool("bash", "bash")
    script = (f"source {COMPLETIONS / 'mail.bash'}\n"
              "COMP_WORDS=(mail -); COMP_CWORD=1; _pymailtools_mail; echo \"${COMPREPLY[*]}\"\n"
              "COMP_WORDS=(mail -S sm); COMP_CWORD=2; _pymailtools_mail; "
              "echo \"${COMPREPLY[*]}\"\n")
    out = subprocess.run([bash, "-c", script], capture_output=True, text=True,
                         timeout=60).stdout.splitlines()
    offered = set(out[0].split())
    assert set(OPTIONS) <= offered | {"--"}
    assert {"smtp=", "smtp-use-starttls", "smtp-auth-user="} <= set(out[1].split())
