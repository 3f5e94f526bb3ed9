"""smtpchat --pop3 and --imap against a real Dovecot serving a mailbox our MDA wrote: scripted
sessions over implicit TLS and STARTTLS, piped sessions with IMAP literals, exit codes."""

from __future__ import annotations

import base64
import grp
import io
import json
import os
import pwd
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pymailtools.chat import status
from pymailtools.config import Config
from pymailtools.local import mailbox
from tests.chat.test_smtpchat_console import PROMPT, say
from tests.conftest import _make_user, missing, script
from tests.support import dovecot
from tests.support.chat import Terminal, smtpchat
from tests.support.smtp import FaultServer, Step

PASSWORD = "chat-Secret-9"


@dataclass
class Served:
    server: dovecot.Dovecot
    user: str

    def base(self, proto: str, port: int, *args: str) -> list[str]:
        return [f"--{proto}", "127.0.0.1", str(port), *args]

    @property
    def ca(self) -> str:
        return str(self.server.certs.ca_file)


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    why = dovecot.available()
    if why:
        missing(why)
    users = _make_user()
    pw: pwd.struct_passwd = next(users)
    top = Path(tempfile.mkdtemp(prefix="pmt-chat-"))
    top.chmod(0o755)
    spool = top / "spool"
    spool.mkdir()
    os.chown(spool, 0, grp.getgrnam("mail").gr_gid)
    spool.chmod(0o2775)
    config = Config({"mail_spool_directory": str(spool), "queue_directory": str(top / "q"),
                     "deliver_lock_delay": 0, "syslog": False})
    for subject, text in (("first", b"line one\n.a dot line\n"), ("second", b"two\n")):
        msg = b"From: s@example.test\nSubject: " + subject.encode() + b"\n\n" + text
        mailbox.deliver(config, pw.pw_name, io.BytesIO(msg), sender="s@example.test",
                        recipient=f"{pw.pw_name}@host")
    try:
        # a refused login answered at once, not after Dovecot's 2 s pause
        with dovecot.dovecot_server([(pw, PASSWORD)], spool=spool,
                                    extra="auth_failure_delay = 0\n") as server:
            yield Served(server, pw.pw_name)
            assert server.errors() == []
    finally:
        shutil.rmtree(top, ignore_errors=True)
        next(users, None)


def chat(*args: str, input: bytes = b"", password: str = PASSWORD) -> tuple[int, str, str]:
    r = smtpchat(*args, input=input, env={"SMTPCHAT_AUTH_PASSWORD": password})
    assert password not in r.stdout + r.stderr  # credentials never shown
    return r.returncode, r.stdout, r.stderr


def test_pop3_scripted_over_implicit_tls(served: Served) -> None:
    s = served
    code, out, err = chat(*s.base("pop3", s.server.pop3s, "--tls-on-connect", "--tls-verify",
                                  "--tls-ca-path", s.ca, "--auth", "--auth-user", s.user,
                                  "--command", "STAT", "--command", "RETR 1"))
    assert code == status.OK, out + err
    lines = out.splitlines()
    assert "=== TLS certificate verified" in lines
    assert lines.index("<~  +OK Dovecot (Debian) ready.") > lines.index(
        "=== TLS certificate verified")
    assert " ~> AUTH PLAIN ********" in lines and "<~  +OK Logged in." in lines
    assert re.search(r"^<~  \+OK 2 \d+$", out, re.M)
    # the message our MDA delivered, as POP3 sends it (dot-stuffed), up to the lone dot
    i = lines.index(" ~> RETR 1")
    assert lines[i + 1].startswith("<~  +OK ")
    body = lines[i + 2:lines.index("<~  .", i)]
    assert f"<~  Delivered-To: {s.user}@host" in body and "<~  Subject: first" in body
    assert body[-2:] == ["<~  line one", "<~  ..a dot line"]
    assert lines[-3:] == [" ~> QUIT", "<~  +OK Logging out.",
                          "=== Connection closed with remote host."]


