"""The IMAP and POP3 client sessions mail's remote folders stand on, against a private Dovecot
(summaries in batches, bodies by UID, flags, copy/append/expunge, folders; POP3 TOP, RETR,
and DELE that counts only after QUIT), and their SASL bytes against a scripted server."""

from __future__ import annotations

import base64
import io
import os
import pwd
import re
import select
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pymailtools.mua.imap import ImapSession, decode_mailbox, encode_mailbox, uid_set
from pymailtools.mua.pop3 import Pop3Session
from pymailtools.mua.remote import (
    Connection,
    Credentials,
    RemoteError,
    RemoteProtocolError,
    parse_url,
)
from pymailtools.smtp import sasl
from tests.conftest import need_tool, script
from tests.support import dovecot
from tests.support.mail import mail_env, run_mail
from tests.support.smtp import Certs, FaultServer, Step

PASSWORD = "client-pw"


@pytest.fixture
def server(open_spool: Path, config_values: dict[str, object],
           system_user: pwd.struct_passwd) -> Iterator[dovecot.Dovecot]:
    messages = [f"From: s{i}@example.test\nSubject: number {i}\n\nbody {i}\n".encode()
                for i in range(1, 8)]
    with dovecot.serving(system_user, PASSWORD, open_spool, config_values, messages) as d:
        yield d


def _creds(server: dovecot.Dovecot) -> Credentials:
    return Credentials(next(iter(server.accounts)), lambda: PASSWORD)


def _conn(server: dovecot.Dovecot, port: int, implicit: bool) -> Connection:
    ctx = ssl.create_default_context(cafile=str(server.certs.ca_file))
    return Connection("127.0.0.1", port, implicit, ctx, timeout=30)


def test_imap_session_summaries_bodies_flags_copy_expunge_append(server: dovecot.Dovecot) -> None:
    imap = ImapSession.open(_conn(server, server.imaps, True), _creds(server))
    try:
        sel = imap.select("INBOX")
        assert sel.exists == 7 and sel.uidvalidity > 0 and not sel.readonly
        uids = [a.uid for a in imap.index()]
        assert len(uids) == 7
        infos = list(imap.summaries(uids, batch=3))  # three FETCH commands
        assert [i.number for i in infos] == list(range(1, 8))
        assert infos[0].header.replace(b"\r\n", b"\n").count(b"Subject: number 1\n") == 1
        assert b"body" not in infos[0].header and infos[0].size > 0
        assert "\\Seen" not in infos[0].flags
        assert imap.body(uids[1], 1 << 20).endswith(b"body 2\r\n")
        imap.store([uids[0]], ["\\Seen"])
        assert "\\Seen" in next(imap.summaries([uids[0]])).flags
        imap.create("Archive")
        imap.copy([uids[0]], "Archive")
        imap.copy([uids[1], uids[2]], "Archive")
        imap.store([uids[1], uids[2]], ["\\Deleted"])
        imap.expunge([uids[1], uids[2]])
        assert imap.noop() == 5
        imap.append("Archive", b"From: a@example.test\nSubject: appended\n\nhi\n", ["\\Seen"])
        assert {"INBOX", "Archive"} <= set(imap.list_folders())
        imap.store([uids[3]], ["\\Deleted"])
        imap.expunge([uids[3]])
        assert imap.noop() == 4
        assert [a.uid for a in imap.index()] == uids[:1] + uids[4:]
        archive = imap.select("Archive", readonly=True)
        assert archive.exists == 4 and archive.readonly
        subjects = [i.header for i in imap.summaries([a.uid for a in imap.index()])]
        assert [s.split(b"Subject: ")[1].split(b"\r\n")[0] for s in subjects] == [
            b"number 1", b"number 2", b"number 3", b"appended"]
        with pytest.raises(RemoteError):  # a NO: the session goes on
            imap.select("No such folder")
        assert not imap.dead
        with pytest.raises(RemoteProtocolError):  # over the limit: refused unread
            imap.select("INBOX")
            imap.body(uids[0], 10)
        assert imap.dead
    finally:
        imap.close()


