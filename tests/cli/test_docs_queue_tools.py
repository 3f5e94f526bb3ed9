"""Man pages and completions of mailq, postqueue and postsuper: they render cleanly, document
every option the commands accept, and the completions offer those options and real queue ids."""

import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import need_tool

ROOT = Path(__file__).resolve().parents[2]
MAN1 = ROOT / "man" / "man1"
COMPLETIONS = ROOT / "completions"
TOOLS = ("mailq", "postqueue", "postsuper")
SELECTORS = {"--from", "--to", "--older-than", "--newer-than", "--queue", "--reason"}
OPTIONS = {
    "mailq": {"--plain", "--json", "--explain", "-C"} | SELECTORS,
    "postqueue": {"-c", "-f", "-i", "-j", "-p", "-s", "-v", "--plain"} | SELECTORS,
    "postsuper": {"-c", "-d", "-h", "-H", "-p", "-r", "-s", "-S", "-v"} | SELECTORS,
}


def man_text(tool: str) -> str:
    return (MAN1 / f"{tool}.1").read_text()


@pytest.mark.parametrize("tool", TOOLS)
def test_man_page_renders_without_warnings(tool: str) -> None:
    groff = need_tool("groff", "groff-base")
    p = subprocess.run([groff, "-t", "-man", "-Tutf8", "-ww", "-z", str(MAN1 / f"{tool}.1")],
                       capture_output=True, text=True)
    assert (p.returncode, p.stderr) == (0, "")


@pytest.mark.parametrize("tool", TOOLS)
def test_man_page_documents_every_option(tool: str) -> None:
    text = man_text(tool).replace("\\-", "-")
    for opt in OPTIONS[tool]:
        # in bold, on a font macro line (.B, .BI, .BR, .RB ...), as a whole word
        assert re.search(rf"^\.(?:B|BI|BR|RB|IB)\b[^\n]*(?<![\w-]){re.escape(opt)}(?![\w-])",
                         text, re.M), f"{tool}.1 lacks {opt}"


def test_postsuper_man_page_gives_postfix_texts_and_exit_codes() -> None:
    text = man_text("postsuper").replace("\\-", "-")
    for s in ("Deleted: 1 message", "Placed on hold: 5 messages", "Released from hold",
              "Requeued: 5 messages", "invalid queue id", "reserved for the superuser",
              "invalid mail queue id"):
        assert s in text, s
    for code in ("64", "65", "75", "77"):
        assert re.search(rf"^\.B {code}$", text, re.M), code


def completion_options(path: Path, tool: str = r"\w+") -> set[str]:
    text = path.read_text()
    if path.suffix == ".fish":  # one file serves all three: count the lines for ``tool``
        short = set(re.findall(rf"complete -c {tool} .*?-s (\w)\b", text))
        long = set(re.findall(rf"complete -c {tool} .*?-l ([\w-]+)", text))
        return {f"-{s}" for s in short} | {f"--{x}" for x in long}
    if path.name.startswith("_"):
        return set(re.findall(r"'(?:\([^)]*\))?(?:\*)?(--?[\w-]+)[+=]?\[", text))
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", text)) & set().union(*OPTIONS.values())


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_offers_exactly_the_documented_options(tool: str, shell: str) -> None:
    path = COMPLETIONS / {"bash": f"{tool}.bash", "zsh": f"_{tool}", "fish": f"{tool}.fish"}[
        shell]
    offered = completion_options(path, tool)
    if shell == "bash":  # one file serves all three commands
        offered = set().union(*OPTIONS.values()) & offered
        assert OPTIONS[tool] <= offered
    else:
        assert offered == OPTIONS[tool], path


@pytest.mark.parametrize(("shell", "flag", "suffix"), [
    ("bash", "-n", ".bash"), ("zsh", "-n", ""), ("fish", "--no-execute", ".fish")])
@pytest.mark.parametrize("tool", TOOLS)
def test_completion_syntax(shell: str, flag: str, suffix: str, tool: str) -> None:
    exe = need_tool(shell, shell)
    path = COMPLETIONS / (f"_{tool}" if shell == "zsh" else f"{tool}{suffix}")
    p = subprocess.run([exe, flag, str(path)], capture_output=True, text=True)
    assert (p.returncode, p.stderr) == (0, "")


@pytest.fixture
def id_queue(tmp_path: Path) -> Path:
    q = tmp_path / "q"
    for state, name in (("deferred", "AbC123"), ("hold", "HoLd1"), ("incoming", "In1"),
                        ("deferred", "bad.name")):
        (q / state).mkdir(parents=True, exist_ok=True)
        (q / state / name).write_text("")
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'queue_directory = "{q}"\n')
    return cfg


def test_bash_completes_queue_ids_per_operation(id_queue: Path) -> None:
    bash = need_tool("bash", "bash")

    def complete(*words: str) -> set[str]:
        script = (f"source {COMPLETIONS / 'postsuper.bash'}; COMP_WORDS=({' '.join(words)} '');"
                  f" COMP_CWORD={len(words)}; _pymailtools_{words[0]};"
                  " printf '%s\\n' \"${COMPREPLY[@]}\"")
        out = subprocess.run([bash, "-c", script], capture_output=True, text=True,
                             env={"PYMAILTOOLS_CONFIG": str(id_queue), "PATH": "/usr/bin:/bin"})
        return set(out.stdout.split())

    assert {"ALL", "-", "AbC123", "HoLd1", "In1"} <= complete("postsuper", "-d")
    h = complete("postsuper", "-H")
    assert "HoLd1" in h and "AbC123" not in h and "bad.name" not in h
    assert complete("postqueue", "-i") == {"AbC123", "HoLd1", "In1"}
    assert complete("mailq", "--explain") == {"AbC123", "HoLd1", "In1"}
    assert complete("postsuper", "-d", "X") == {"hold", "incoming", "active", "deferred",
                                                "maildrop"}


def test_fish_completes_queue_ids(id_queue: Path) -> None:
    fish = need_tool("fish", "fish")
    out = subprocess.run([fish, "--no-config", "-c",
                          f"source {COMPLETIONS / 'postsuper.fish'}; complete -C 'postsuper -h '"],
                         capture_output=True, text=True,
                         env={"PYMAILTOOLS_CONFIG": str(id_queue), "PATH": "/usr/bin:/bin"})
    got = {line.split("\t")[0] for line in out.stdout.splitlines()}
    assert got == {"ALL", "-", "AbC123", "In1"}