def test_pop3_user_pass_and_stls_by_default_port_rules(served: Served) -> None:
    s = served
    code, out, err = chat(*s.base("pop3", s.server.pop3, "--tls", "--auth", "USER",
                                  "--auth-user", s.user, "--command", "UIDL"))
    assert code == status.OK, out + err
    assert " -> STLS" in out and "=== TLS started" in out
    assert f" ~> USER {s.user}" in out and " ~> PASS ********" in out
    assert re.search(r"^<~  1 \S+\n<~  2 \S+\n<~  \.$", out, re.M)
    # shown only when asked for
    r = smtpchat(*s.base("pop3", s.server.pop3, "--tls", "--auth", "USER", "--auth-user", s.user,
                         "--show-secrets"), env={"SMTPCHAT_AUTH_PASSWORD": PASSWORD})
    assert r.returncode == status.OK and f" ~> PASS {PASSWORD}" in r.stdout.splitlines()


def test_imap_scripted_starttls_auth_and_server_literal(served: Served) -> None:
    s = served
    code, out, err = chat(*s.base("imap", s.server.imap, "--tls", "--tls-verify",
                                  "--tls-ca-path", s.ca, "--auth", "--auth-user", s.user,
                                  "--command", "EXAMINE INBOX",
                                  "--command", "FETCH 1:2 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])"))
    assert code == status.OK, out + err
    lines = out.splitlines()
    assert " -> a001 CAPABILITY" in lines and " -> a002 STARTTLS" in lines
    assert "<-  a002 OK Begin TLS negotiation now." in lines
    assert " ~> a004 AUTHENTICATE PLAIN ********" in lines  # SASL-IR: one line
    assert "<~  * 2 EXISTS" in lines
    # each literal read whole, the FETCH's closing parenthesis after it
    i = next(n for n, ln in enumerate(lines)
             if re.fullmatch(r"<~  \* 1 FETCH \(BODY\[HEADER\.FIELDS \(SUBJECT\)\] \{\d+\}", ln))
    assert lines[i + 1:i + 4] == ["<~  Subject: first", "<~  ", "<~  )"]
    assert any(ln.startswith("<~  a006 OK Fetch completed") for ln in lines)
    assert " ~> a007 LOGOUT" in lines and "<~  * BYE Logging out" in lines


def test_imap_login_and_typed_literal_in_piped_mode(served: Served) -> None:
    """Piped like nc: tags added, a typed {N} waits for "+", the N bytes (line ends
    counted) follow, the command goes on after them; exit 0 when nothing was refused."""
    s = served
    message = b"Subject: typed\r\n\r\nhello\r\n"  # 25 bytes as sent, line ends included
    script = (b"/starttls\n"
              b"LOGIN " + s.user.encode() + b" {" + str(len(PASSWORD)).encode() + b"}\n"
              + PASSWORD.encode() + b"\n"
              b"APPEND INBOX {%d}\n" % len(message) + message.replace(b"\r\n", b"\n")
              + b"\n"  # the literal took the last line end: an empty line ends the command
              b"SELECT INBOX\n"
              b"SEARCH SUBJECT typed\n"
              b"/quit\n")
    code, out, err = chat(*s.base("imap", s.server.imap), input=script)
    assert code == status.OK, out + err
    lines = out.splitlines()
    assert "a001 STARTTLS" in lines  # commands smtpchat sends for you are shown
    assert "+ OK" in lines  # the server's go-ahead for the literal
    assert re.search(r"^a002 OK .*Logged in", out, re.M)
    assert re.search(r"^a003 OK \[APPENDUID \d+ \d+\] Append completed", out, re.M)
    assert "* SEARCH" in out and "a005 OK Search completed" in out.replace(" (", "\n")
    with s.server.imap_client(s.user) as imap:
        imap.select("INBOX")
        typ, data = imap.search(None, "SUBJECT", "typed")
        (n,) = data[0].split()
        imap.store(n, "+FLAGS.SILENT", r"(\Deleted)")
        imap.expunge()
        imap.logout()