def test_pop3_session_top_retr_and_dele_only_on_quit(server: dovecot.Dovecot) -> None:
    conn = _conn(server, server.pop3, False)  # STLS
    pop = Pop3Session.open(conn, _creds(server))
    try:
        # STLS done, then CAPA asked again over TLS
        assert isinstance(pop.sock, ssl.SSLSocket) and "UIDL" in pop.capabilities
        assert len(pop.sizes()) == 7
        uids = pop.uidl()
        head = pop.header(2)
        assert b"Subject: number 2" in head and b"body" not in head
        out = io.BytesIO()
        pop.retr(3, out, 1 << 20)
        assert out.getvalue().endswith(b"\nbody 3\n") and b"\r" not in out.getvalue()
        pop.dele(1)
        pop.dele(2)
    finally:
        pop.close()  # no QUIT: nothing deleted
    pop = Pop3Session.open(conn, _creds(server))
    try:
        assert len(pop.sizes()) == 7
        pop.dele(1)
        pop.quit()
    finally:
        pop.close()
    pop = Pop3Session.open(conn, _creds(server))
    try:
        assert len(pop.sizes()) == 6
        assert uids[1] not in pop.uidl().values()
    finally:
        pop.close()


# -- SASL bytes ------------------------------------------------------------------------------

def test_imap_xoauth2_and_oauthbearer_bytes(tmp_path: Path) -> None:
    certs = Certs(tmp_path)
    ctx = ssl.create_default_context(cafile=str(certs.ca_file))
    for mech, caps in (("XOAUTH2", b"AUTH=XOAUTH2"), ("OAUTHBEARER", b"AUTH=OAUTHBEARER")):
        script: list[Step] = [
            ("tls", certs.server_context()),
            ("send", b"* OK [CAPABILITY IMAP4rev1 " + caps + b"] ready\r\n"),
            ("command", b"CAPABILITY"), ("send", b"* CAPABILITY IMAP4rev1 " + caps + b"\r\n"),
            ("tagged", b"OK done\r\n"),
            ("command", f"AUTHENTICATE {mech}".encode()), ("send", b"+ \r\n"),
            ("expect", b""), ("tagged", b"OK welcome\r\n")]
        with FaultServer(script) as fs:
            imap = ImapSession.open(Connection("127.0.0.1", fs.port, True, ctx),
                                    Credentials("me@example.test", lambda: "tok", token=True))
            imap.close()
        line = fs.received[0].split(b"\r\n")[2]
        raw = base64.b64decode(line)
        if mech == "XOAUTH2":
            assert raw == b"user=me@example.test\x01auth=Bearer tok\x01\x01"
        else:
            assert raw == (f"n,a=me@example.test,\x01host=127.0.0.1\x01port={fs.port}"
                           "\x01auth=Bearer tok\x01\x01").encode()


def test_pop3_xoauth2_bytes_and_a_refused_token(tmp_path: Path) -> None:
    certs = Certs(tmp_path)
    ctx = ssl.create_default_context(cafile=str(certs.ca_file))
    login: list[Step] = [("tls", certs.server_context()), ("send", b"+OK ready\r\n"),
                         ("expect", b"CAPA"), ("send", b"+OK\r\nSASL XOAUTH2\r\nUIDL\r\n.\r\n"),
                         ("expect", b"AUTH XOAUTH2"), ("send", b"+ \r\n"), ("expect", b"")]
    good = login + [("send", b"+OK welcome\r\n"), ("expect", b"QUIT"), ("send", b"+OK\r\n")]
    bad = login + [("send", b"+ eyJzdGF0dXMiOiI0MDEifQ==\r\n"), ("expect", b""),
                   ("send", b"-ERR [AUTH] token refused\r\n")]
    with FaultServer(good, bad) as fs:
        conn = Connection("127.0.0.1", fs.port, True, ctx)
        creds = Credentials("me@example.test", lambda: "tok", token=True)
        Pop3Session.open(conn, creds).quit()
        sent = fs.received[0].split(b"\r\n")
        assert base64.b64decode(sent[2]) == b"user=me@example.test\x01auth=Bearer tok\x01\x01"
        with pytest.raises(RemoteError, match="AUTH XOAUTH2 failed: -ERR \\[AUTH\\] token"):
            Pop3Session.open(conn, creds)
        assert fs.received[1].split(b"\r\n")[3] == b""  # the error challenge answered empty


