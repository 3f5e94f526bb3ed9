"""mail --fetch against a private Dovecot: POP3 and IMAP into the local mailbox through our
MDA, nothing twice, --keep, deletion only after local storage, a kill mid-fetch and a rerun,
and s-nail reading what was fetched."""

from __future__ import annotations

import imaplib
import mailbox as pymailbox
import os
import pwd
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import need_tool
from tests.support import dovecot
from tests.support.mail import mail_env, run_mail

PASSWORD = "fetch-pw-1"


@pytest.fixture
def server(open_spool: Path, config_values: dict[str, object],
           system_user: pwd.struct_passwd) -> Iterator[dovecot.Dovecot]:
    """Dovecot serving ``system_user``'s spool mbox, which holds five messages."""
    messages = [(f"From: Sender {i} <s{i}@example.test>\n"
                 f"Subject: fetched {i}\nMessage-ID: <m{i}@example.test>\n\nbody {i}\n"
                 "From here a line that needs quoting\n").encode() for i in range(1, 6)]
    with dovecot.serving(system_user, PASSWORD, open_spool, config_values, messages) as d:
        yield d


@pytest.fixture
def env(config_file: Path, tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return mail_env(config_file, home)


def _url(server: dovecot.Dovecot, kind: str) -> str:
    user = next(iter(server.accounts))
    if kind == "pop3s":
        return f"pop3s://{user}@127.0.0.1:{server.pop3s}"
    if kind == "pop3":
        return f"pop3://{user}@127.0.0.1:{server.pop3}"
    if kind == "imap":
        return f"imap://{user}@127.0.0.1:{server.imap}/INBOX"
    return f"imaps://{user}@127.0.0.1:{server.imaps}/INBOX"


def _fetch(env: dict[str, str], server: dovecot.Dovecot, kind: str, *extra: str,
           **more_env: str) -> subprocess.CompletedProcess[bytes]:
    user = next(iter(server.accounts))
    return run_mail({**env, **more_env}, "-S", f"password-{user}@127.0.0.1={PASSWORD}",
                    "-S", f"tls-ca-file={server.certs.ca_file}", "--fetch", _url(server, kind),
                    *extra)


def _subjects(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [str(m["subject"]) for m in pymailbox.mbox(str(path))]


def _on_server(server: dovecot.Dovecot) -> int:
    ctx = ssl.create_default_context(cafile=str(server.certs.ca_file))
    user = next(iter(server.accounts))
    with imaplib.IMAP4_SSL("127.0.0.1", server.imaps, ssl_context=ctx) as imap:
        imap.login(user, PASSWORD)
        typ, data = imap.select("INBOX", readonly=True)
        assert typ == "OK"
        return int(data[0] or 0)


ALL = [f"fetched {i}" for i in range(1, 6)]


@pytest.mark.parametrize("kind", ["pop3s", "imaps", "pop3", "imap"])
def test_fetch_moves_new_mail_into_the_local_mailbox(
        env: dict[str, str], server: dovecot.Dovecot, spool: Path, kind: str) -> None:
    r = _fetch(env, server, kind)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")  # quiet for cron
    local = spool / "root"
    assert _subjects(local) == ALL
    box = list(pymailbox.mbox(str(local)))
    assert box[0]["Delivered-To"] == "root@host.example.test"
    # the Return-Path Dovecot's copy carries is the envelope sender again, written once
    assert box[0].get_all("Return-Path") == ["<s@example.test>"]
    assert box[0].get_from().startswith("s@example.test ")
    # Dovecot serves the spool's mboxrd quoting as stored (">From"): we keep that text exactly
    assert box[0].get_payload() == "body 1\n>>From here a line that needs quoting\n"
    assert _on_server(server) == 0
    again = _fetch(env, server, kind)
    assert again.returncode == 0 and _subjects(local) == ALL


@pytest.mark.parametrize("kind", ["pop3s", "imaps"])
def test_keep_leaves_mail_on_the_server_and_fetches_it_once(
        env: dict[str, str], server: dovecot.Dovecot, spool: Path, kind: str) -> None:
    assert _fetch(env, server, kind, "--keep").returncode == 0
    assert _subjects(spool / "root") == ALL
    assert _on_server(server) == 5
    assert _fetch(env, server, kind, "--keep").returncode == 0
    assert _subjects(spool / "root") == ALL
    state = Path(env["HOME"]) / ".local/state/pymailtools/fetch"
    assert len([p for p in state.iterdir() if not p.name.endswith(".lock")]) == 1
    # without --keep, what was fetched before is deleted, and nothing comes twice
    assert _fetch(env, server, kind).returncode == 0
    assert _subjects(spool / "root") == ALL
    assert _on_server(server) == 0


@pytest.mark.parametrize("kind", ["pop3s", "imaps"])
def test_nothing_is_deleted_when_the_local_mailbox_refuses(
        env: dict[str, str], server: dovecot.Dovecot, spool: Path, tmp_path: Path,
        kind: str) -> None:
    (tmp_path / "elsewhere").write_text("")
    (spool / "root").symlink_to(tmp_path / "elsewhere")  # our MDA refuses a symlinked mailbox
    r = _fetch(env, server, kind)
    assert r.returncode == 75, r.stderr
    err = r.stderr.decode()
    assert err.startswith("mail: ") and err.count("\n") == 1 and "Traceback" not in err
    assert _on_server(server) == 5
    assert (tmp_path / "elsewhere").read_text() == ""


@pytest.mark.parametrize("kind", ["pop3s", "imaps"])
@pytest.mark.parametrize("point", ["stored", "recorded"])
def test_a_kill_mid_fetch_loses_nothing_and_duplicates_at_most_one(
        env: dict[str, str], server: dovecot.Dovecot, spool: Path, kind: str,
        point: str) -> None:
    killed = _fetch(env, server, kind, PYMAILTOOLS_TEST_CRASH_AT=f"fetch_{point}_2")
    assert killed.returncode == -9
    assert _subjects(spool / "root") == ALL[:2]
    assert _on_server(server) == 5  # nothing deleted: POP3 never said QUIT, IMAP never expunged
    assert _fetch(env, server, kind).returncode == 0
    got = _subjects(spool / "root")
    if point == "stored":  # delivered, not yet recorded: the one message in flight comes again
        assert got == ALL[:2] + ALL[1:]
    else:
        assert got == ALL
    assert _on_server(server) == 0


@pytest.mark.interop
def test_snail_reads_the_fetched_mailbox(env: dict[str, str], server: dovecot.Dovecot,
                                         spool: Path) -> None:
    snail = need_tool("s-nail", "s-nail")
    assert _fetch(env, server, "imaps").returncode == 0
    out = subprocess.run([snail, "-n", "-R", "-Sheadline-plain", "-H", "-f",
                          str(spool / "root")], capture_output=True, timeout=60,
                         env=env).stdout.decode()
    lines = out.splitlines()
    assert len(lines) == 5
    for line, subject in zip(lines, ALL, strict=True):
        assert line.rstrip().endswith(subject)


def test_password_in_the_url_warns(env: dict[str, str], server: dovecot.Dovecot,
                                   spool: Path) -> None:
    user = next(iter(server.accounts))
    r = run_mail(env, "-S", f"tls-ca-file={server.certs.ca_file}", "--fetch",
                 f"pop3s://{user}:{PASSWORD}@127.0.0.1:{server.pop3s}")
    assert r.returncode == 0
    assert b"visible to every user in ps(1)" in r.stderr
    assert PASSWORD.encode() not in r.stderr
    assert _subjects(spool / "root") == ALL


@pytest.mark.parametrize("kind", ["pop3s", "imaps", "imap"])
def test_a_certificate_we_do_not_trust_is_refused(env: dict[str, str], server: dovecot.Dovecot,
                                                  tmp_path: Path, kind: str) -> None:
    user = next(iter(server.accounts))
    r = run_mail(env, "-S", f"password-{user}@127.0.0.1={PASSWORD}", "-S",
                 "tls-ca-no-defaults", "-S", f"tls-ca-file={_other_ca(tmp_path)}",
                 "--fetch", _url(server, kind))
    assert r.returncode == 69
    err = r.stderr.decode()
    assert "TLS certificate not trusted" in err and err.count("\n") == 1
    assert _on_server(server) == 5


def test_wrong_password(env: dict[str, str], server: dovecot.Dovecot) -> None:
    user = next(iter(server.accounts))
    for kind in ("pop3s", "imaps"):
        r = run_mail(env, "-S", f"password-{user}@127.0.0.1=wrong", "-S",
                     f"tls-ca-file={server.certs.ca_file}", "--fetch", _url(server, kind))
        assert r.returncode == 69, r.stderr
        assert r.stderr.count(b"\n") == 1 and b"Traceback" not in r.stderr
        assert b"wrong" not in r.stderr


def _other_ca(tmp_path: Path) -> Path:
    import trustme

    path = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


@pytest.mark.parametrize("where", ["spool", "maildir"])
def test_fetch_as_an_ordinary_user(server: dovecot.Dovecot, system_user: pwd.struct_passwd,
                                   world_dir: Path, config_values: dict[str, object],
                                   where: str) -> None:
    """From cron as the user, the password in ~/.mailrc: the user's own spool mailbox, and
    the state in the user's home."""
    from pymailtools.cli import mail as mailcli
    from tests.conftest import run_as, write_toml

    local = world_dir / "local"
    local.mkdir()
    local.chmod(0o1777)
    values = {**config_values, "mail_spool_directory": str(local)}
    if where == "maildir":
        values["home_mailbox"] = "Maildir/"
    cfg = write_toml(world_dir / "config.toml", values)
    cfg.chmod(0o644)
    ca = world_dir / "ca.pem"
    ca.write_bytes(server.certs.ca_file.read_bytes())
    ca.chmod(0o644)
    rc = Path(system_user.pw_dir) / ".mailrc"
    rc.write_text(f"set tls-ca-file={ca}\nset password-{system_user.pw_name}@127.0.0.1"
                  f"={PASSWORD}\n")
    os.chown(rc, system_user.pw_uid, system_user.pw_gid)
    rc.chmod(0o600)
    argv = ["mail", "--fetch", f"imaps://127.0.0.1:{server.imaps}/INBOX"]
    assert run_as(system_user, lambda: mailcli.main(argv), config=cfg) == 0
    if where == "maildir":
        box = pymailbox.Maildir(str(Path(system_user.pw_dir) / "Maildir"), create=False)
        assert sorted(str(m["subject"]) for m in box) == ALL
        assert all(m["Delivered-To"] == f"{system_user.pw_name}@host.example.test"
                   for m in box)
    else:
        assert _subjects(local / system_user.pw_name) == ALL
        assert os.stat(local / system_user.pw_name).st_uid == system_user.pw_uid
    state = Path(system_user.pw_dir) / ".local/state/pymailtools/fetch"
    assert [p.name for p in state.iterdir() if not p.name.endswith(".lock")] == [
        f"imaps-{system_user.pw_name}@127.0.0.1-{server.imaps}-INBOX"]


@pytest.mark.parametrize("kind", ["pop3s", "imaps"])
def test_password_from_a_command(env: dict[str, str], server: dovecot.Dovecot, spool: Path,
                                 kind: str) -> None:
    proto = kind.rstrip("s")
    r = run_mail(env, "-S", f"{proto}-auth-password-command=printf {PASSWORD}", "-S",
                 f"tls-ca-file={server.certs.ca_file}", "--fetch", _url(server, kind))
    assert r.returncode == 0, r.stderr
    assert _subjects(spool / "root") == ALL
