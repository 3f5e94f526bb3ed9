"""smtpchat's scripted (swaks-like) mode against aiosmtpd and a fault server on loopback."""

from __future__ import annotations

import base64
import json
import re
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import MISSING, AuthResult

from pymailtools.chat import certinfo, compose, status
from pymailtools.chat.transcript import Transcript, escape
from pymailtools.smtp.reply import Reply, extensions, line_code
from tests.support.chat import smtpchat
from tests.support.dns import DNSServer
from tests.support.net import free_port
from tests.support.smtp import PASSWORD, Certs, FaultServer, Sink, aiosmtpd_server


def hints(out: str) -> list[str]:
    return [line[:3] for line in out.splitlines()]


# --- plain transactions ------------------------------------------------------------------------

def test_plain_transaction_transcript_and_message() -> None:
    with aiosmtpd_server() as (port, sink):
        r = smtpchat("--server", f"127.0.0.1:{port}", "--to", "bob@example.test",
                     "--from", "alice@example.org", "--ehlo", "client.test",
                     "--header", "X-Test: yes", "--body", "hello body")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"=== Trying 127.0.0.1:{port}..."
    assert lines[1] == "=== Connected to 127.0.0.1."
    assert lines[2].startswith("<-  220 ")
    assert " -> EHLO client.test" in lines
    assert any(re.fullmatch(r" -> MAIL FROM:<alice@example.org>( SIZE=\d+)?", x) for x in lines)
    assert " -> RCPT TO:<bob@example.test>" in lines
    assert "<-  354 End data with <CR><LF>.<CR><LF>" in lines
    assert " -> hello body" in lines and " -> ." in lines
    assert lines[-3:] == [" -> QUIT", "<-  221 Bye", "=== Connection closed with remote host."]
    assert r.stderr == ""
    [msg] = sink.messages
    assert msg.sender == "alice@example.org" and msg.rcpts == ["bob@example.test"]
    parsed = message_from_bytes(msg.content.replace(b"\r\n", b"\n"), policy=policy.default)
    assert parsed["To"] == "bob@example.test" and parsed["From"] == "alice@example.org"
    assert parsed["X-Test"] == "yes" and parsed["Subject"].startswith("test ")
    assert re.fullmatch(r"<[^@>]+@[^>]+>", parsed["Message-ID"])
    assert parsed["Date"] and parsed.get_content() == "hello body\n"


