"""The SMTP listener (sendmail -bd/-bD and -bs) driven by real clients over loopback: swaks, a
raw socket for byte-exact input (SMTP smuggling), and Postfix relaying into it."""

from __future__ import annotations

import base64
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pymailtools.smtpd import passwd as smtpd_passwd
from tests.conftest import Sendmail, need_root, need_tool, script
from tests.support.net import TIMEOUT, wait_for
from tests.support.smtpd import Client, listener, server_lines, swaks

PASSWORD = "Zp1-secret!"


@pytest.fixture
def values(config_values: dict[str, object]) -> dict[str, object]:
    return dict(config_values, delivery_mode="queue")


def entries(values: dict[str, object]) -> list[tuple[str, object, bytes]]:
    return Sendmail(Path("/nonexistent"), Path(str(values["queue_directory"]))).entries()


def transaction(c: Client, rcpt: str = "root@localhost", sender: str = "a@x.test") -> None:
    assert c.cmd("EHLO client.example").startswith("250")
    assert c.cmd(f"MAIL FROM:<{sender}>").startswith("250 2.1.0")
    assert c.cmd(f"RCPT TO:<{rcpt}>").startswith("250 2.1.5")
    assert c.cmd("DATA").startswith("354")


# --- local delivery ------------------------------------------------------------------------------

def test_swaks_to_local_user_ends_in_the_mbox(tmp_path: Path, values: dict[str, object],
                                              system_user: pwd.struct_passwd,
                                              sendmail: Sendmail) -> None:
    name = system_user.pw_name
    with listener(tmp_path, values) as lst:
        p = swaks(lst.port, "--from", "alice@remote.example", "--to", f"{name}@localhost",
                  "--ehlo", "client.example", "--header", "Subject: over smtp",
                  "--body", "hello from swaks")
        assert p.returncode == 0, p.stdout + p.stderr
        assert any(line.startswith("250 2.0.0 Ok: queued as ") for line in server_lines(p.stdout))
        assert lst.stop() == 0
    (_, env, message), = entries(values)
    assert env.sender == "alice@remote.example"
    assert [r.address for r in env.recipients] == [f"{name}@localhost"]
    first = message.split(b"\n\t", 1)[0]
    assert first == b"Received: from client.example (unknown [127.0.0.1])"
    assert b"with ESMTP id " + env.id.encode() in message
    r = sendmail("-q")
    assert r.returncode == 0, r.stderr
    mbox = (Path(str(values["mail_spool_directory"])) / name).read_bytes()
    assert b"Subject: over smtp" in mbox and b"hello from swaks" in mbox
    assert b"\r" not in mbox  # line endings normalised on the way in
    log = lst.log()
    assert "connect from unknown[127.0.0.1]" in log
    assert f"{env.id}: client=unknown[127.0.0.1]" in log
    assert "disconnect from unknown[127.0.0.1]" in log


def test_unknown_local_user_is_refused_at_rcpt(tmp_path: Path, values: dict[str, object]) -> None:
    with listener(tmp_path, values) as lst:
        c = Client(lst.port)
        assert c.greeting.startswith("220 host.example.test ESMTP")
        c.cmd("EHLO client.example")
        c.cmd("MAIL FROM:<a@x.test>")
        reply = c.cmd("RCPT TO:<nosuchuser-pmt@localhost>")
        assert reply.startswith("550 5.1.1 <nosuchuser-pmt@localhost>"), reply
        # Shell and path syntax in local parts is just an unknown user, never run
        for bad in ('"|touch /tmp/pwned"@localhost', "../../etc/passwd@localhost",
                    "${run{/bin/touch /tmp/pwned}}@localhost"):
            reply = c.cmd(f"RCPT TO:<{bad}>")
            assert reply[:1] == "5", (bad, reply)
        assert c.cmd("DATA").startswith("503")
        assert c.cmd("QUIT").startswith("221")
        c.close()
        assert "NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 550 5.1.1" in lst.log()
        # Postfix's tally: refused commands as ok/sent
        tally = "disconnect from unknown[127.0.0.1] ehlo=1 mail=1 rcpt=0/4 data=0/1 quit=1 " \
            "commands=3/8\n"
        wait_for("the disconnect line", lambda: tally in lst.log())
        assert tally in lst.log(), lst.log()
        # it said QUIT: only the readiness probe (connected, closed) was a lost connection
        assert {x for x in lst.log().splitlines() if "lost connection" in x} <= {
            "smtpd: lost connection after CONNECT from unknown[127.0.0.1]"}
    assert entries(values) == []
    assert not os.path.exists("/tmp/pwned")


# --- no open relay: clients outside mynetworks reach only our own domains ------------------------

RELAY_PROBES = [
    ("attacker@external.test", "victim@other.test"),
    ("attacker@external.test", "victim%other.test@localhost"),
    ("attacker@external.test", "other.test!victim@localhost"),
    ("attacker@external.test", "@localhost:victim@other.test"),
    ("attacker@external.test", '"victim@other.test"@localhost'),
    ("attacker@external.test", "victim@other.test."),
    ("attacker@external.test", "victim@[127.0.0.9]"),
    ("root@localhost", "victim@other.test"),  # a forged local sender grants nothing
]