def test_mailbox_names_urls_and_uid_sets() -> None:
    assert encode_mailbox("Entwürfe & Co") == "Entw&APw-rfe &- Co"
    assert decode_mailbox("Entw&APw-rfe &- Co") == "Entwürfe & Co"
    assert uid_set([5, 1, 2, 3, 9, 10]) == "1:3,5,9:10"
    url = parse_url("imaps://me%40example.com@imap.example.com:1993/Lists/pymailtools")
    assert (url.user, url.host, url.port, url.folder) == (
        "me@example.com", "imap.example.com", 1993, "Lists/pymailtools")
    assert parse_url("imap://imap.example.com").folder == "INBOX"
    assert parse_url("pop3s://me@pop.example.com").port == 995
    assert str(parse_url("pop3s://me:secret@pop.example.com")) == "pop3s://me@pop.example.com"
    assert sasl.oauthbearer("a,b=c", "t", "h", 993) == (
        b"n,a=a=2Cb=3Dc,\x01host=h\x01port=993\x01auth=Bearer t\x01\x01")
    assert sasl.oauthbearer("a,b=c", "t") == b"n,a=a=2Cb=3Dc,\x01auth=Bearer t\x01\x01"
    assert sasl.plain("u", "p") == b"\0u\0p"
    assert sasl.xoauth2("u", "t") == b"user=u\x01auth=Bearer t\x01\x01"


# -- mail -f URL: remote folders in read mode ------------------------------------------------