def test_refusals_give_the_step_exit_codes(served: Served) -> None:
    s = served
    tls = ("--tls-on-connect", "--tls-verify", "--tls-ca-path", s.ca)
    # a wrong password: AUTH refused (28), in each protocol; each from an address of its
    # own, as Dovecot makes an address with failed logins wait longer and longer
    def failing(n: int) -> tuple[str, str]:
        return ("--local-interface", f"127.0.0.{10 + n}")

    code, out, err = chat(*s.base("pop3", s.server.pop3s, *tls, *failing(1), "--auth", "-au",
                                  s.user), password="wrong-password-1")
    assert code == status.AUTH and "*** No authentication type succeeded" in err
    code, out, err = chat(*s.base("imap", s.server.imaps, *tls, *failing(2), "--auth", "LOGIN",
                                  "-au", s.user), password="wrong-password-2")
    assert code == status.AUTH and f' ~> a002 LOGIN "{s.user}" ********' in out
    # a refused command (30), the session still closed politely
    code, out, err = chat(*s.base("pop3", s.server.pop3s, *tls, "--auth", "-au", s.user,
                                  "--command", "RETR 99"))
    assert code == status.COMMAND and "<~* -ERR There's no message 99." in out
    assert " ~> QUIT" in out and "*** The server refused RETR" in err
    code, out, err = chat(*s.base("imap", s.server.imaps, *tls, "--auth", "-au", s.user,
                                  "--command", "SELECT NoSuchFolder"))
    assert code == status.COMMAND and " ~> a004 LOGOUT" in out
    # credentials in clear are refused before anything is sent (28)
    code, out, err = chat(*s.base("pop3", s.server.pop3, "--auth", "-au", s.user))
    assert code == status.AUTH and "Refusing to send credentials without TLS" in err
    assert " -> AUTH" not in out and "PASS" not in out
    # piped: the first refusal by its verb (PASS: 28), the session goes on
    code, out, err = chat(*s.base("pop3", s.server.pop3, *failing(3)),
                          input=b"STLS\nUSER " + s.user.encode() + b"\nPASS nope\nQUIT\n")
    assert code == status.AUTH and "-ERR [AUTH] Authentication failed." in out
    # --quit-after with an SMTP step is a usage error (1); so is --to
    assert chat(*s.base("pop3", s.server.pop3, "--quit-after", "rcpt"))[0] == status.USAGE
    assert chat(*s.base("imap", s.server.imap, "--to", "a@b.example"))[0] == status.USAGE
    code, out, err = chat(*s.base("imap", s.server.imap, "--quit-after", "banner"))
    assert code == status.OK and "* OK" in out
    assert [ln for ln in out.splitlines() if "->" in ln] == [" -> a001 LOGOUT"]


@pytest.mark.parametrize("proto", ["imap", "pop3"])
def test_a_scripted_command_the_server_continues_is_cancelled_and_its_answer_read(
        served: Served, proto: str) -> None:
    """--command "AUTHENTICATE LOGIN" (AUTH LOGIN): the server's continuation is cancelled with
    "*", which both protocols define, and the refusal that answers it is read as that
    command's; LOGOUT (QUIT) then gets its own response, not a stale one."""
    s = served
    verb, logout = ("AUTHENTICATE", "LOGOUT") if proto == "imap" else ("AUTH", "QUIT")
    port = s.server.imaps if proto == "imap" else s.server.pop3s
    code, out, err = chat(*s.base(proto, port, "--tls-on-connect", "--tls-verify",
                                  "--tls-ca-path", s.ca, "--command", f"{verb} LOGIN"))
    lines = out.splitlines()
    i = next(n for n, ln in enumerate(lines) if ln.endswith(f" {verb} LOGIN"))
    assert lines[i + 1].startswith("<~  +") and lines[i + 2] == " ~> *", out
    assert lines[i + 3].startswith("<~* " + ("a002 BAD" if proto == "imap" else "-ERR")), out
    assert lines[i + 4].endswith(f" {logout}")
    bye = "<~  * BYE Logging out" if proto == "imap" else "<~  +OK Logging out"
    assert any(ln.startswith(bye) for ln in lines[i + 5:]), out
    assert code == status.COMMAND and f"*** The server refused {verb}" in err, out + err


def test_wrong_certificate_is_one_clear_line(served: Served) -> None:
    s = served
    for proto, port, extra in (("pop3", s.server.pop3s, ["--tls-on-connect"]),
                               ("imap", s.server.imap, ["--tls"])):
        code, out, err = chat(*s.base(proto, port, *extra, "--tls-verify", "--auth",
                                      "-au", s.user, "--command", "NOOP"))
        assert code == status.TLS, out + err
        assert err.count("\n") == 1 and err.startswith("*** TLS startup failed (certificate "
                                                       "verify failed: ")
        assert "Traceback" not in err and "~>" not in out and "AUTHENTICATE" not in out