def test_no_open_relay_from_outside_mynetworks(tmp_path: Path, values: dict[str, object]) -> None:
    values["mynetworks"] = ["127.0.0.1/32"]
    with listener(tmp_path, values) as lst:
        for sender, rcpt in RELAY_PROBES:
            p = swaks(lst.port, "--from", sender, "--to", rcpt, "--quit-after", "RCPT",
                      source="127.0.0.2")
            lines = server_lines(p.stdout)
            assert lines and lines[-1].startswith("221"), (rcpt, p.stdout)
            rcpt_reply = lines[-2]
            assert rcpt_reply[:1] in ("4", "5"), (sender, rcpt, rcpt_reply)
        # positive controls: local mail from outside; relaying from inside mynetworks
        p = swaks(lst.port, "--from", "attacker@external.test", "--to", "root@localhost",
                  "--quit-after", "RCPT", source="127.0.0.2")
        assert server_lines(p.stdout)[-2].startswith("250 2.1.5"), p.stdout
        p = swaks(lst.port, "--from", "me@host.example.test", "--to", "victim@other.test",
                  "--quit-after", "RCPT", source="127.0.0.1")
        assert server_lines(p.stdout)[-2].startswith("250 2.1.5"), p.stdout
        p = swaks(lst.port, "--from", "a@external.test", "--to", "victim@other.test",
                  source="127.0.0.2")
        assert "554 5.7.1 <victim@other.test>: Relay access denied" in p.stdout
        log = lst.log()
    assert entries(values) == []
    assert ("NOQUEUE: reject: RCPT from unknown[127.0.0.2]: 554 5.7.1 <victim@other.test>: "
            "Relay access denied; from=<a@external.test> to=<victim@other.test> proto=ESMTP "
            "helo=<") in log


# --- STARTTLS and AUTH ---------------------------------------------------------------------------

@pytest.fixture
def tls_values(tmp_path: Path, values: dict[str, object]) -> dict[str, object]:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1", common_name="host.example.test")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(tmp_path / "cert.pem"), append=True)
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    (tmp_path / "passwd").write_text(
        f"# smtpd users\nalice:{smtpd_passwd.hash_password(PASSWORD)}\n")
    return dict(values, mynetworks=["127.0.0.1/32"], smtpd_tls_cert_file=str(tmp_path / "cert.pem"),
                smtpd_tls_key_file=str(tmp_path / "key.pem"),
                smtpd_sasl_password_file=str(tmp_path / "passwd"))


def test_auth_over_tls_allows_relay(tmp_path: Path, tls_values: dict[str, object]) -> None:
    with listener(tmp_path, tls_values) as lst:
        p = swaks(lst.port, "-tls", "--tls-verify", "--tls-ca-path", str(tmp_path / "ca.pem"),
                  "-a", "PLAIN", "-au", "alice", "-ap", PASSWORD,
                  "--from", "alice@host.example.test", "--to", "victim@other.test",
                  source="127.0.0.2")
        assert p.returncode == 0, p.stdout + p.stderr
        lines = server_lines(p.stdout)
        assert any(x.startswith("235") for x in lines), lines
        queued = [x for x in lines if x.startswith("250 2.0.0 Ok: queued as ")]
        assert len(queued) == 1
        # a wrong password is refused and relaying stays closed
        p = swaks(lst.port, "-tls", "-a", "LOGIN", "-au", "alice", "-ap", "wrong",
                  "--from", "a@x.test", "--to", "victim@other.test", source="127.0.0.2")
        assert p.returncode != 0
        assert any(x.startswith("535") for x in server_lines(p.stdout)), p.stdout
        log = lst.log()
    (_, env, message), = entries(tls_values)
    assert [r.address for r in env.recipients] == ["victim@other.test"]
    assert b"with ESMTPSA id" in message
    assert "client=unknown[127.0.0.2], sasl_method=PLAIN, sasl_username=alice" in log
    assert "SASL LOGIN authentication failed" in log
    secrets = [PASSWORD, base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode(),
               base64.b64encode(PASSWORD.encode()).decode(), "wrong"]
    blob = log + message.decode("utf-8", "replace")
    assert not [s for s in secrets if s in blob]


def test_auth_without_tls_is_refused(tmp_path: Path, tls_values: dict[str, object]) -> None:
    with listener(tmp_path, tls_values) as lst:
        p = swaks(lst.port, "-a", "PLAIN", "-au", "alice", "-ap", PASSWORD,
                  "--from", "a@x.test", "--to", "victim@other.test", source="127.0.0.2")
        assert p.returncode != 0
        ehlo = [x for x in server_lines(p.stdout) if x.startswith("250")]
        assert any("STARTTLS" in x for x in ehlo) and not any("AUTH" in x for x in ehlo)
        c = Client(lst.port, source="127.0.0.2")
        c.cmd("EHLO client.example")
        plain = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
        assert c.cmd(f"AUTH PLAIN {plain}").startswith("538 5.7.11")
        assert c.cmd("NOOP").startswith("250")  # the session goes on, unauthenticated
        c.cmd("MAIL FROM:<a@x.test>")
        assert c.cmd("RCPT TO:<victim@other.test>").startswith("554 5.7.1")
        c.close()
        assert PASSWORD not in lst.log() and plain not in lst.log()
    assert entries(tls_values) == []


def test_a_stalled_starttls_handshake_ends_at_smtpd_timeout(
        tmp_path: Path, tls_values: dict[str, object]) -> None:
    """A client that says STARTTLS and then sends nothing, or leaves in the handshake, is
    dropped after smtpd_timeout and its connection slot is free again (asyncio's TLS layer
    tells the session nothing in either case)."""
    values = dict(tls_values, smtpd_timeout=2, smtpd_client_connection_count_limit=1,
                  mynetworks=["10.9.9.0/24"])
    with listener(tmp_path, values) as lst:
        time.sleep(0.5)  # the readiness probe's session has ended
        c = Client(lst.port)
        assert c.cmd("EHLO client.example").startswith("250")
        assert c.cmd("STARTTLS").startswith("220")
        start = time.monotonic()
        assert c.rest() == b""
        assert time.monotonic() - start < 20  # closed by the listener, not our read timeout
        c.close()
        time.sleep(0.5)
        d = Client(lst.port)
        assert d.greeting.startswith("220"), d.greeting
        assert d.cmd("EHLO client.example").startswith("250")
        assert d.cmd("STARTTLS").startswith("220")
        d.close()  # gone in the middle of the handshake
        time.sleep(4)
        e = Client(lst.port)
        assert e.greeting.startswith("220"), e.greeting
        e.close()


