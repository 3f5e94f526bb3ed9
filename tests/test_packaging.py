"""The wheel installs the man pages and shell completions where man, bash, zsh and fish find them.

Built offline from this tree (hatchling without build isolation), installed into a fresh venv,
then looked up the way a user's shell does: ``man -w`` with the venv's bin/ first on PATH, the
bash completion sourced, and bash-completion's own loader finding it by the command's name.
"""

import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import need_tool

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("sendmail", "mail", "mailx", "mailq", "postqueue", "postsuper", "smtpchat",
            "postmap", "postalias", "pymailtools-oauth2")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index",
                    "--no-build-isolation", "-w", str(out), str(ROOT)], check=True)
    (whl,) = out.glob("pymailtools-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv with the wheel installed (no dependencies: only its files matter here)."""
    d = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(d)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(d / "bin" / "python"),
                    "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    yield d


def _env(venv: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MANPATH", "XDG_DATA_DIRS")}
    env["PATH"] = f"{venv / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    env.update(extra)
    return env


def test_wheel_carries_every_page_and_completion(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    data = "pymailtools-0.1.0.data/data/share/"
    for page in sorted((ROOT / "man").glob("man?/*.?")):
        assert f"{data}man/{page.parent.name}/{page.name}" in names
    for cmd in COMMANDS:
        assert f"{data}bash-completion/completions/{cmd}" in names
        assert f"{data}fish/vendor_completions.d/{cmd}.fish" in names
    for zsh in sorted((ROOT / "completions").glob("_*")):
        assert f"{data}zsh/site-functions/{zsh.name}" in names


@pytest.mark.parametrize(("page", "section"), [("sendmail", "1"), ("mail", "1"), ("mailq", "1"),
                                               ("postsuper", "1"), ("postmap", "1"),
                                               ("pymailtools.toml", "5")])
def test_man_finds_our_page_next_to_bin(venv: Path, page: str, section: str) -> None:
    man = need_tool("man", "man-db")
    found = subprocess.run([man, "-w", section, page], env=_env(venv), capture_output=True,
                           text=True, check=True).stdout.split()
    assert found and found[0] == str(venv / "share" / "man" / f"man{section}" /
                                     f"{page}.{section}"), found


def test_sourced_bash_completion_registers_the_commands(venv: Path) -> None:
    need_tool("bash", "bash")
    comp = venv / "share" / "bash-completion" / "completions"
    script = "".join(f". {comp / cmd}; complete -p {cmd};" for cmd in COMMANDS)
    out = subprocess.run(["bash", "--norc", "-c", script], env=_env(venv),
                         capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    for cmd in COMMANDS:
        assert any(line.startswith("complete -F _pymailtools_") and line.endswith(f" {cmd}")
                   for line in lines), (cmd, out)
    assert "complete -F _pymailtools_mail mailx" in lines


def test_bash_completion_loader_finds_them_by_name(venv: Path) -> None:
    loader = Path("/usr/share/bash-completion/bash_completion")
    if not loader.exists():
        from tests.conftest import missing

        missing("bash-completion not installed (apt-get install bash-completion)")
    share = venv / "share"
    script = (f". {loader}; for c in {' '.join(COMMANDS)}; do __load_completion $c "
              "&& complete -p $c; done")
    out = subprocess.run(["bash", "--norc", "-c", script],
                         env=_env(venv, XDG_DATA_DIRS=f"{share}:/usr/local/share:/usr/share"),
                         capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    for cmd, func in (("sendmail", "sendmail"), ("mail", "mail"), ("mailx", "mail"),
                      ("mailq", "mailq"), ("postsuper", "postsuper"), ("smtpchat", "smtpchat")):
        assert f"complete -F _pymailtools_{func} {cmd}" in lines, (cmd, out)


def test_fish_loads_the_mailx_completion(venv: Path) -> None:
    fish = need_tool("fish", "fish")
    vendor = venv / "share" / "fish" / "vendor_completions.d"
    out = subprocess.run([fish, "--no-config", "-c", f"source {vendor / 'mailx.fish'}; "
                          "complete -C'mailx -'"], env=_env(venv), capture_output=True,
                         text=True, check=True).stdout
    assert "-s\tSubject" in out, out


def _site_marker(venv: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(marker, sitecustomize.py): the venv's sitecustomize leaves the marker when `site` runs."""
    site_packages = next((venv / "lib").glob("python3*/site-packages"))
    for stale in (site_packages / "__pycache__").glob("sitecustomize.*"):
        stale.unlink()  # another test's, perhaps of the same size and second: not ours
    marker = tmp_path / "site-ran"
    custom = site_packages / "sitecustomize.py"
    custom.write_text(f"open({str(marker)!r}, 'w').close()\n")
    return marker, custom


def test_installed_sendmail_starts_without_site(venv: Path, tmp_path: Path) -> None:
    """The launcher runs the venv's Python with -I -S (no `site`: a third of its start-up) and
    puts site-packages on sys.path itself; called through a symlink too (/usr/sbin/sendmail)."""
    marker, custom = _site_marker(venv, tmp_path)
    link = tmp_path / "sbin" / "sendmail"
    link.parent.mkdir()
    link.symlink_to(venv / "bin" / "sendmail")
    queue = tmp_path / "queue"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYMAILTOOLS_", "PYTHON"))}
    env.update(PYMAILTOOLS_CONFIG=str(tmp_path / "none.toml"), PATH="/usr/bin:/bin",
               PYMAILTOOLS_QUEUE_DIRECTORY=str(queue), PYMAILTOOLS_DELIVERY_MODE="queue",
               PYMAILTOOLS_MAIL_SPOOL_DIRECTORY=str(tmp_path), PYMAILTOOLS_SYSLOG="no")
    (tmp_path / "none.toml").write_text("")
    try:
        for cmd in (venv / "bin" / "sendmail", link):
            p = subprocess.run([str(cmd), "-i", "user"], input=b"Subject: t\n\nbody\n",
                               capture_output=True, env=env, timeout=60)
            assert p.returncode == 0, p.stderr
        assert len(list((queue / "incoming").iterdir())) == 2
        assert not marker.exists()  # site (which imports sitecustomize) never ran
        # Other modes may need the rest of the installation: they get the standard set-up.
        p = subprocess.run([str(link), "-bp"], capture_output=True, env=env, timeout=60)
        assert p.returncode == 0, p.stderr
        assert b"2 Requests" in p.stdout
        assert marker.exists()
    finally:
        custom.unlink()


def _mail_env(tmp_path: Path) -> dict[str, str]:
    """mail's environment: no configuration, a queue of its own, a home without a .mailrc."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYMAILTOOLS_", "PYTHON")) and k not in ("MAIL", "MAILRC")}
    env.update(PYMAILTOOLS_CONFIG=str(tmp_path / "none.toml"), PATH="/usr/bin:/bin",
               HOME=str(home), PYMAILTOOLS_QUEUE_DIRECTORY=str(tmp_path / "queue"),
               PYMAILTOOLS_DELIVERY_MODE="queue", PYMAILTOOLS_SYSLOG="no")
    (tmp_path / "none.toml").write_text("")
    return env


def test_installed_mail_reads_without_site(venv: Path, tmp_path: Path) -> None:
    """mail and mailx are the same launcher: reading a mailbox from a script starts without
    `site`; sending gets the standard set-up. A symlink of another name still runs mail."""
    marker, custom = _site_marker(venv, tmp_path)
    box = tmp_path / "box"
    box.write_bytes(b"From a@example.org Thu Jan  1 00:00:00 1970\nSubject: hello\n\nbody\n")
    link = tmp_path / "bin" / "Mail"
    link.parent.mkdir()
    link.symlink_to(venv / "bin" / "mail")
    env = _mail_env(tmp_path)
    try:
        for cmd in (venv / "bin" / "mail", venv / "bin" / "mailx", link):
            p = subprocess.run([str(cmd), "-f", str(box)], input=b"x\n", capture_output=True,
                               env=env, timeout=60)
            assert p.returncode == 0, p.stderr
            assert p.stdout.startswith(f'"{box}": 1 message 1 new\n'.encode())
        assert not marker.exists()  # site (which imports sitecustomize) never ran
        p = subprocess.run([str(venv / "bin" / "mail"), "-s", "hi", "user"], input=b"body\n",
                           capture_output=True, env=env, timeout=60)
        assert p.returncode == 0, p.stderr
        assert marker.exists()
    finally:
        custom.unlink()


def test_installed_mail_sends_from_a_read_session_with_site(venv: Path, tmp_path: Path) -> None:
    """A read session started without `site` (from a script) that then sends a message gets
    the standard set-up first, as `mail user` does: sending may need the whole installation."""
    marker, custom = _site_marker(venv, tmp_path)
    box = tmp_path / "box"
    box.write_bytes(b"From a@example.org Thu Jan  1 00:00:00 1970\nSubject: hello\n\nbody\n")
    env = _mail_env(tmp_path)
    try:
        p = subprocess.run([str(venv / "bin" / "mail"), "-f", str(box)],
                           input=b"m user\nhi\nbody\n.\nx\n", capture_output=True, env=env,
                           timeout=60)
        assert p.returncode == 0, p.stderr
        assert list((tmp_path / "queue").rglob("*")), p.stdout  # the message was queued
        assert marker.exists()
    finally:
        custom.unlink()


def test_launcher_named_by_the_first_link_of_ours(tmp_path: Path) -> None:
    """A link of another name to a link named mail (as scripts/mail is, to the launcher file
    named sendmail; or a distribution's alternatives) runs mail, not sendmail: the links are
    followed one at a time, and the first of our names on the way decides."""
    box = tmp_path / "box"
    box.write_bytes(b"From a@example.org Thu Jan  1 00:00:00 1970\nSubject: hello\n\nbody\n")
    link = tmp_path / "Mail"
    link.symlink_to(ROOT / "scripts" / "mail")
    env = _mail_env(tmp_path)
    p = subprocess.run([sys.executable, str(link), "-f", str(box)], input=b"x\n",
                       capture_output=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f'"{box}": 1 message 1 new\n'.encode())