def _read_env(config_file: Path, tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return mail_env(config_file, home)


def _read(env: dict[str, str], server: dovecot.Dovecot, url: str, *args: str,
          input: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    user = next(iter(server.accounts))
    return run_mail(env, "-S", f"password-{user}@127.0.0.1={PASSWORD}", "-S",
                    f"tls-ca-file={server.certs.ca_file}", *args, "-f", url, input=input)


def _imap_url(server: dovecot.Dovecot) -> str:
    return f"imaps://{next(iter(server.accounts))}@127.0.0.1:{server.imaps}/INBOX"


def _pop3_url(server: dovecot.Dovecot) -> str:
    return f"pop3s://{next(iter(server.accounts))}@127.0.0.1:{server.pop3s}"


@pytest.mark.parametrize("which", ["imaps", "pop3s"])
def test_dash_H_on_a_remote_folder(config_file: Path, tmp_path: Path,
                                   server: dovecot.Dovecot, which: str) -> None:
    env = _read_env(config_file, tmp_path)
    url = _imap_url(server) if which == "imaps" else _pop3_url(server)
    r = _read(env, server, url, "-H")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert [ln.split()[-2:] for ln in lines] == [["number", str(i)] for i in range(1, 8)]
    assert all(ln[1] == "N" for ln in lines)
    assert _read(env, server, url, "-e").returncode == 0


def test_imap_read_delete_and_quit_store_flags_on_the_server(
        config_file: Path, tmp_path: Path, server: dovecot.Dovecot) -> None:
    env = _read_env(config_file, tmp_path)
    r = _read(env, server, _imap_url(server), input=b"p 1\nd 2\nx\n")
    assert r.returncode == 0 and b"body 1" in r.stdout
    lines = _read(env, server, _imap_url(server), "-H").stdout.decode().splitlines()
    # x: nothing stored, not even \Seen (bodies are fetched with BODY.PEEK); no longer \Recent
    assert len(lines) == 7 and lines[0][1] == "U"
    r = _read(env, server, _imap_url(server), input=b"p 3\nd 2\nq\n")
    assert r.returncode == 0, r.stderr
    lines = _read(env, server, _imap_url(server), "-H").stdout.decode().splitlines()
    assert [ln.split()[-1] for ln in lines] == ["1", "3", "4", "5", "6", "7"]
    assert lines[1][1] == "O"  # read: \Seen on the server


def test_pop3_delete_on_quit(config_file: Path, tmp_path: Path,
                             server: dovecot.Dovecot) -> None:
    env = _read_env(config_file, tmp_path)
    assert _read(env, server, _pop3_url(server), input=b"d 1 3\nx\n").returncode == 0
    assert len(_read(env, server, _pop3_url(server), "-H").stdout.splitlines()) == 7
    assert _read(env, server, _pop3_url(server), input=b"d 1 3\nq\n").returncode == 0
    lines = _read(env, server, _pop3_url(server), "-H").stdout.decode().splitlines()
    assert [ln.split()[-1] for ln in lines] == ["2", "4", "5", "6", "7"]


@pytest.mark.interop
@pytest.mark.parametrize("which", ["imaps", "pop3s"])
def test_snail_sees_the_same_folder(config_file: Path, tmp_path: Path,
                                    server: dovecot.Dovecot, which: str) -> None:
    """The same Dovecot mailbox through s-nail and through our mail -H: the same number of
    messages, the same subjects in the same order."""
    snail = need_tool("s-nail", "s-nail")
    env = _read_env(config_file, tmp_path)
    url = _imap_url(server) if which == "imaps" else _pop3_url(server)
    ours = _read(env, server, url, "-H").stdout.decode().splitlines()
    user = next(iter(server.accounts))
    theirs = subprocess.run(
        [snail, "-:/", "-Sv15-compat", "-Sheadline-plain",
         f"-Spassword-{user}@localhost:{url.rsplit(':', 1)[1].split('/')[0]}={PASSWORD}",
         f"-Stls-ca-file={server.certs.ca_file}",
         # s-nail matches the certificate by name only (not by IP address)
         "-Stls-ca-no-defaults", "-H", "-f", url.replace("127.0.0.1", "localhost")],
        capture_output=True, timeout=60, env=env)
    lines = theirs.stdout.decode().splitlines()
    assert len(lines) == len(ours) == 7, theirs.stderr
    assert [ln.split()[-2:] for ln in lines] == [ln.split()[-2:] for ln in ours]
    if which == "imaps":  # the date column: when the message arrived (no Date: field)
        date = re.compile(r"\w{3} \w{3} [ \d]\d \d\d:\d\d")
        assert [date.findall(ln) for ln in lines] == [date.findall(ln) for ln in ours]
        assert all(date.findall(ln) for ln in ours)


def test_record_to_an_imap_folder(config_file: Path, tmp_path: Path,
                                  server: dovecot.Dovecot) -> None:
    """-S record=imaps://…/Sent: the copy of what was sent goes there by APPEND (the folder
    created on the server's TRYCREATE), marked \\Seen."""
    env = _read_env(config_file, tmp_path)
    user = next(iter(server.accounts))
    sent = f"imaps://{user}@127.0.0.1:{server.imaps}/Sent"
    r = run_mail(env, "-s", "kept a copy", "-S", f"password-{user}@127.0.0.1={PASSWORD}",
                 "-S", f"tls-ca-file={server.certs.ca_file}", "-S", f"record={sent}", "root",
                 input=b"hello\n")
    assert r.returncode == 0, r.stderr
    lines = _read(env, server, sent, "-H").stdout.decode().splitlines()
    assert len(lines) == 1 and lines[0].endswith("kept a copy") and lines[0][1] == "O"
    # the account's warnings reach the user as mail's own, the password never shown
    in_url = sent.replace(f"{user}@", f"{user}:{PASSWORD}@")
    r = run_mail(env, "-s", "again", "-S", f"tls-ca-file={server.certs.ca_file}", "-S",
                 f"record={in_url}", "root", input=b"hello\n")
    assert r.returncode == 0, r.stderr
    (line,) = r.stderr.decode().splitlines()
    assert line.startswith("mail: warning: the password in imaps://") and PASSWORD not in line
    bad = run_mail(env, "-s", "x", "-S", "record=pop3s://me@127.0.0.1", "root", input=b"x\n")
    assert bad.returncode == 64 and b"IMAP folder" in bad.stderr


class _Reading:
    """mail -f URL on pipes: wait for its output, send commands, between them let another
    client change the server."""

    def __init__(self, env: dict[str, str], server: dovecot.Dovecot, url: str) -> None:
        user = next(iter(server.accounts))
        self.proc = subprocess.Popen(
            [script("mail"), "-S", f"password-{user}@127.0.0.1={PASSWORD}", "-S",
             f"tls-ca-file={server.certs.ca_file}", "-f", url],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.seen = b""

    def wait_for(self, text: bytes) -> bytes:
        out = self.proc.stdout
        assert out is not None
        deadline = time.monotonic() + 60
        while text not in self.seen:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([out], [], [], max(left, 0))
            assert ready, f"waited for {text!r}; mail said {self.seen!r}"
            data = os.read(out.fileno(), 65536)
            assert data, self.seen
            self.seen += data
        return self.seen

    def send(self, text: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def finish(self, text: bytes) -> tuple[int, bytes, bytes]:
        try:
            out, err = self.proc.communicate(text, timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode, self.seen + out, err


def _subjects(env: dict[str, str], server: dovecot.Dovecot, url: str) -> list[str]:
    r = _read(env, server, url, "-H")
    assert r.returncode in (0, 1), r.stderr
    return [" ".join(ln.split()[-2:]) for ln in r.stdout.decode().splitlines()]


def test_imap_delete_by_uid_after_another_client_expunged(
        config_file: Path, tmp_path: Path, server: dovecot.Dovecot) -> None:
    """Another client expunges message 1 while mail has the folder open: "d 2" then deletes
    the message listed as 2 (by its UID), not the one the server now numbers 2."""
    env = _read_env(config_file, tmp_path)
    user = next(iter(server.accounts))
    reading = _Reading(env, server, _imap_url(server))
    reading.wait_for(b"number 7")
    with server.imap_client(user) as other:
        other.select("INBOX")
        other.store("1", "+FLAGS.SILENT", r"(\Deleted)")
        other.expunge()
        other.logout()
    code, _, err = reading.finish(b"d 2\nq\n")
    assert code == 0, err
    assert _subjects(env, server, _imap_url(server)) == [f"number {i}" for i in range(3, 8)]


def test_imap_copy_move_folders_newmail_and_switching(
        config_file: Path, tmp_path: Path, server: dovecot.Dovecot) -> None:
    """c/mv to +name copy on the server (the folder created), s to a local file fetches,
    folders lists, newmail shows what another client appended, folder +name stores this
    folder's changes and opens the other; the line count is blank until a message is read."""
    env = _read_env(config_file, tmp_path)
    user = next(iter(server.accounts))
    saved = tmp_path / "saved"
    url = _imap_url(server)
    reading = _Reading(env, server, url)
    listed = reading.wait_for(b"number 7").decode().splitlines()
    assert all(" " * 5 + "/" in ln for ln in listed[1:])  # lines not known: blank
    with server.imap_client(user) as other:
        other.append("INBOX", None, None, b"From: late@example.test\r\nSubject: late one"
                     b"\r\n\r\nlate\r\n")
        other.logout()
    archive = f"imaps://{user}@127.0.0.1:{server.imaps}/Archive"
    code, out, err = reading.finish(
        f"newmail\nc 1 +Archive\nmv 2 {archive}\ns 3 {saved}\nfolders\np 4\nf 4\n"
        "folder +NoSuch\nfolder +Archive\nd 1\nq\n".encode())
    text = out.decode()
    assert code == 0, err
    assert "1 new message" in text and "late one" in text
    assert "SELECT failed" in text  # +NoSuch: INBOX stays open
    assert '"+Archive" [Copied on the server] 1 message' in text
    assert "\nArchive\n" in text and "\nINBOX\n" in text
    assert f'"{archive}": 2 messages' in text
    four = [ln for ln in text.splitlines() if ln.endswith("number 4")][-1]
    assert " " * 5 + "/" not in four  # read: its lines are known now
    assert b"Subject: number 3" in saved.read_bytes()
    # INBOX: mv removed 2 when switching away; Archive: its first message deleted on q
    assert _subjects(env, server, url) == [
        "number 1", "number 3", "number 4", "number 5", "number 6", "number 7", "late one"]
    assert _subjects(env, server, archive) == ["number 2"]


def test_imap_message_shown_with_all_its_header(config_file: Path, tmp_path: Path,
                                                server: dovecot.Dovecot) -> None:
    """p shows Reply-To and P every field of an IMAP message, not only the summary's."""
    env = _read_env(config_file, tmp_path)
    user = next(iter(server.accounts))
    with server.imap_client(user) as other:
        other.append("INBOX", None, None, b"From: a@example.test\r\nReply-To: r@example.test"
                     b"\r\nX-Extra: yes\r\nSubject: full\r\n\r\nbody\r\n")
        other.logout()
    r = _read(env, server, _imap_url(server), input=b"p 8\nP 8\nx\n")
    assert r.returncode == 0, r.stderr
    text = r.stdout.decode()
    assert "Reply-To: r@example.test" in text and "X-Extra: yes" in text


def test_pop3_has_no_folders_and_no_newmail(config_file: Path, tmp_path: Path,
                                            server: dovecot.Dovecot) -> None:
    env = _read_env(config_file, tmp_path)
    r = _read(env, server, _pop3_url(server), input=b"folders\nnewmail\nc 1 +x\nx\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(b"POP3") == 3 and b"Traceback" not in r.stdout + r.stderr


def test_save_to_an_imap_folder_by_append(config_file: Path, tmp_path: Path,
                                          server: dovecot.Dovecot) -> None:
    """From a POP3 mailbox and from a local mbox, c/s to an imaps:// URL APPENDs the
    messages there (the folder created on TRYCREATE)."""
    env = _read_env(config_file, tmp_path)
    user = next(iter(server.accounts))
    target = f"imaps://{user}@127.0.0.1:{server.imaps}/Kept"
    r = _read(env, server, _pop3_url(server), input=f"c 2 {target}\nx\n".encode())
    assert r.returncode == 0, r.stderr
    assert f'"{target}" [Appended] 1 message' in r.stdout.decode()
    local = tmp_path / "local.mbox"
    local.write_bytes(b"From a@example.test Mon Nov 16 10:00:00 2026\nFrom: a@example.test\n"
                      b"Subject: local one\n\nhi\n")
    in_url = target.replace(f"{user}@", f"{user}:{PASSWORD}@")
    r = _read(env, server, str(local), input=f"s 1 {in_url}\nx\n".encode())
    assert r.returncode == 0, r.stderr
    (line,) = r.stderr.decode().splitlines()
    assert line.startswith("mail: warning: the password in imaps://") and PASSWORD not in line
    # the confirmation names the folder without the password the URL carried
    assert f'"{target}" [Appended] 1 message' in r.stdout.decode()
    assert PASSWORD not in r.stdout.decode()
    assert _subjects(env, server, target) == ["number 2", "local one"]


@pytest.mark.parametrize("which", ["imaps", "pop3s"])
def test_a_dropped_connection_is_made_again(config_file: Path, tmp_path: Path,
                                            server: dovecot.Dovecot, which: str) -> None:
    """The server drops mail's connection: the next command says so, the one after works on
    a new connection, and deletions pending at that point are stored once, on the messages
    they were made on."""
    env = _read_env(config_file, tmp_path)
    user = next(iter(server.accounts))
    url = _imap_url(server) if which == "imaps" else _pop3_url(server)
    reading = _Reading(env, server, url)
    reading.wait_for(b"number 7")
    reading.send(b"d 2\n")
    server.kick(user)
    reading.send(b"p 1\n")
    reading.wait_for(b"connects again at the next command")
    reading.send(b"p 3\n")
    reading.wait_for(b"body 3")
    server.kick(user)
    code, out, err = reading.finish(b"d 4\nq\n")
    assert code == 0, (out, err)
    assert _subjects(env, server, url) == [
        "number 1", "number 3", "number 5", "number 6", "number 7"]


@pytest.mark.interop
def test_dovecot_pseudo_message_hidden_and_kept_by_local_reading(
        config_file: Path, tmp_path: Path, server: dovecot.Dovecot) -> None:
    """An mbox Dovecot rewrote starts with its folder-internal message: mail -H -f on the
    file does not show it, and d 1 + q neither deletes nor rewrites it away; Dovecot reads
    the file afterwards without complaint."""
    env = _read_env(config_file, tmp_path)
    user = next(iter(server.accounts))
    path = server.make_pseudo_message(user, append=(
        b"From: a@example.test\nSubject: kept 1\n\none\n",
        b"From: b@example.test\nSubject: kept 2\n\ntwo\n"))
    r = run_mail(env, "-H", "-f", str(path))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert [ln.split()[-2:] for ln in lines] == [["kept", "1"], ["kept", "2"]]
    assert dovecot.PSEUDO_SUBJECT.encode() not in r.stdout
    r = run_mail(env, "-f", str(path), input=b"d 1\nq\n")
    assert r.returncode == 0, r.stderr
    data = path.read_bytes()
    first = data.split(b"\n\n", 1)[0]
    assert data.startswith(b"From ") and b"\nX-IMAP: " in first
    assert f"Subject: {dovecot.PSEUDO_SUBJECT}".encode() in first
    assert b"Subject: kept 1" not in data and b"Subject: kept 2" in data
    with server.imap_client(user) as client:
        typ, count = client.select("INBOX")
        assert typ == "OK" and count == [b"1"]
        typ, got = client.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert b"kept 2" in got[0][1]
        client.logout()
    assert server.trouble() == []