def test_dot_stuffing_and_data_file(tmp_path: Path) -> None:
    data = tmp_path / "msg"
    data.write_bytes(b"Subject: dots\n\n.leading dot\n..two\n.\nlast\n")
    with aiosmtpd_server() as (port, sink):
        r = smtpchat("-s", f"127.0.0.1:{port}", "-t", "bob@example.test", "--data", str(data))
    assert r.returncode == 0, r.stdout + r.stderr
    assert " -> ..leading dot" in r.stdout.splitlines()
    # The server un-stuffs: the message arrives exactly as written, with CRLF line ends.
    assert sink.messages[0].content == (
        b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\n.\r\nlast\r\n")


def test_data_tokens_and_stdin() -> None:
    with aiosmtpd_server() as (port, sink):
        r = smtpchat("-s", f"127.0.0.1:{port}", "-t", "bob@example.test", "-f", "a@example.org",
                     "-d", "-", input=b"From: %FROM_ADDRESS%\nTo: %TO_ADDRESS%\n\nhi\n")
    assert r.returncode == 0, r.stderr
    assert sink.messages[0].content == (
        b"From: a@example.org\r\nTo: bob@example.test\r\n\r\nhi\r\n")


def test_attachment_makes_multipart(tmp_path: Path) -> None:
    f = tmp_path / "report.csv"
    f.write_text("a,b\n1,2\n")
    with aiosmtpd_server() as (port, sink):
        r = smtpchat("-s", f"127.0.0.1:{port}", "-t", "bob@example.test", "--attach", str(f),
                     "--subject", "with file", "-n")
    assert r.returncode == 0, r.stderr
    assert re.search(r"^ -> \d+ lines sent$", r.stdout, re.M)
    parsed = message_from_bytes(sink.messages[0].content.replace(b"\r\n", b"\n"),
                                policy=policy.default)
    assert parsed.get_content_type() == "multipart/mixed" and parsed["Subject"] == "with file"
    [att] = list(parsed.iter_attachments())
    assert att.get_filename() == "report.csv" and att.get_content() == "a,b\n1,2\n"


def test_several_recipients_one_refused() -> None:
    sink = Sink(reject_rcpt={"nobody@example.test": "550 5.1.1 no such user"})
    with aiosmtpd_server(sink) as (port, sink):
        r = smtpchat("-s", f"127.0.0.1:{port}", "-t", "nobody@example.test,bob@example.test")
    assert r.returncode == 0, r.stdout
    assert "<** 550 5.1.1 no such user" in r.stdout.splitlines()
    assert sink.messages[0].rcpts == ["bob@example.test"]


@pytest.mark.parametrize(("sink", "code", "marker"), [
    (Sink(reject_mail="553 5.7.1 sender refused"), status.MAIL, "<** 553 5.7.1 sender refused"),
    (Sink(reject_rcpt={"bob@example.test": "450 4.2.0 greylisted"}), status.RCPT,
     "<** 450 4.2.0 greylisted"),
    (Sink(data_reply="554 5.6.0 rejected"), status.DOT, "<** 554 5.6.0 rejected"),
])
def test_refusals_map_to_swaks_exit_codes(sink: Sink, code: int, marker: str) -> None:
    with aiosmtpd_server(sink) as (port, _):
        r = smtpchat("-s", f"127.0.0.1:{port}", "-t", "bob@example.test")
    assert r.returncode == code, r.stdout
    lines = r.stdout.splitlines()
    assert marker in lines
    # After an unexpected reply smtpchat still says QUIT and reads the 221 (as swaks does).
    assert lines[-3:] == [" -> QUIT", "<-  221 Bye", "=== Connection closed with remote host."]
    assert not sink.messages or code == status.DOT


def test_quit_after_rcpt_sends_no_data() -> None:
    with aiosmtpd_server() as (port, sink):
        r = smtpchat("-s", f"127.0.0.1:{port}", "-t", "bob@example.test", "-q", "RCPT")
    assert r.returncode == 0
    assert " -> DATA" not in r.stdout and " -> RCPT TO:<bob@example.test>" in r.stdout
    assert sink.messages == []


def test_quit_after_banner_needs_no_recipient() -> None:
    with aiosmtpd_server() as (port, _):
        r = smtpchat("-s", f"127.0.0.1:{port}", "--quit-after", "banner")
    assert r.returncode == 0, r.stderr
    assert [x for x in r.stdout.splitlines() if x.startswith(" ->")] == [" -> QUIT"]


def test_quit_after_data_closes_without_sending() -> None:
    with aiosmtpd_server() as (port, sink):
        r = smtpchat("-s", f"127.0.0.1:{port}", "-t", "bob@example.test", "-q", "data")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[-3:] == ["<-  354 End data with <CR><LF>.<CR><LF>",
                          "=== Closing the connection without sending the message "
                          "(--quit-after data)", "=== Connection closed with remote host."]
    assert sink.messages == []


def test_address_family_switches() -> None:
    with aiosmtpd_server() as (port, _):
        v4 = smtpchat("-4", "-s", f"localhost:{port}", "-q", "banner")
        v6 = smtpchat("-6", "-s", f"127.0.0.1:{port}", "-q", "banner")
    assert v4.returncode == 0 and f"=== Trying localhost[127.0.0.1]:{port}..." in v4.stdout
    assert v6.returncode == status.CONNECT and v6.stderr.startswith("*** Error resolving")


def test_json_on_connect_failure() -> None:
    port = free_port()
    r = smtpchat("-s", f"127.0.0.1:{port}", "-t", "bob@example.test", "--json")
    doc = json.loads(r.stdout)
    assert r.returncode == doc["exit_code"] == status.CONNECT
    assert doc["stage"] == "connect" and doc["server"] is None and doc["tls"] is None
    assert [e["dir"] for e in doc["transcript"]] == ["info", "error"]


def test_connection_refused_is_exit_2() -> None:
    port = free_port()  # nothing listens there
    r = smtpchat("-s", f"127.0.0.1:{port}", "-t", "bob@example.test")
    assert r.returncode == status.CONNECT
    assert r.stdout.splitlines() == [f"=== Trying 127.0.0.1:{port}..."]
    assert r.stderr.startswith(f"*** Error connecting to 127.0.0.1:{port}: Connection refused")


def test_usage_errors_exit_1() -> None:
    r = smtpchat("--to", "bob@example.test", "--tls", "--tls-on-connect", "-s", "127.0.0.1")
    assert r.returncode == status.USAGE and "exclude each other" in r.stderr
    r = smtpchat("-s", "127.0.0.1", "--to", "bad\rname@example.test")
    assert r.returncode == status.USAGE and "control character" in r.stderr
    r = smtpchat("--no-such-option")
    assert r.returncode == status.USAGE and r.stderr.startswith("smtpchat: ")


def test_never_prompts_without_a_terminal() -> None:
    # A missing password must fail at once, not wait on a pipe.
    r = smtpchat("-s", "127.0.0.1:9", "-t", "bob@example.test", "-a", "-au", "alice",
                 input=None, timeout=30)
    assert r.returncode == status.USAGE
    assert "no terminal to ask on" in r.stderr


# --- TLS and AUTH ------------------------------------------------------------------------------

def test_starttls_then_auth_masks_password(certs: Certs) -> None:
    with aiosmtpd_server(certs=certs, auth=True) as (port, sink):
        r = smtpchat("-s", f"127.0.0.1:{port}", "-t", "bob@example.test", "--tls",
                     "-a", "plain", "-au", "alice", "-ap", PASSWORD)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    i = lines.index(" -> STARTTLS")
    assert lines[i + 1].startswith("<-  220")
    assert re.fullmatch(r"=== TLS started with cipher TLSv1\.[23]:\S+:\d+", lines[i + 2])
    assert any(re.fullmatch('=== TLS peer DN="/O=trustme.*/CN=mx.example.test"', x) for x in lines)
    assert any(x.startswith('=== TLS issuer DN="/O=smtpchat test CA') for x in lines)
    assert any(re.fullmatch(r"=== TLS peer certificate valid .* to \d{4}-\d\d-\d\d .*", x)
               for x in lines)
    assert " ~> EHLO " in r.stdout and " ~> AUTH PLAIN ********" in lines
    assert any(x.startswith("<~  235") for x in lines)
    assert " ~> QUIT" in lines
    assert sink.messages[0].tls
    _assert_no_secret(r.stdout + r.stderr)


def _assert_no_secret(text: str) -> None:
    # Neither the password nor its base64 forms appear anywhere: transcripts get pasted.
    for secret in (PASSWORD, base64.b64encode(b"\0alice\0" + PASSWORD.encode()).decode(),
                   base64.b64encode(PASSWORD.encode()).decode()):
        assert secret not in text


def test_auth_login_and_failed_auth(certs: Certs) -> None:
    with aiosmtpd_server(certs=certs, auth=True) as (port, _):
        ok = smtpchat("-s", f"127.0.0.1:{port}", "-t", "bob@example.test", "--tls",
                      "-a", "LOGIN", "-au", "alice", "-q", "auth",
                      env={"SMTPCHAT_AUTH_PASSWORD": PASSWORD})
        bad = smtpchat("-s", f"127.0.0.1:{port}", "-t", "bob@example.test", "--tls",
                       "-a", "plain", "-au", "alice", "-ap", "wrong-" + PASSWORD, "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert " ~> " + base64.b64encode(b"alice").decode() in ok.stdout.splitlines()
    assert " ~> ********" in ok.stdout.splitlines()
    _assert_no_secret(ok.stdout + ok.stderr)
    assert bad.returncode == status.AUTH
    doc = json.loads(bad.stdout)
    assert doc["exit_code"] == status.AUTH and doc["stage"] == "auth"
    assert doc["error"] == "No authentication type succeeded"
    assert any(e["dir"] == "recv" and e["code"] == 535 for e in doc["transcript"])
    assert doc["tls"]["version"].startswith("TLSv1.") and doc["tls"]["verified"] is False
    assert doc["tls"]["certificate"]["subject"].endswith("/CN=mx.example.test")
    _assert_no_secret(bad.stdout + bad.stderr)


class OneMoreStep(Sink):
    """AUTH LOGIN that asks for a third thing after the password (aiosmtpd answers the
    client's "*" to it with 501)."""

    async def auth_LOGIN(self, server: Any, args: list[str]) -> AuthResult:
        for prompt in ("Username:", "Password:", "And one more thing:"):
            if await server.challenge_auth(prompt) is MISSING:
                break
        return AuthResult(success=False, handled=True)


def test_a_cancelled_auth_exchange_has_its_reply_read(certs: Certs) -> None:
    """A 334 smtpchat has no answer for is cancelled with "*"; the 501 that answers the cancel
    is read, so the next mechanism's AUTH gets its own reply (and the mail goes)."""
    with aiosmtpd_server(OneMoreStep(), certs=certs, auth=True) as (port, sink):
        r = smtpchat("-s", f"127.0.0.1:{port}", "-t", "bob@example.test", "--tls",
                     "-a", "LOGIN,PLAIN", "-au", "alice", "-ap", PASSWORD)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    i = lines.index(" ~> *")
    assert lines[i + 1] == "<~* 501 5.7.0 Auth aborted"
    assert lines[i + 2] == " ~> AUTH PLAIN ********"
    assert lines[i + 3] == "<~  235 2.7.0 Authentication successful"
    assert len(sink.messages) == 1


def test_a_server_that_goes_on_after_the_cancel_gets_nothing_more() -> None:
    """A server that answers "*" with another 334 is out of step: anything sent next (another
    AUTH, QUIT) would be taken as an answer, so smtpchat says so and hangs up."""
    steps = [("send", b"220 fault.test ESMTP\r\n"), ("expect", b"EHLO"),
             ("send", b"250-fault.test\r\n250 AUTH LOGIN PLAIN\r\n"),
             ("expect", b"AUTH LOGIN"), ("send", b"334 VXNlcm5hbWU6\r\n"),
             ("expect", b"YWxpY2U="), ("send", b"334 UGFzc3dvcmQ6\r\n"),
             ("expect", b""), ("send", b"334 bW9yZQ==\r\n"),
             ("expect", b"*"), ("send", b"334 bW9yZQ==\r\n"), ("sleep", 5)]
    with FaultServer(steps) as srv:
        r = smtpchat("-s", f"127.0.0.1:{srv.port}", "-t", "bob@example.test",
                     "--auth-plaintext", "-a", "LOGIN,PLAIN", "-au", "alice", "-ap", PASSWORD)
        assert r.returncode == status.CONNECTION_LOST, r.stdout + r.stderr
        assert "The server went on with AUTH LOGIN after it was cancelled" in r.stderr
        assert srv.errors == [] and srv.received[0].endswith(b"*\r\n"), srv.received


def test_auth_refused_without_tls() -> None:
    with aiosmtpd_server(auth=True) as (port, sink):
        r = smtpchat("-s", f"127.0.0.1:{port}", "-t", "bob@example.test", "-a", "plain",
                     "-au", "alice", "-ap", PASSWORD)
        allowed = smtpchat("-s", f"127.0.0.1:{port}", "-t", "bob@example.test", "-a", "plain",
                           "-au", "alice", "-ap", PASSWORD, "--auth-plaintext")
    assert r.returncode == status.AUTH
    assert "Refusing to send credentials without TLS" in r.stderr
    assert "AUTH" not in "".join(x for x in r.stdout.splitlines() if x.startswith(" ->"))
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert len(sink.messages) == 1


def test_tls_required_but_not_offered_is_29() -> None:
    with aiosmtpd_server() as (port, sink):
        r = smtpchat("-s", f"127.0.0.1:{port}", "-t", "bob@example.test", "--tls")
        optional = smtpchat("-s", f"127.0.0.1:{port}", "-t", "bob@example.test",
                            "--tls-optional")
    assert r.returncode == status.TLS
    assert "*** Host did not advertise STARTTLS" in r.stderr
    assert optional.returncode == 0 and len(sink.messages) == 1


def test_tls_verify(certs: Certs) -> None:
    with aiosmtpd_server(certs=certs) as (port, sink):
        trusted = smtpchat("-s", f"127.0.0.1:{port}", "-t", "bob@example.test", "--tls",
                           "--tls-verify", "--tls-ca-path", str(certs.ca_file))
        untrusted = smtpchat("-s", f"127.0.0.1:{port}", "-t", "bob@example.test", "--tls",
                             "--tls-verify")
    assert trusted.returncode == 0, trusted.stdout + trusted.stderr
    assert "=== TLS certificate verified" in trusted.stdout.splitlines()
    assert untrusted.returncode == status.TLS
    assert "*** TLS startup failed (certificate verify failed" in untrusted.stderr
    assert len(sink.messages) == 1


def test_tls_on_connect(certs: Certs) -> None:
    with aiosmtpd_server(certs=certs, implicit_tls=True) as (port, sink):
        r = smtpchat("--tls-on-connect", "-s", f"127.0.0.1:{port}", "-t", "bob@example.test")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[2].startswith("=== TLS started with cipher")
    assert any(x.startswith("<~  220") for x in lines) and " ~> EHLO" in r.stdout
    assert " -> " not in r.stdout and len(sink.messages) == 1


# --- SMTPUTF8, CHUNKING, PIPELINING, raw injection (fault server) ------------------------------

def test_smtputf8_automatic_for_non_ascii_address() -> None:
    with aiosmtpd_server() as (port, sink):
        r = smtpchat("-s", f"127.0.0.1:{port}", "-t", "jörg@exämple.test", "-f", "a@example.org")
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"^ -> MAIL FROM:<a@example.org> .*SMTPUTF8$", r.stdout, re.M)
    assert sink.messages[0].rcpts == ["jörg@exämple.test"]
    assert "SMTPUTF8" in sink.messages[0].mail_options
    assert "To: jörg@exämple.test".encode() in sink.messages[0].content


def test_smtputf8_not_offered_is_23() -> None:
    with aiosmtpd_server(smtputf8=False) as (port, sink):
        r = smtpchat("-s", f"127.0.0.1:{port}", "-t", "jörg@example.test")
    assert r.returncode == status.MAIL
    assert "*** Host did not advertise SMTPUTF8" in r.stderr
    assert "MAIL FROM" not in r.stdout


EHLO_FULL = b"250-fault.test\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 SMTPUTF8\r\n"


def test_chunking_sends_bdat() -> None:
    steps = [("send", b"220 fault.test ESMTP\r\n"), ("expect", b"EHLO"), ("send", EHLO_FULL),
             ("expect", b"MAIL FROM:"), ("send", b"250 ok\r\n"), ("expect", b"RCPT TO:"),
             ("send", b"250 ok\r\n"), ("read_until", b"LAST\r\n"),
             ("read_until", b"body line\r\n"), ("send", b"250 2.0.0 chunked ok\r\n"),
             ("expect", b"QUIT"), ("send", b"221 bye\r\n")]
    with FaultServer(steps) as srv:
        r = smtpchat("-s", f"127.0.0.1:{srv.port}", "-t", "bob@example.test", "--chunking",
                     "-d", "Subject: c\n\n.body line\n")
    assert r.returncode == 0, r.stdout + r.stderr + str(srv.errors)
    # BDAT carries the message as it is: CRLF lines, no dot-stuffing, no end marker.
    assert srv.received[0].split(b"\r\n", 3)[3].startswith(
        b"BDAT 26 LAST\r\nSubject: c\r\n\r\n.body line\r\nQUIT")
    lines = r.stdout.splitlines()
    assert " -> BDAT 26 LAST" in lines and " -> .body line" in lines
    assert "<-  250 2.0.0 chunked ok" in lines


def test_pipelining_writes_commands_together() -> None:
    steps = [("send", b"220 fault.test ESMTP\r\n"), ("expect", b"EHLO"), ("send", EHLO_FULL),
             ("read_until", b"DATA\r\n"),
             ("send", b"250 ok\r\n250 ok\r\n354 go\r\n"),
             ("read_until", b"\r\n.\r\n"), ("send", b"250 queued\r\n"),
             ("expect", b"QUIT"), ("send", b"221 bye\r\n")]
    with FaultServer(steps) as srv:
        r = smtpchat("-s", f"127.0.0.1:{srv.port}", "-t", "bob@example.test", "--pipeline")
    assert r.returncode == 0, r.stdout + r.stderr + str(srv.errors)
    lines = r.stdout.splitlines()
    i = next(n for n, x in enumerate(lines) if x.startswith(" -> MAIL FROM:"))
    # swaks' pipelined layout: the three commands, then the three replies.
    assert [x[:3] for x in lines[i : i + 6]] == [" ->", " ->", " ->", "<- ", "<- ", "<- "]
    assert srv.errors == []


def test_raw_line_and_bare_lf_for_smuggling_tests() -> None:
    steps = [("send", b"220 fault.test ESMTP\r\n"), ("expect", b"EHLO"), ("send", EHLO_FULL),
             ("expect", b"MAIL"), ("send", b"250 ok\r\n"), ("expect", b"RCPT"),
             ("send", b"250 ok\r\n"), ("expect", b"DATA"), ("send", b"354 go\r\n"),
             ("read_until", b"\r\n.\r\n"), ("send", b"250 queued\r\n"),
             ("expect", b"QUIT"), ("send", b"221 bye\r\n")]
    smuggle = r"\n.\r\nMAIL FROM:<evil@example.test>\r\n"
    with FaultServer(steps) as srv:
        r = smtpchat("-s", f"127.0.0.1:{srv.port}", "-t", "bob@example.test", "--bare-lf",
                     "-d", "Subject: s\n\nbody\n", "--raw-line", smuggle)
    assert r.returncode == 0, r.stdout + r.stderr + str(srv.errors)
    data = srv.received[0].split(b"DATA\r\n", 1)[1].removesuffix(b"QUIT\r\n")
    assert data == (b"Subject: s\n\nbody\n\n.\r\nMAIL FROM:<evil@example.test>\r\n.\r\n")
    # Rule-breaking bytes are marked with swaks' "unexpected send" hint and shown escaped.
    assert "**> body\\n" in r.stdout.splitlines()
    assert "**> \\n.\\r\\nMAIL FROM:<evil@example.test>\\r\\n" in r.stdout.splitlines()


# --- what a difficult server looks like --------------------------------------------------------

def test_reply_split_across_packets_and_multiline() -> None:
    steps = [("send", b"22"), ("sleep", 0.3), ("send", b"0-fault.test first\r\n220"),
             ("sleep", 0.3), ("send", b" second line\r\n"), ("expect", b"EHLO"),
             ("send", b"250-fault.test\r\n"), ("sleep", 0.3), ("send", b"250-SIZE 1000\r\n25"),
             ("sleep", 0.3), ("send", b"0 8BITMIME\r\n"), ("expect", b"QUIT"),
             ("send", b"221 bye\r\n")]
    with FaultServer(steps) as srv:
        r = smtpchat("-s", f"127.0.0.1:{srv.port}", "-q", "ehlo")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[2:4] == ["<-  220-fault.test first", "<-  220 second line"]
    i = lines.index(" -> EHLO " + lines[4].split()[-1])
    assert lines[i + 1 : i + 4] == ["<-  250-fault.test", "<-  250-SIZE 1000",
                                    "<-  250 8BITMIME"]


def test_server_closing_mid_session_is_6_and_at_banner_21() -> None:
    steps = [("send", b"220 fault.test ESMTP\r\n"), ("expect", b"EHLO"),
             ("send", b"250 fault.test\r\n"), ("expect", b"MAIL"), ("close", None)]
    with FaultServer(steps) as srv:
        r = smtpchat("-s", f"127.0.0.1:{srv.port}", "-t", "bob@example.test")
    assert r.returncode == status.CONNECTION_LOST, r.stdout + r.stderr
    assert "*** Remote host closed connection unexpectedly." in r.stderr
    assert r.stdout.splitlines()[-1] == "=== Connection closed with remote host."
    with FaultServer([("close", None)]) as srv:
        r = smtpchat("-s", f"127.0.0.1:{srv.port}", "-t", "bob@example.test")
    assert r.returncode == status.BANNER


def test_silent_server_times_out() -> None:
    with FaultServer([("sleep", 30)]) as srv:
        r = smtpchat("-s", f"127.0.0.1:{srv.port}", "-t", "bob@example.test", "--timeout", "1")
    assert r.returncode == status.BANNER
    assert "*** Timeout (1 secs) waiting for server response" in r.stderr


def test_hostile_reply_text_is_escaped() -> None:
    steps = [("send", b"220 evil\x1b[2J\x07 \xff\r\n"), ("expect", b"QUIT"),
             ("send", b"221 bye\r\n")]
    with FaultServer(steps) as srv:
        r = smtpchat("-s", f"127.0.0.1:{srv.port}", "-q", "banner")
    assert r.returncode == 0
    assert "<-  220 evil\\x1b[2J\\x07 \\xff" in r.stdout.splitlines()
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout


def test_malformed_reply_is_never_success() -> None:
    steps = [("send", b"220 fault.test\r\n"), ("expect", b"EHLO"), ("send", b"25O ok\r\n"),
             ("expect", b"HELO"), ("send", b"2500 ok\r\n"), ("expect", b"QUIT"),
             ("send", b"221 bye\r\n")]
    with FaultServer(steps) as srv:
        r = smtpchat("-s", f"127.0.0.1:{srv.port}", "-t", "bob@example.test")
    assert r.returncode == status.HELO, r.stdout + r.stderr
    assert "<** 25O ok" in r.stdout.splitlines()


def test_mx_walks_every_host() -> None:
    with aiosmtpd_server() as (port, sink):
        # mx1 (preference 10) is 127.0.0.2, where nothing listens; mx2 is the real server.
        dns = DNSServer(mx={"example.test": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
                        a={"mx1.example.test": ["127.0.0.2"], "mx2.example.test": ["127.0.0.1"]})
        with dns:
            r = smtpchat("--mx", "-p", str(port), "--resolver", f"127.0.0.1:{dns.port}",
                         "-t", "bob@example.test")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "=== MX hosts of example.test: mx1.example.test, mx2.example.test"
    assert lines[1] == f"=== Trying mx1.example.test[127.0.0.2]:{port}..."
    assert f"=== Trying mx2.example.test[127.0.0.1]:{port}..." in lines
    assert "*** Error connecting to 127.0.0.2" in r.stderr
    assert len(sink.messages) == 1


def test_mx_nxdomain_is_a_connect_failure() -> None:
    with DNSServer(mx={}, a={}) as dns:
        r = smtpchat("--resolver", f"127.0.0.1:{dns.port}", "-t", "bob@nx.test")
    assert r.returncode == status.CONNECT
    assert "no such domain" in r.stderr


# --- library units -----------------------------------------------------------------------------

def test_reply_parsing() -> None:
    assert line_code(b"250 ok") == (250, True) and line_code(b"250-ok") == (250, False)
    assert line_code(b"250") == (250, True)
    for bad in (b"2500 ok", b"25O ok", b"600 what", b"", b"250\tok"):
        assert line_code(bad) is None
    ext = extensions(Reply(250, [b"250-x", b"250-SIZE 100", b"250 auth plain login"]))
    assert ext == {"SIZE": "100", "AUTH": "plain login"}


def test_escape_keeps_controls_off_the_terminal() -> None:
    assert escape(b"a\x1bb\rc\x00\xff") == "a\\x1bb\\rc\\x00\\xff"
    assert escape("tab\tstays") == "tab\tstays"


def test_unescape_raw_line() -> None:
    assert compose.unescape(r"a\r\nb\x00\\") == b"a\r\nb\x00\\"


def test_certinfo_reads_trustme_certificate(certs: Certs) -> None:
    import ssl

    pem = certs.cert.cert_chain_pems[0].bytes().decode()
    info = certinfo.parse(ssl.PEM_cert_to_DER_cert(pem))
    assert info.subject.startswith("/O=trustme") and info.subject.endswith("/CN=mx.example.test")
    assert info.issuer.startswith("/O=smtpchat test CA")
    assert info.not_before < info.not_after
    with pytest.raises(ValueError):
        certinfo.parse(b"\x30\x82\xff\xff")


def test_starttls_discards_injected_plaintext(certs: Certs) -> None:
    # Bytes after the 220 to STARTTLS must not count as TLS replies (STARTTLS command injection).
    import socket
    import threading

    from pymailtools.chat.wire import Wire, tls_context

    client, server = socket.socketpair()
    sent = threading.Event()

    def serve() -> None:
        server.sendall(b"220 go ahead\r\n250 injected\r\n")
        sent.set()
        with certs.server_context().wrap_socket(server, server_side=True) as tls:
            tls.sendall(b"250 real\r\n")
            tls.recv(1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    sent.wait(30)
    wire = Wire(client, ("127.0.0.1", 25), 30)
    assert wire.read_reply().code == 220
    info, dropped = wire.start_tls(tls_context(False), "localhost")
    assert dropped == len(b"250 injected\r\n")
    assert wire.read_reply().lines == [b"250 real"]
    assert info.version.startswith("TLSv1.") and info.cert is not None
    wire.close()
    thread.join(30)


def test_transcript_json_events() -> None:
    import io

    out = io.StringIO()
    t = Transcript(out=out, live=False)
    t.sent("EHLO x")
    t.received(Reply(250, [b"250 ok"]))
    doc = json.loads(t.json({"exit_code": 0}))
    assert out.getvalue() == ""
    assert [(e["dir"], e["text"]) for e in doc["transcript"]] == [("send", "EHLO x"),
                                                                   ("recv", "250 ok")]
    assert doc["transcript"][1]["code"] == 250 and doc["exit_code"] == 0