def test_starttls_refuses_pipelined_plaintext(tmp_path: Path,
                                              tls_values: dict[str, object]) -> None:
    """Plaintext sent along with STARTTLS (the CVE-2011-0411 injection) ends the session
    before any TLS; a STARTTLS sent alone works, and the session starts afresh in TLS."""
    import ssl

    with listener(tmp_path, tls_values) as lst:
        c = Client(lst.port, source="127.0.0.2")
        c.cmd("EHLO client.example")
        c.send(b"STARTTLS\r\nMAIL FROM:<injected@x.test>\r\n")
        assert c.reply().startswith("554 5.5.0")
        assert c.rest() == b""
        c.close()
        c = Client(lst.port, source="127.0.0.2")
        c.cmd("EHLO client.example")
        assert c.cmd("STARTTLS").startswith("220")
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        c.sock = ctx.wrap_socket(c.sock, server_hostname="localhost")
        assert c.cmd("MAIL FROM:<a@x.test>").startswith("503")  # EHLO again first
        assert "AUTH LOGIN PLAIN" in c.cmd("EHLO client.example")
        assert c.cmd("MAIL FROM:<a@x.test>").startswith("250")
        c.close()
        assert "improper command pipelining after STARTTLS from unknown[127.0.0.2]: " \
            "MAIL FROM:<injected@x.test>\\r\\n" in lst.log()


def test_improper_pipelining_is_refused(tmp_path: Path, values: dict[str, object]) -> None:
    """RFC 2920: a client may send MAIL, RCPT and DATA together after EHLO, but must wait for
    the reply to EHLO and DATA, and may not pipeline at all after HELO. A client that does not
    wait (a blind sender, or one talking before the greeting) gets 554 and is disconnected,
    with nothing queued; proper pipelining works."""
    whole = (b"MAIL FROM:<a@x.test>\r\nRCPT TO:<root@localhost>\r\nDATA\r\n"
             b"Subject: blind\r\n\r\nblind\r\n.\r\nQUIT\r\n")
    with listener(tmp_path, values) as lst:
        for before in (b"EHLO client.example\r\n", b"HELO client.example\r\n"):
            c = Client(lst.port)
            c.send(before + whole)
            assert c.reply().startswith("554 5.5.0 Error: SMTP protocol synchronization")
            assert c.rest() == b""
            c.close()
        c = Client(lst.port)
        assert c.cmd("HELO client.example").startswith("250")
        c.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<root@localhost>\r\n")
        assert c.reply().startswith("554 5.5.0")
        c.close()
        c = Client(lst.port)
        assert c.cmd("EHLO client.example").startswith("250")
        c.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<root@localhost>\r\nDATA\r\n"
               b"Subject: early\r\n\r\n.\r\n")  # content before the 354
        assert c.reply().startswith("250 2.1.0") and c.reply().startswith("250 2.1.5")
        assert c.reply().startswith("554 5.5.0")
        c.close()
        assert entries(values) == []
        c = Client(lst.port)
        assert c.cmd("EHLO client.example").startswith("250")
        c.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<root@localhost>\r\nDATA\r\n")
        assert [c.reply()[:3] for _ in range(3)] == ["250", "250", "354"]
        assert c.cmd("Subject: proper\r\n\r\nbody\r\n.").startswith("250 2.0.0 Ok: queued")
        c.close()
    (_, env, _), = entries(values)
    assert env.sender == "a@x.test"
    assert lst.log().count("improper command pipelining after ") == 4



def _proc_status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


