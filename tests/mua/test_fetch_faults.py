"""mail --fetch against servers that misbehave, byte by byte (a scripted server on loopback,
where Dovecot cannot misbehave on demand): each is one clear line and an exit code, nothing
deleted on the server, nothing half-stored here, no traceback."""

from __future__ import annotations

import base64
import os
import ssl
import time
from pathlib import Path

import pytest

from pymailtools.config import Config
from pymailtools.mua import fetch as fetchmod
from pymailtools.mua.remote import Connection, Credentials, RemoteLost, parse_url
from tests.conftest import write_toml
from tests.support.mail import mail_env, run_mail
from tests.support.smtp import Certs, FaultServer, Step


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path)


@pytest.fixture
def env(config_values: dict[str, object], tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    cfg = write_toml(tmp_path / "small.toml", {**config_values, "message_size_limit": 20000})
    return mail_env(cfg, home)


def _fetch(env: dict[str, str], certs: Certs, url: str) -> tuple[int, str]:
    r = run_mail(env, "-S", "password=pw", "-S", f"tls-ca-file={certs.ca_file}", "--fetch", url)
    err = r.stderr.decode()
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("mail: "), err
    return r.returncode, err


def _nothing_changed(server: FaultServer, spool: Path, *destructive: bytes) -> None:
    sent = b"".join(server.received).upper()
    for word in destructive:
        assert word not in sent
    assert not (spool / "root").exists() or (spool / "root").read_bytes() == b""
    assert server.errors == []


# -- POP3 ----------------------------------------------------------------------------------

def _pop3_login(certs: Certs) -> list[Step]:
    return [("tls", certs.server_context()), ("send", b"+OK fault POP3 ready\r\n"),
            ("expect", b"CAPA"), ("send", b"+OK\r\nUIDL\r\nUSER\r\n.\r\n"),
            ("expect", b"USER "), ("send", b"+OK\r\n"),
            ("expect", b"PASS "), ("send", b"+OK logged in\r\n")]


def _pop3_listing(size: int) -> list[Step]:
    return [("expect", b"UIDL"), ("send", b"+OK\r\n1 uid-one\r\n.\r\n"),
            ("expect", b"LIST"), ("send", f"+OK\r\n1 {size}\r\n.\r\n".encode())]


def test_pop3_server_that_lies_about_the_size(env: dict[str, str], certs: Certs,
                                              spool: Path) -> None:
    """LIST says 100 bytes; RETR sends 70 kB, over message_size_limit: cut off there."""
    script = _pop3_login(certs) + _pop3_listing(100) + [
        ("expect", b"RETR 1"), ("send", b"+OK\r\nSubject: big\r\n\r\n"
                                + (b"x" * 70 + b"\r\n") * 1000 + b".\r\n"),
        ("sleep", 5)]
    with FaultServer(script) as server:
        code, err = _fetch(env, certs, f"pop3s://u@127.0.0.1:{server.port}")
        assert code == 65, err
        assert "RETR 1 sent more than 20000 bytes" in err
        _nothing_changed(server, spool, b"DELE", b"QUIT")


def test_pop3_ok_without_terminator_times_out(config: Config, certs: Certs, spool: Path,
                                              tmp_path: Path) -> None:
    script = _pop3_login(certs) + _pop3_listing(30) + [
        ("expect", b"RETR 1"), ("send", b"+OK\r\nSubject: never ends\r\n\r\nbody\r\n"),
        ("sleep", 30)]
    with FaultServer(script) as server:
        url = parse_url(f"pop3s://u@127.0.0.1:{server.port}")
        conn = Connection.for_url(url, ssl.create_default_context(cafile=str(certs.ca_file)),
                                  timeout=1)
        started = time.monotonic()
        with pytest.raises(RemoteLost) as caught:
            fetchmod.fetch(config, url, Credentials("u", lambda: "pw"), conn, user="root",
                           keep=False, state_dir=str(tmp_path / "state"))
        assert time.monotonic() - started < 10
        assert caught.value.exit_code == 75
        assert str(caught.value) == "127.0.0.1: timed out waiting for the server"
        _nothing_changed(server, spool, b"DELE", b"QUIT")


def test_pop3_not_pop3(env: dict[str, str], certs: Certs, spool: Path) -> None:
    script: list[Step] = [("tls", certs.server_context()),
                          ("send", b"220 this is SMTP\r\n"), ("sleep", 5)]
    with FaultServer(script) as server:
        code, err = _fetch(env, certs, f"pop3s://u@127.0.0.1:{server.port}")
        assert code == 65 and "not a POP3 reply to greeting" in err, err
        _nothing_changed(server, spool)


# -- IMAP ----------------------------------------------------------------------------------

def _imap_selected(certs: Certs, exists: int = 1) -> list[Step]:
    return [("tls", certs.server_context()),
            ("send", b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN UIDPLUS] fault IMAP ready\r\n"),
            ("command", b"CAPABILITY"),
            ("send", b"* CAPABILITY IMAP4rev1 AUTH=PLAIN UIDPLUS\r\n"),
            ("tagged", b"OK done\r\n"),
            ("command", b"AUTHENTICATE PLAIN"), ("send", b"+ \r\n"), ("expect", b""),
            ("tagged", b"OK logged in\r\n"),
            ("command", b"SELECT"),
            ("send", f"* {exists} EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n".encode()),
            ("tagged", b"OK [READ-WRITE] selected\r\n")]


def _imap_listing(size: int = 30) -> list[Step]:
    return [("command", b"UID FETCH"),
            ("send", f"* 1 FETCH (UID 1 RFC822.SIZE {size})\r\n".encode()),
            ("tagged", b"OK fetched\r\n")]


def test_imap_two_gigabyte_literal_is_refused_unread(env: dict[str, str], certs: Certs,
                                                      spool: Path) -> None:
    script = _imap_selected(certs) + _imap_listing() + [
        ("command", b"UID FETCH"), ("send", b"* 1 FETCH (UID 1 BODY[] {2147483648}\r\n"),
        ("send", b"x" * 65536), ("sleep", 20)]
    with FaultServer(script) as server:
        started = time.monotonic()
        code, err = _fetch(env, certs, f"imaps://u@127.0.0.1:{server.port}/INBOX")
        assert time.monotonic() - started < 15  # refused on sight, not read or waited for
        assert code == 65, err
        assert "announced a 2147483648-byte literal, over the 20000-byte limit" in err
        _nothing_changed(server, spool, b"STORE", b"EXPUNGE")


def test_imap_malformed_fetch_response(env: dict[str, str], certs: Certs, spool: Path) -> None:
    script = _imap_selected(certs) + [
        ("command", b"UID FETCH"), ("send", b"* 1 FETCH (UID 1 RFC822.SIZE (oops)\r\n"),
        ("tagged", b"OK fetched\r\n"), ("sleep", 5)]
    with FaultServer(script) as server:
        code, err = _fetch(env, certs, f"imaps://u@127.0.0.1:{server.port}/INBOX")
        assert code == 65 and "malformed" in err, err
        _nothing_changed(server, spool, b"STORE", b"EXPUNGE")


def test_imap_exists_that_shrinks(env: dict[str, str], certs: Certs, spool: Path) -> None:
    script = _imap_selected(certs, exists=3) + [
        ("command", b"UID FETCH"), ("send", b"* 1 EXISTS\r\n* 1 FETCH (UID 1 RFC822.SIZE 30)\r\n"),
        ("tagged", b"OK fetched\r\n"), ("sleep", 5)]
    with FaultServer(script) as server:
        code, err = _fetch(env, certs, f"imaps://u@127.0.0.1:{server.port}/INBOX")
        assert code == 65, err
        assert "message count went down from 3 to 1 without EXPUNGE" in err
        _nothing_changed(server, spool, b"STORE", b"EXPUNGE")


def test_imap_body_bigger_than_announced_size_over_the_limit(
        env: dict[str, str], certs: Certs, spool: Path) -> None:
    """RFC822.SIZE says 30 bytes; the literal is 50000: refused before reading it."""
    script = _imap_selected(certs) + _imap_listing(30) + [
        ("command", b"UID FETCH"), ("send", b"* 1 FETCH (UID 1 BODY[] {50000}\r\n"),
        ("send", b"x" * 50000 + b")\r\n"), ("tagged", b"OK fetched\r\n"), ("sleep", 5)]
    with FaultServer(script) as server:
        code, err = _fetch(env, certs, f"imaps://u@127.0.0.1:{server.port}/INBOX")
        assert code == 65 and "50000-byte literal" in err, err
        _nothing_changed(server, spool, b"STORE", b"EXPUNGE")


def test_imap_connection_dropped_mid_literal(env: dict[str, str], certs: Certs,
                                             spool: Path) -> None:
    script = _imap_selected(certs) + _imap_listing(300) + [
        ("command", b"UID FETCH"), ("send", b"* 1 FETCH (UID 1 BODY[] {300}\r\n"),
        ("send", b"Subject: cut\r\n\r\nhalf"), ("close", None)]
    with FaultServer(script) as server:
        code, err = _fetch(env, certs, f"imaps://u@127.0.0.1:{server.port}/INBOX")
        assert code == 75 and "connection closed" in err
        _nothing_changed(server, spool, b"STORE", b"EXPUNGE")


def test_connection_refused_is_temporary(env: dict[str, str], certs: Certs) -> None:
    with FaultServer([("close", None)]) as server:
        port = server.port
    code, err = _fetch(env, certs, f"imaps://u@127.0.0.1:{port}/INBOX")
    assert code == 75 and "connection refused" in err


def test_bad_urls_are_usage_errors(env: dict[str, str]) -> None:
    for url in ("http://host/", "pop3s://u@host/INBOX", "imaps://", "imaps://u@host:99999/"):
        r = run_mail(env, "--fetch", url)
        assert r.returncode == 64, (url, r.stderr)
        assert r.stderr.count(b"\n") == 1 and r.stderr.startswith(b"mail: ")
    r = run_mail(env, "--keep")
    assert r.returncode == 64 and b"--keep goes with --fetch" in r.stderr


def test_a_second_fetch_of_the_same_mailbox_waits_its_turn(env: dict[str, str],
                                                           certs: Certs) -> None:
    """Overlapping cron runs: the second one stops at once (75) and touches nothing."""
    import fcntl
    import os

    state = Path(env["HOME"]) / ".local/state/pymailtools/fetch"
    state.mkdir(parents=True)
    with FaultServer([("close", None)]) as server:
        url = f"pop3s://u@127.0.0.1:{server.port}"
        name = fetchmod.State.name_for(parse_url(url))
        fd = os.open(state / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            code, err = _fetch(env, certs, url)
        finally:
            os.close(fd)
        assert code == 75 and "another mail --fetch of pop3s://u@127.0.0.1" in err
        assert server.connections == 0


def test_imap_token_command_gives_xoauth2(env: dict[str, str], certs: Certs) -> None:
    caps = b"IMAP4rev1 AUTH=XOAUTH2"
    script: list[Step] = [
        ("tls", certs.server_context()), ("send", b"* OK [CAPABILITY " + caps + b"] hi\r\n"),
        ("command", b"CAPABILITY"), ("send", b"* CAPABILITY " + caps + b"\r\n"),
        ("tagged", b"OK done\r\n"), ("command", b"AUTHENTICATE XOAUTH2"),
        ("send", b"+ \r\n"), ("expect", b""), ("tagged", b"NO [AUTHENTICATIONFAILED] no\r\n")]
    with FaultServer(script) as server:
        r = run_mail(env, "-S", "imap-auth=xoauth2", "-S",
                     "imap-auth-oauth2-token-command=printf tok-123", "-S",
                     f"tls-ca-file={certs.ca_file}", "--fetch",
                     f"imaps://me@127.0.0.1:{server.port}/INBOX")
        assert r.returncode == 69 and r.stderr.count(b"\n") == 1, r.stderr
        assert b"tok-123" not in r.stderr
        line = server.received[0].split(b"\r\n")[2]
        assert base64.b64decode(line) == b"user=me\x01auth=Bearer tok-123\x01\x01"


def test_a_failing_fetch_lock_leaves_no_descriptor_open(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import fcntl

    from pymailtools.mua.fetch import _Lock

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    before = set(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(OSError):
        _Lock(str(tmp_path / "state.lock"), "pop3://u@127.0.0.1")
    monkeypatch.undo()
    assert set(os.listdir("/proc/self/fd")) == before