def test_imap_at_a_terminal(served: Served) -> None:
    """A person at a terminal: prompt, /starttls, the password asked without echo, tags added,
    a literal typed after the server's "+", Ctrl-D says LOGOUT."""
    s = served
    t = Terminal([script("smtpchat"), "--imap", "127.0.0.1", str(s.server.imap)])
    say(t, "/help", r"IMAP tags a001, a002")
    say(t, "/starttls", r"Ask for the capabilities again")
    say(t, "CAPABILITY", r"<~  a002 OK")
    say(t, f"/auth plain {s.user}", f"Password for {s.user}: ")
    t.send(PASSWORD)
    t.expect(r"~> a003 AUTHENTICATE PLAIN \*{8}\r?\n")  # SASL-IR offered: one line
    t.expect(r"<~  a003 OK .*Logged in")
    t.expect(f"=== Authenticated as {s.user} with PLAIN")
    say(t, "EXAMINE {5}", r"<~  \+ OK")
    t.expect(PROMPT)
    t.send("INBOX")
    t.expect(r"<~  \* 2 EXISTS")
    t.expect(r"<~  a004 OK \[READ-ONLY\]")
    say(t, "FETCH 2 BODY.PEEK[TEXT]", r"<~  \* 2 FETCH \(BODY\[TEXT\] \{5\}")
    t.expect(r"<~  two")
    t.expect(r"<~  a005 OK Fetch completed")
    t.expect(PROMPT)
    t.send_raw(b"\x04")
    t.expect(r"~> a006 LOGOUT")
    assert t.wait() == status.OK
    assert PASSWORD not in t.text


# --- servers that misbehave (a scripted peer on loopback) ---------------------------------------

IMAP_START: list[Step] = [("send", b"* OK fault.test IMAP ready\r\n"),
                          ("expect", b"a001 CAPABILITY"),
                          ("send", b"* CAPABILITY IMAP4rev1\r\na001 OK done\r\n")]
POP3_START: list[Step] = [("send", b"+OK fault.test POP3 ready\r\n"), ("expect", b"CAPA"),
                          ("send", b"-ERR no CAPA here\r\n")]