def test_a_client_that_does_not_read_its_replies_is_held_back(
        tmp_path: Path, values: dict[str, object]) -> None:
    """A client pipelining commands without reading the replies: once they fill the socket,
    the listener stops reading (its memory does not grow with the client's commands) and
    then answers every command, in order, as the client reads."""
    import threading

    cap = 32 << 20  # what a listener without flow control would take in (and buffer)
    with listener(tmp_path, dict(values, smtpd_workers=1)) as lst:
        pid = lst.proc.pid
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (fills sooner)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        s.settimeout(TIMEOUT)
        s.connect(("127.0.0.1", lst.port))
        c = Client.__new__(Client)
        c.sock, c.buf = s, b""
        assert c.reply().startswith("220")
        assert c.cmd("EHLO client.example").startswith("250")
        before = _proc_status(pid, "VmRSS")
        s.setblocking(False)
        rset = b"RSET\r\n"
        chunk = rset * 1000
        sent, last = 0, time.monotonic()
        while sent < cap and time.monotonic() - last < 2:
            try:
                sent += s.send(chunk[sent % len(rset):])
                last = time.monotonic()
            except BlockingIOError:
                time.sleep(0.01)
        ticks, deadline = -1, time.monotonic() + 30
        while ticks != (ticks := _cpu_ticks(pid)) and time.monotonic() < deadline:
            time.sleep(1)  # until the listener has stopped working through what it read
        grown = (_proc_status(pid, "VmRSS") - before) << 10
        s.setblocking(True)
        s.settimeout(TIMEOUT)
        got = bytearray()

        def read() -> None:
            while data := s.recv(1 << 20):
                got.extend(data)

        t = threading.Thread(target=read)
        t.start()
        s.sendall(rset[sent % len(rset):] + b"QUIT\r\n" if sent % len(rset) else b"QUIT\r\n")
        t.join(120)
        s.close()
    assert sent < cap
    assert grown < 8 << 20
    lines = bytes(got).split(b"\r\n")
    assert lines[:-2] == [b"250 2.0.0 Ok"] * -(-sent // len(rset))
    assert lines[-2].startswith(b"221 ") and lines[-1] == b""

# --- SMTP smuggling: only <CRLF>.<CRLF> ends DATA, bare LF or CR never does ---------------------

SMUGGLING = {
    "LF.LF": b"\n.\n",
    "LF.CRLF": b"\n.\r\n",
    "CR.CR": b"\r.\r",
    "CRLF.LF": b"\r\n.\n",
    "CRLF.CR": b"\r\n.\r",
    "CR.CRLF": b"\r.\r\n",
    "bare LF": b"\n",
    "bare CR": b"\r",
}
SMUGGLED = (b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<root@localhost>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nsmuggled\r\n")


def smuggling_data(ending: bytes) -> bytes:
    return b"Subject: first\r\n\r\nhello" + ending + SMUGGLED + b".\r\n"


@pytest.mark.parametrize("name", list(SMUGGLING))
def test_smuggling_is_rejected_by_the_listener(tmp_path: Path, values: dict[str, object],
                                               name: str) -> None:
    with listener(tmp_path, values) as lst:
        c = Client(lst.port)
        transaction(c)
        c.send(smuggling_data(SMUGGLING[name]) + b"QUIT\r\n")
        reply = c.reply()
        assert reply.startswith("521 5.5.2 host.example.test Error: bare <"), reply
        assert c.rest() == b""  # disconnected: nothing after the dot is read as commands
        c.close()
    assert entries(values) == []


@pytest.mark.parametrize("name", list(SMUGGLING))
def test_smuggling_normalized_is_one_message(tmp_path: Path, values: dict[str, object],
                                             name: str) -> None:
    values["smtpd_forbid_bare_newline"] = "normalize"
    with listener(tmp_path, values) as lst:
        c = Client(lst.port)
        transaction(c)
        c.send(smuggling_data(SMUGGLING[name]))
        assert c.reply().startswith("250 2.0.0 Ok: queued as ")
        assert c.cmd("QUIT").startswith("221")
        c.close()
    (_, env, message), = entries(values)
    assert env.sender == "a@x.test"
    assert b"\r" not in message and b"smuggled" in message


@pytest.mark.parametrize("name", list(SMUGGLING))
def test_smuggling_on_stdin_is_one_message(values: dict[str, object], sendmail: Sendmail,
                                           name: str) -> None:
    session = (b"EHLO client.example\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<root@localhost>\r\n"
               b"DATA\r\n" + smuggling_data(SMUGGLING[name]) + b"QUIT\r\n")
    r = sendmail("-bs", input=session)
    assert r.returncode == 0, r.stderr
    replies = r.stdout.split(b"\r\n")
    assert sum(1 for x in replies if x.startswith(b"250 2.0.0 Ok: queued as ")) == 1
    assert replies[-2] == b"221 2.0.0 Bye"
    (_, env, message), = sendmail.entries()
    assert env.sender == "a@x.test" and b"\r" not in message


# --- sendmail -bs -----------------------------------------------------------------------------

def test_bs_conversation_like_postfix(sendmail: Sendmail) -> None:
    session = (b"EHLO client.example\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<root@localhost>\r\n"
               b"DATA\r\nSubject: hi\r\n\r\nbody\r\n..leading dot\r\n.\r\nQUIT\r\n")
    r = sendmail("-bs", input=session)
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith(b"\r\n") and b"\n" not in r.stdout.replace(b"\r\n", b"")
    lines = r.stdout.decode().split("\r\n")[:-1]
    assert lines[0] == "220 host.example.test ESMTP pymailtools"
    assert lines[1] == "250-host.example.test"
    ehlo = [x[4:] for x in lines[1:] if x.startswith("250") and lines.index(x) < 9]
    for ext in ("PIPELINING", "SIZE 10240000", "ENHANCEDSTATUSCODES", "8BITMIME"):
        assert ext in ehlo
    assert "STARTTLS" not in r.stdout.decode() and "AUTH" not in r.stdout.decode()
    tail = lines[-5:]
    assert tail[0] == "250 2.1.0 Ok" and tail[1] == "250 2.1.5 Ok"
    assert tail[2] == "354 End data with <CR><LF>.<CR><LF>"
    assert tail[3].startswith("250 2.0.0 Ok: queued as ") and tail[4] == "221 2.0.0 Bye"
    (_, env, message), = sendmail.entries()
    assert tail[3].endswith(env.id)
    assert message.endswith(b"\n\nbody\n.leading dot\n") and b"\nSubject: hi\n" in message
    assert message.startswith(b"Received: from client.example\n\tby host.example.test "
                              b"(pymailtools, from userid ")


def test_bs_pipelined_input_then_eof_is_answered_in_full(sendmail: Sendmail) -> None:
    # No QUIT: the session ends at end of input, after every command read was answered.
    session = (b"HELO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<root@localhost>\r\nDATA\r\n"
               b"x\r\n.\r\nMAIL FROM:<b@x.test>\r\nRCPT TO:<root@localhost>\r\nDATA\r\n"
               b"y\r\n.\r\n")
    r = sendmail("-bs", input=session)
    assert r.returncode == 0
    assert r.stdout.count(b"Ok: queued as") == 2
    assert sorted(e.sender for _, e, _ in sendmail.entries()) == ["a@x.test", "b@x.test"]


def test_bs_ends_at_end_of_input_after_a_line_without_crlf(sendmail: Sendmail) -> None:
    """A last line without its CRLF can never become a command: the session ends with the
    input, not smtpd_timeout later."""
    start = time.monotonic()
    r = sendmail("-bs", input=b"EHLO x\r\nNOOP", timeout=30)
    assert r.returncode == 0
    assert b"250 SMTPUTF8" in r.stdout and b"250 2.0.0 Ok" not in r.stdout
    assert time.monotonic() - start < 20


def test_bs_rejects_recipients_on_the_command_line(sendmail: Sendmail) -> None:
    r = sendmail("-bs", "root@localhost")
    assert r.returncode != 0
    assert b"stand-alone mode requires no recipient" in r.stderr


# --- limits: size, recipients, errors, connections, timeouts ------------------------------------

def test_size_limit(tmp_path: Path, values: dict[str, object]) -> None:
    values["message_size_limit"] = 2000
    with listener(tmp_path, values) as lst:
        c = Client(lst.port)
        assert "250-SIZE 2000" in c.cmd("EHLO client.example")
        assert c.cmd("MAIL FROM:<a@x.test> SIZE=999999999").startswith("552 5.3.4")
        c.cmd("MAIL FROM:<a@x.test> SIZE=100")
        c.cmd("RCPT TO:<root@localhost>")
        c.cmd("DATA")
        reply = c.cmd(b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" * 1 + (b"y" * 70 + b"\r\n") * 40
                      + b".\r\n")
        assert reply.startswith("552 5.3.4"), reply
        # the session is still usable: a small message goes through
        c.cmd("MAIL FROM:<a@x.test>")
        c.cmd("RCPT TO:<root@localhost>")
        c.cmd("DATA")
        assert c.cmd(b"Subject: small\r\n\r\nok\r\n.\r\n").startswith("250 2.0.0")
        c.close()
    (_, _, message), = entries(values)
    assert b"Subject: small" in message


def test_recipient_and_error_limits(tmp_path: Path, values: dict[str, object]) -> None:
    # (no overshoot: the first 452 is an error at once; see the overshoot tests below)
    values.update(smtpd_recipient_limit=3, smtpd_recipient_overshoot_limit=0,
                  smtpd_error_limit=4)
    with listener(tmp_path, values) as lst:
        c = Client(lst.port)
        c.cmd("EHLO client.example")
        c.cmd("MAIL FROM:<a@x.test>")
        for _ in range(3):
            assert c.cmd("RCPT TO:<root@localhost>").startswith("250")
        assert c.cmd("RCPT TO:<root@localhost>").startswith("452 4.5.3")
        assert c.cmd("BOGUS").startswith("500")
        assert c.cmd("MAIL FROM:<b@x.test>").startswith("503")
        last = c.cmd("VRFY")  # fourth error: answered, then 421 and the connection closes
        assert last.startswith("501"), last
        assert c.reply().startswith("421 4.7.0")
        assert c.rest() == b""
        c.close()
        assert "too many errors from unknown[127.0.0.1]" in lst.log()


def test_a_long_recipient_list_sent_one_at_a_time_is_taken_in_part(
        tmp_path: Path, values: dict[str, object]) -> None:
    """smtplib sends each RCPT and waits for its reply: past smtpd_recipient_limit it gets
    452 4.5.3 for the rest (its "send these later"), and DATA for the ones taken, as from
    Postfix; those 452s are not errors that end the session (smtpd_error_limit, 20)."""
    import smtplib

    rcpts = [f"user{i:04d}@remote.example" for i in range(1100)]
    with listener(tmp_path, values) as lst:
        with smtplib.SMTP("127.0.0.1", lst.port, timeout=TIMEOUT) as s:
            refused = s.sendmail("list@x.test", rcpts,
                                 b"Subject: the list\r\n\r\nto everyone\r\n")
            assert sorted(refused) == rcpts[1000:]
            assert set(refused.values()) == {(452, b"4.5.3 Error: too many recipients")}
            # the connection is still there for the next transaction
            assert s.noop()[0] == 250
            refused = s.sendmail("list@x.test", rcpts[1000:], b"Subject: the rest\r\n\r\nx\r\n")
            assert refused == {}
        log = lst.log()
    assert "too many errors" not in log, log
    assert " rcpt=1200 " in log, log  # the 452s within the overshoot limit are no refusals
    first, rest = sorted((e for e in entries(values)), key=lambda e: len(e[1].recipients),
                         reverse=True)
    assert [r.address for r in first[1].recipients] == rcpts[:1000]
    assert b"Subject: the list" in first[2]
    assert [r.address for r in rest[1].recipients] == rcpts[1000:]


# RCPT after RCPT past smtpd_recipient_limit=3: five 452s free (the overshoot limit), then each
# counts toward smtpd_error_limit=4, whose fourth ends the session: what Postfix's smtpd answers
# with the same settings (smtpd_hard_error_limit), checked against one below.
OVERSHOOT = ["250 2.1.5"] * 3 + ["452 4.5.3"] * 9 + ["421 4.7.0"]


def overshoot_replies(port: int) -> list[str]:
    c = Client(port)
    assert c.cmd("EHLO client.example").startswith("250")
    assert c.cmd("MAIL FROM:<list@x.test>").startswith("250 2.1.0")
    replies = [c.cmd(f"RCPT TO:<user{i}@remote.example>") for i in range(12)]
    replies.append(c.reply())  # the 421 comes unasked, right after the twelfth reply
    assert c.rest() == b""  # and then the connection closes
    c.close()
    return [r[:9] for r in replies]


def test_recipient_overshoot_then_counts_toward_the_error_limit(
        tmp_path: Path, values: dict[str, object]) -> None:
    values.update(smtpd_recipient_limit=3, smtpd_recipient_overshoot_limit=5,
                  smtpd_error_limit=4)
    with listener(tmp_path, values) as lst:
        assert overshoot_replies(lst.port) == OVERSHOOT
        # the overshoot is per transaction: a new MAIL gets its five free 452s again
        c = Client(lst.port)
        c.cmd("EHLO client.example")
        for sender in ("a@x.test", "b@x.test"):
            assert c.cmd(f"MAIL FROM:<{sender}>").startswith("250")
            for i in range(8):
                assert c.cmd(f"RCPT TO:<u{i}@remote.example>")[:3] == ("250" if i < 3 else "452")
            assert c.cmd("RSET").startswith("250")
        assert c.cmd("QUIT").startswith("221")
        c.close()
        log = lst.log()
    assert "too many errors from unknown[127.0.0.1]" in log
    assert "rcpt=8/12" in log, log  # as Postfix tallies it: the free 452s are no failures


def test_recipient_overshoot_like_postfix(tmp_path: Path, values: dict[str, object]) -> None:
    need_tool("postfix", "postfix")
    need_root()
    from tests.support.postfix import postfix_instance
    from tests.support.smtp import Certs

    extra = ("smtpd_recipient_limit = 3\nsmtpd_recipient_overshoot_limit = 5\n"
             "smtpd_hard_error_limit = 4\nsmtpd_soft_error_limit = 100\n")
    values.update(smtpd_recipient_limit=3, smtpd_recipient_overshoot_limit=5,
                  smtpd_error_limit=4)
    with listener(tmp_path, values) as lst, postfix_instance(Certs(tmp_path), extra) as pport:
        assert overshoot_replies(lst.port) == overshoot_replies(pport) == OVERSHOOT


def test_connection_count_limit_and_timeout(tmp_path: Path, values: dict[str, object]) -> None:
    values.update(smtpd_client_connection_count_limit=2, smtpd_timeout=2,
                  mynetworks=["10.9.9.0/24"])  # loopback clients would not be counted
    with listener(tmp_path, values) as lst:
        time.sleep(0.5)  # the readiness probe's session has ended
        a, b = Client(lst.port), Client(lst.port)
        c = Client.__new__(Client)
        import socket

        c.sock = socket.create_connection(("127.0.0.1", lst.port), timeout=TIMEOUT)
        c.buf = b""
        assert c.reply().startswith("421 4.7.0 host.example.test Error: too many connections")
        assert c.rest() == b""
        # slow loris: a command line that never ends is cut off after smtpd_timeout
        start = time.monotonic()
        a.send(b"EHLO sl")
        assert a.rest() == b""
        assert time.monotonic() - start < 30
        b.close()
        time.sleep(0.5)
        d = Client(lst.port)  # the slots are free again
        # each command moves the deadline: a session busy for longer than smtpd_timeout stays
        for _ in range(6):
            assert d.cmd("NOOP").startswith("250")
            time.sleep(0.6)
        start = time.monotonic()  # then, idle, it is closed about smtpd_timeout later
        assert d.rest() == b""
        assert 0.8 < time.monotonic() - start < 4.0
        d.close()
        # Postfix's lines for sessions that end without QUIT
        for line in ("timeout after CONNECT from unknown[127.0.0.1]\n",  # the slow loris
                     "timeout after NOOP from unknown[127.0.0.1]\n"):
            assert line in lst.log(), lst.log()
        c = Client(lst.port)
        transaction(c)
        c.send(b"Subject: half\r\n")
        c.close()
        wait_for("the lost connection", lambda: "lost connection after DATA" in lst.log())
        assert "lost connection after DATA from unknown[127.0.0.1]\n" in lst.log()


def test_connections_closed_at_once_free_their_slots(tmp_path: Path,
                                                    values: dict[str, object]) -> None:
    """A client that connects and closes straight away (a port probe) gives its slot back at
    once, not after smtpd_timeout; clients in mynetworks are not counted at all."""
    values.update(smtpd_client_connection_count_limit=2, smtpd_timeout=120,
                  mynetworks=["10.9.9.0/24"])
    with listener(tmp_path, values) as lst:
        time.sleep(0.5)  # the readiness probe's session has ended
        for _ in range(3):
            socket.create_connection(("127.0.0.1", lst.port), timeout=TIMEOUT).close()
        time.sleep(1)
        a, b = Client(lst.port), Client(lst.port)
        assert a.greeting.startswith("220") and b.greeting.startswith("220"), b.greeting
        assert Client(lst.port).greeting.startswith("421 4.7.0")  # the limit still holds
    values["mynetworks"] = ["127.0.0.0/8"]
    with listener(tmp_path, values) as lst:
        clients = [Client(lst.port) for _ in range(4)]
        assert all(c.greeting.startswith("220") for c in clients)


def test_a_slow_message_is_not_cut_off_at_smtpd_timeout(tmp_path: Path,
                                                        values: dict[str, object]) -> None:
    """smtpd_timeout is for each wait for the client, not for the whole DATA transfer."""
    values["smtpd_timeout"] = 2
    with listener(tmp_path, values) as lst:
        c = Client(lst.port)
        transaction(c)
        c.send(b"Subject: slow\r\n\r\n")
        for i in range(8):  # 4 s in all, never 2 s idle
            time.sleep(0.5)
            c.send(b"line %d\r\n" % i)
        assert c.cmd(".").startswith("250 2.0.0 Ok: queued as ")
        c.close()
    (_, _, message), = entries(values)
    assert b"line 7\n" in message


def test_pipelined_transaction_after_a_large_message(tmp_path: Path,
                                                     values: dict[str, object]) -> None:
    """A 77 KB message, its end and the next transaction's 3,000 pipelined commands in one
    write (more than one read of the listener's): the commands run in the order sent."""
    first = b"".join(b"line %05d\r\n" % i for i in range(7000))
    values["smtpd_recipient_limit"] = 5000
    with listener(tmp_path, values) as lst:
        c = Client(lst.port)
        transaction(c)
        c.send(b"Subject: one\r\n\r\n" + first + b".\r\nMAIL FROM:<b@x.test>\r\n"
               + b"RCPT TO:<root@localhost>\r\n" * 3000 + b"DATA\r\n")
        replies = [c.reply()[:12] for _ in range(3003)]
        assert c.cmd("Subject: two\r\n\r\ntwo\r\n.").startswith("250 2.0.0 Ok: queued")
        c.close()
    assert replies == ["250 2.0.0 Ok", "250 2.1.0 Ok", *["250 2.1.5 Ok"] * 3000,
                       "354 End data"], [r for r in replies if r != "250 2.1.5 Ok"]
    messages = sorted((env.sender, message) for _, env, message in entries(values))
    assert [m[0] for m in messages] == ["a@x.test", "b@x.test"]
    assert messages[0][1].count(b"\nline ") == 7000 and messages[1][1].endswith(b"\ntwo\n")


def test_the_mail_line_limit_does_not_grow_with_ehlo(tmp_path: Path,
                                                     values: dict[str, object]) -> None:
    """aiosmtpd raises its MAIL line limit at each EHLO (for SIZE and SMTPUTF8), in a dict it
    shares between sessions: thirty EHLOs must not let a 700-byte MAIL line through."""
    line = "MAIL FROM:<a@x.test> " + "X" * 680
    with listener(tmp_path, values) as lst:
        for _ in range(3):
            other = Client(lst.port)
            for _ in range(10):
                assert other.cmd("EHLO other.example").startswith("250")
            other.close()
        c = Client(lst.port)
        for _ in range(10):
            assert c.cmd("EHLO client.example").startswith("250")
        assert c.cmd(line).startswith("500 5.5.2"), line
        assert c.cmd("MAIL FROM:<a@x.test> SMTPUTF8 SIZE=100").startswith("250 2.1.0")
        c.close()


def test_leading_from_lines_over_smtp_are_kept_as_headers(tmp_path: Path,
                                                          values: dict[str, object]) -> None:
    """Over SMTP a leading "From " line is the sender's text: kept as X-Mailbox-Line, as
    Postfix's smtpd does (sendmail on stdin drops it as an mbox envelope line)."""
    with listener(tmp_path, values) as lst:
        c = Client(lst.port)
        transaction(c)
        reply = c.cmd(b"From the desk of the CEO\r\n>From here on: secret\r\n"
                      b"Subject: memo\r\n\r\nbody\r\n.\r\n")
        assert reply.startswith("250 2.0.0 Ok: queued as ")
        c.close()
    (_, _, message), = entries(values)
    assert b"\nX-Mailbox-Line: From the desk of the CEO\nX-Mailbox-Line: >From here on: " \
        b"secret\nSubject: memo\n" in message


# --- shutdown ------------------------------------------------------------------------------------

def test_sigterm_finishes_transactions_in_flight(tmp_path: Path,
                                                 values: dict[str, object]) -> None:
    with listener(tmp_path, values) as lst:
        busy = Client(lst.port)
        transaction(busy)
        busy.send(b"Subject: in flight\r\n\r\nfirst half\r\n")
        idle = Client(lst.port)
        idle.cmd("EHLO idle.example")
        lst.drain(busy, idle)
    (_, _, message), = entries(values)
    assert message.endswith(b"first half\nsecond half\n")


def test_bd_detaches_and_bad_listen_address_is_reported(tmp_path: Path,
                                                        values: dict[str, object]) -> None:
    from tests.support.smtpd import write_config

    values["smtpd_listen"] = ["127.0.0.1:not-a-port"]
    write_config(tmp_path / "bad.toml", values)
    env = dict(os.environ, PYMAILTOOLS_CONFIG=str(tmp_path / "bad.toml"))
    r = subprocess.run([script("sendmail"), "-bd"], capture_output=True, text=True, env=env,
                       timeout=TIMEOUT)
    assert r.returncode != 0 and "smtpd_listen" in r.stderr


def environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone, or not ours to read
        return b""


@contextmanager
def daemon(config: Path) -> Iterator[int]:
    """The one detached `sendmail -bd` started with ``config``; stopped (SIGTERM) after."""
    mark = f"PYMAILTOOLS_CONFIG={config}\0".encode()
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and mark in environ(int(p))]
    try:
        assert len(pids) == 1, pids
        yield pids[0]
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + TIMEOUT
        while any(os.path.exists(f"/proc/{pid}") for pid in pids) and \
                time.monotonic() < deadline:
            time.sleep(0.05)


def test_bd_daemon_keeps_no_inherited_descriptor_or_directory(tmp_path: Path,
                                                              values: dict[str, object]) -> None:
    """`sendmail -bd 9>&1 | cat` returns: the daemon keeps none of its starter's descriptors
    but its sockets, and works in /, not in the directory it was started from."""
    from tests.support.net import free_port, wait_for_port
    from tests.support.smtpd import write_config

    port = free_port()
    values.update(smtpd_listen=[f"127.0.0.1:{port}"], smtpd_workers=1)
    write_config(tmp_path / "bd.toml", values)
    env = dict(os.environ, PYMAILTOOLS_CONFIG=str(tmp_path / "bd.toml"))
    read, write = os.pipe()
    try:
        r = subprocess.run([script("sendmail"), "-bd"], env=env, timeout=TIMEOUT, cwd=tmp_path,
                           pass_fds=(write,), capture_output=True)
        os.close(write)
        assert r.returncode == 0, r.stderr
        wait_for_port("127.0.0.1", port)
        with daemon(tmp_path / "bd.toml") as pid:
            assert os.readlink(f"/proc/{pid}/cwd") == "/"
            os.set_blocking(read, False)
            assert os.read(read, 1) == b""  # end of file: no process holds the write end
    finally:
        os.close(read)


def test_default_listen_skips_an_address_the_host_lacks(tmp_path: Path,
                                                        values: dict[str, object]) -> None:
    """With the default smtpd_listen (127.0.0.1:25 and [::1]:25) on a host without IPv6,
    -bd warns and listens on 127.0.0.1:25; a named address that is missing stays an error."""
    need_root()
    from tests.support.smtpd import write_config

    values.pop("smtpd_listen", None)
    values["smtpd_workers"] = 1
    write_config(tmp_path / "v4.toml", values)
    script_text = ("ip link set lo up && echo 1 > /proc/sys/net/ipv6/conf/lo/disable_ipv6 && "
                   f"{script('sendmail')} -bd && ss -ltnH")
    env = dict(os.environ, PYMAILTOOLS_CONFIG=str(tmp_path / "v4.toml"))
    r = subprocess.run(["unshare", "-n", "sh", "-c", script_text], env=env,
                       capture_output=True, text=True, timeout=TIMEOUT)
    with daemon(tmp_path / "v4.toml"):
        assert r.returncode == 0, r.stderr
        assert "warning: smtpd_listen: cannot listen on [::1]:25" in r.stderr
        assert "127.0.0.1:25 " in r.stdout and "[::1]:25" not in r.stdout, r.stdout
    values["smtpd_listen"] = ["127.0.0.1:2525", "[::1]:2525"]
    write_config(tmp_path / "named.toml", values)
    env["PYMAILTOOLS_CONFIG"] = str(tmp_path / "named.toml")
    r = subprocess.run(["unshare", "-n", "sh", "-c", script_text], env=env,
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 78 and "cannot listen on [::1]:2525" in r.stderr, r.stderr


def test_a_port_we_may_not_bind_is_exit_77(tmp_path: Path, values: dict[str, object]) -> None:
    """Port 25 without the capability to bind below 1024: no permission (77), not a
    configuration error."""
    need_root()
    from tests.support.smtpd import write_config

    values["smtpd_listen"] = ["127.0.0.1:25"]
    write_config(tmp_path / "low.toml", values)
    env = dict(os.environ, PYMAILTOOLS_CONFIG=str(tmp_path / "low.toml"))
    r = subprocess.run(["setpriv", "--inh-caps=-net_bind_service",
                        "--bounding-set=-net_bind_service", script("sendmail"), "-bD"],
                       env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 77, r.stderr
    assert r.stderr.count("\n") == 1 and "cannot listen on 127.0.0.1:25" in r.stderr


# --- Postfix relaying into our listener --------------------------------------------------------

def test_postfix_relays_into_our_listener(tmp_path: Path, values: dict[str, object],
                                          system_user: pwd.struct_passwd,
                                          sendmail: Sendmail) -> None:
    need_tool("postfix", "postfix")
    need_root()
    from tests.support.postfix import postfix_instance
    from tests.support.smtp import Certs

    name = system_user.pw_name
    with listener(tmp_path, values) as lst:
        extra = (f"relayhost = [127.0.0.1]:{lst.port}\ndefault_transport = smtp\n"
                 "relay_transport = smtp\nsmtp_tls_security_level = none\n")
        with postfix_instance(Certs(tmp_path), extra) as pport:
            p = swaks(pport, "--from", "sender@remote.example", "--to", f"{name}@localhost",
                      "--header", "Subject: via postfix", "--body", "relayed body")
            assert p.returncode == 0, p.stdout
            deadline = time.monotonic() + TIMEOUT
            while not entries(values) and time.monotonic() < deadline:
                time.sleep(0.2)
        log = lst.log()
    (_, env, message), = entries(values)
    assert env.sender == "sender@remote.example", log
    assert message.startswith(b"Received: from mx.example.test (unknown [127.0.0.1])")
    r = sendmail("-q")
    assert r.returncode == 0, r.stderr
    mbox = (Path(str(values["mail_spool_directory"])) / name).read_bytes()
    assert b"Subject: via postfix" in mbox and b"relayed body" in mbox


# --- the password file --------------------------------------------------------------------------

def test_password_file_round_trip(tmp_path: Path) -> None:
    entry = smtpd_passwd.hash_password(PASSWORD)
    assert PASSWORD not in entry and entry.startswith("$scrypt$")
    path = tmp_path / "passwd"
    path.write_text(f"# comment\n\nalice:{entry}\n")
    users = smtpd_passwd.load(str(path))
    assert smtpd_passwd.check(users["alice"], PASSWORD.encode())
    assert not smtpd_passwd.check(users["alice"], b"wrong")
    assert not smtpd_passwd.check(None, PASSWORD.encode())
    path.write_text(f"alice:{PASSWORD}\n")
    with pytest.raises(smtpd_passwd.PasswordFileError) as e:
        smtpd_passwd.load(str(path))
    assert PASSWORD not in str(e.value)
    made = subprocess.run([sys.executable, "-m", "pymailtools.smtpd.passwd", "bob"],
                          input=PASSWORD + "\n", capture_output=True, text=True, timeout=TIMEOUT)
    assert made.returncode == 0
    user, _, stored = made.stdout.strip().partition(":")
    assert user == "bob" and smtpd_passwd.check(stored, PASSWORD.encode())


def test_loading_the_password_module_hashes_nothing() -> None:
    # The listener and every `sendmail -bs` import it: an scrypt at import (the unknown-user
    # dummy) cost each of them ~50 ms. An unknown user is still checked as slowly as a known.
    code = ("import hashlib\ncalls = []\nreal = hashlib.scrypt\n"
            "hashlib.scrypt = lambda *a, **k: calls.append(1) or real(*a, **k)\n"
            "from pymailtools.smtpd import passwd\nbefore = len(calls)\n"
            "assert not passwd.check(None, b'secret')\nprint(before, len(calls))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert (p.returncode, p.stdout) == (0, "0 1\n"), p.stderr