def one_line_error(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("*** ") and "Traceback" not in err, err
    return err


def test_hostile_imap_literal_and_truncated_responses() -> None:
    # a 2 GB literal is refused before reading it: one line, exit 6
    steps = IMAP_START + [("expect", b"a002 FETCH"),
                          ("send", b"* 1 FETCH (BODY[] {2147483648}\r\nFrom: x\r\n"),
                          ("sleep", 30)]
    with FaultServer(steps) as srv:
        r = smtpchat("--imap", "127.0.0.1", str(srv.port), "--command", "FETCH 1 BODY[]")
    assert r.returncode == status.CONNECTION_LOST, r.stdout + r.stderr
    assert "literal of 2147483648 bytes" in one_line_error(r.stderr)
    # the connection dropped inside a literal
    steps = IMAP_START + [("expect", b"a002 FETCH"),
                          ("garbage", b"* 1 FETCH (BODY[] {100}\r\nshort\r\n")]
    with FaultServer(steps) as srv:
        r = smtpchat("--imap", "127.0.0.1", str(srv.port), "--command", "FETCH 1 BODY[]")
    assert r.returncode == status.CONNECTION_LOST
    assert "closed connection" in one_line_error(r.stderr)
    # --json: the transcript with the class codes, and the outcome
    with FaultServer(IMAP_START + [("expect", b"a002 LOGOUT"),
                                   ("send", b"* BYE bye\r\na002 OK done\r\n")]) as srv:
        r = smtpchat("--imap", "127.0.0.1", str(srv.port), "--json")
    assert r.returncode == status.OK, r.stdout + r.stderr
    got = json.loads(r.stdout)
    assert got["exit_code"] == 0 and got["stage"] == "quit"
    assert [(e["dir"], e.get("code")) for e in got["transcript"] if e["dir"] != "info"] == [
        ("recv", 200), ("send", None), ("recv", 200), ("recv", 200), ("send", None),
        ("recv", 200), ("recv", 200)]
    # a greeting that is no greeting
    with FaultServer([("send", b"220 an SMTP server\r\n"), ("sleep", 5)]) as srv:
        r = smtpchat("--imap", "127.0.0.1", str(srv.port), "--quit-after", "banner")
    assert r.returncode == status.BANNER and "<** 220 an SMTP server" in r.stdout


def test_hostile_pop3_list_without_its_end() -> None:
    # +OK to RETR, some lines, then nothing: the step's timeout, one line, exit 6
    steps = POP3_START + [("expect", b"RETR 1"), ("send", b"+OK\r\nSubject: x\r\n\r\nbody\r\n"),
                          ("sleep", 30)]
    with FaultServer(steps) as srv:
        r = smtpchat("--pop3", "127.0.0.1", str(srv.port), "--timeout", "2",
                     "--command", "RETR 1")
    assert r.returncode == status.CONNECTION_LOST, r.stdout + r.stderr
    assert "Timeout (2 secs)" in one_line_error(r.stderr)
    assert "<** body" in r.stdout  # what came before the silence is shown
    # CAPA refused is no failure (old servers); a -ERR to the command is (30), QUIT still said
    steps = POP3_START + [("expect", b"STAT"), ("send", b"-ERR mailbox locked\r\n"),
                          ("expect", b"QUIT"), ("send", b"+OK bye\r\n")]
    with FaultServer(steps) as srv:
        r = smtpchat("--pop3", "127.0.0.1", str(srv.port), "--command", "STAT")
    assert r.returncode == status.COMMAND, r.stdout + r.stderr
    assert srv.errors == [] and srv.received[0].endswith(b"QUIT\r\n")
    # a server that goes on after "*": QUIT now would be taken as an answer, so none is sent
    steps = POP3_START + [("expect", b"AUTH LOGIN"), ("send", b"+ VXNlcm5hbWU6\r\n"),
                          ("expect", b"*"), ("send", b"+ VXNlcm5hbWU6\r\n"), ("sleep", 5)]
    with FaultServer(steps) as srv:
        r = smtpchat("--pop3", "127.0.0.1", str(srv.port), "--command", "AUTH LOGIN")
        assert r.returncode == status.CONNECTION_LOST, r.stdout + r.stderr
        assert "went on with AUTH after it was cancelled" in one_line_error(r.stderr)
        assert srv.errors == [] and srv.received[0].endswith(b"*\r\n")


def test_xoauth2_sends_the_token_once_and_reads_the_refusal() -> None:
    token = "ya29.token-value"
    initial = base64.b64encode(f"user=alice@example.test\x01auth=Bearer {token}\x01\x01"
                               .encode())

    def login(proto: str, steps: list[Step]) -> tuple[int, str, bytes]:
        with FaultServer(steps) as srv:
            code, out, err = chat(f"--{proto}", "127.0.0.1", str(srv.port), "--auth",
                                  "XOAUTH2", "-au", "alice@example.test", "--auth-plaintext",
                                  password=token)
        assert srv.errors == [], out + err + str(srv.errors)
        return code, out, srv.received[0]

    code, out, _ = login("pop3", POP3_START + [
        ("expect", b"AUTH XOAUTH2 " + initial), ("send", b"+OK welcome\r\n"),
        ("expect", b"QUIT"), ("send", b"+OK bye\r\n")])
    assert code == status.OK and " -> AUTH XOAUTH2 ********" in out
    # IMAP without SASL-IR: the token after "+"; the error details as a continuation,
    # answered with an empty line, then NO: exit 28
    code, out, sent = login("imap", [
        ("send", b"* OK fault.test IMAP ready\r\n"), ("expect", b"a001 CAPABILITY"),
        ("send", b"* CAPABILITY IMAP4rev1 AUTH=XOAUTH2\r\na001 OK done\r\n"),
        ("expect", b"a002 AUTHENTICATE XOAUTH2"), ("send", b"+ \r\n"),
        ("expect", initial), ("send", b"+ eyJzdGF0dXMiOiI0MDEifQ==\r\n"),
        ("expect", b""), ("send", b"a002 NO [AUTHENTICATIONFAILED] no\r\n"),
        ("expect", b"a003 LOGOUT"), ("send", b"* BYE bye\r\na003 OK done\r\n")])
    assert code == status.AUTH and sent.count(initial) == 1
