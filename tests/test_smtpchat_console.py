"""smtpchat's interactive mode on a pseudo-terminal, and its nc-like mode with piped input."""

from __future__ import annotations

from pathlib import Path

from pymailtools.chat import status
from tests.conftest import script
from tests.support.chat import Terminal, smtpchat
from tests.support.smtp import PASSWORD, Certs, FaultServer, Sink, aiosmtpd_server

PROMPT = r"(->|~>) $"


def say(t: Terminal, line: str, then: str) -> None:
    """Wait for the prompt, type a line, wait for ``then``."""
    t.expect(PROMPT)
    t.send(line)
    t.expect(then)


def test_interactive_starttls_auth_and_data(certs: Certs) -> None:
    with aiosmtpd_server(certs=certs, auth=True) as (port, sink):
        t = Terminal([script("smtpchat"), "127.0.0.1", str(port)])
        t.expect(r"<-  220 ")
        say(t, "EHLO me", r"250 HELP")
        say(t, "/starttls", r"Send EHLO again")
        say(t, "EHLO me", r"<~  250 HELP")
        say(t, "/auth plain alice", r"Password for alice: ")
        t.send(PASSWORD)  # typed without echo
        t.expect(r"<~  235 ")
        say(t, "MAIL FROM:<alice@example.org>", r"<~  250 ")
        say(t, "RCPT TO:<bob@example.test>", r"<~  250 ")
        say(t, "DATA", r"<~  354 ")
        for line in ["Subject: typed", "", ".starts with a dot", "..two dots"]:
            t.expect(PROMPT)
            t.send(line)
        say(t, ".", r"<~  250 2\.0\.0 Ok: queued")
        t.expect(PROMPT)
        t.send_raw(b"\x04")  # end of input: smtpchat says QUIT itself
        t.expect(r"<~  221 Bye")
        code = t.wait()
    assert code == 0, t.text
    text = t.text
    assert "=== TLS started with cipher TLSv1." in text
    assert "TLS peer DN=" in text and "CN=mx.example.test" in text
    assert "TLS peer certificate valid 2000-01-01 00:00:00 UTC to 3000-01-01" in text
    assert " ~> AUTH PLAIN ********" in text
    assert PASSWORD not in text
    # Typed lines starting with a dot were stuffed; the server un-stuffs them back.
    [msg] = sink.messages
    assert msg.content == b"Subject: typed\r\n\r\n.starts with a dot\r\n..two dots\r\n"
    assert msg.tls


def test_replies_coloured_by_class_and_kept_together() -> None:
    sink = Sink(reject_rcpt={"nobody@example.test": "550 5.1.1 no such user"})
    with aiosmtpd_server(sink) as (port, _):
        t = Terminal([script("smtpchat"), "127.0.0.1", str(port)])
        say(t, "EHLO me", r"250 HELP")
        say(t, "MAIL FROM:<a@example.org>", r"250 ")
        say(t, "RCPT TO:<nobody@example.test>", r"550 5\.1\.1")
        say(t, "/quit", r"221 Bye")
        code = t.wait()
    out = t.output.decode()
    assert "\x1b[32m<-  220 " in out  # 2xx green
    assert "\x1b[31m<** 550 5.1.1 no such user\x1b[0m" in out  # 5xx red, swaks' <** hint
    # The EHLO reply's lines come out one after another, none split by a prompt.
    ehlo = t.text.split("EHLO me", 1)[1].split(" -> ", 1)[0]
    assert [x[:5] for x in ehlo.strip().splitlines()] == ["<-  2"] * len(ehlo.strip().splitlines())
    assert len(ehlo.strip().splitlines()) >= 4
    # The first refused command decides the exit code, as swaks' would (RCPT: 24).
    assert code == status.RCPT


def test_interactive_help_data_file_and_refused_plaintext_auth(tmp_path: Path) -> None:
    message = tmp_path / "message.txt"
    message.write_text("Subject: from file\n\n.hidden\nbody\n")
    with aiosmtpd_server(auth=True) as (port, sink):
        t = Terminal([script("smtpchat"), "127.0.0.1", str(port)])
        say(t, "/help", r"/auth plain USER")
        say(t, "EHLO me", r"250 HELP")
        say(t, "/auth plain alice", r"Refusing to send credentials without TLS")
        say(t, "MAIL FROM:<a@example.org>", r"250 ")
        say(t, "RCPT TO:<bob@example.test>", r"250 ")
        say(t, f"/data {message}", r"<-  250 2\.0\.0")
        say(t, "/bogus", r"Unknown local command /bogus")
        say(t, "/quit", r"221")
        code = t.wait()
    assert code == 0, t.text
    assert " -> 4 lines sent" in t.text
    assert "Password" not in t.text  # refused before asking
    assert sink.messages[0].content == b"Subject: from file\r\n\r\n.hidden\r\nbody\r\n"


def test_piped_input_behaves_like_nc() -> None:
    with aiosmtpd_server() as (port, _):
        r = smtpchat("127.0.0.1", str(port), input=b"EHLO x\r\nQUIT\r\n")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    # Raw server lines, no hints, no notes: what nc would have shown.
    assert lines[0].startswith("220 ") and lines[1] == "250-mx.example.test"
    assert lines[-1] == "221 Bye" and all(x[:3].isdigit() for x in lines)
    assert r.stderr == ""


def test_piped_transaction_with_starttls(certs: Certs) -> None:
    script_lines = (b"EHLO x\nSTARTTLS\nEHLO x\nMAIL FROM:<a@example.org>\n"
                    b"RCPT TO:<bob@example.test>\nDATA\nSubject: piped\n\nhello\n.\nQUIT\n")
    with aiosmtpd_server(certs=certs) as (port, sink):
        r = smtpchat("127.0.0.1", str(port), input=script_lines)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[-1] == "221 Bye"
    [msg] = sink.messages
    assert msg.tls and msg.content == b"Subject: piped\r\n\r\nhello\r\n"


def test_piped_auth_never_prompts() -> None:
    with aiosmtpd_server(auth=True) as (port, _):
        r = smtpchat("127.0.0.1", str(port), "--auth-plaintext",
                     input=b"EHLO x\n/auth plain alice\nQUIT\n", timeout=30)
    assert r.returncode == 0
    assert "*** No terminal to ask for the password on: use --auth-password" in r.stderr
    assert r.stdout.splitlines()[-1] == "221 Bye"


def test_piped_server_closing_is_exit_6() -> None:
    steps = [("send", b"220 fault ESMTP\r\n"), ("expect", b"EHLO"),
             ("send", b"250-fault\r\n"), ("sleep", 0.2), ("send", b"250 8BITMIME\r\n"),
             ("expect", b"NOOP"), ("send", b"421 4.3.2 shutting down\r\n"), ("close", None)]
    with FaultServer(steps) as srv:
        r = smtpchat("127.0.0.1", str(srv.port), input=b"EHLO x\nNOOP\nNOOP\n")
    assert r.stdout.splitlines() == ["220 fault ESMTP", "250-fault", "250 8BITMIME",
                                     "421 4.3.2 shutting down"]
    # After a 421 nothing more is sent: the second NOOP never leaves.
    assert r.stderr == "*** Remote host is closing the connection (421)\n"
    assert srv.received == [b"EHLO x\r\nNOOP\r\n"]
    assert r.returncode == status.CONNECTION_LOST


def test_piped_server_hanging_up_is_exit_6() -> None:
    steps = [("send", b"220 fault ESMTP\r\n"), ("expect", b"EHLO"), ("close", None)]
    with FaultServer(steps) as srv:
        r = smtpchat("127.0.0.1", str(srv.port), input=b"EHLO x\nQUIT\n")
    assert r.stdout.splitlines() == ["220 fault ESMTP"]
    assert r.stderr == "*** Remote host closed connection unexpectedly.\n"
    assert r.returncode == status.CONNECTION_LOST


def test_interactive_shows_an_unsolicited_close() -> None:
    steps = [("send", b"220 fault ESMTP\r\n"), ("expect", b"EHLO"), ("send", b"250 fault\r\n"),
             ("sleep", 0.5), ("send", b"421 4.4.2 idle timeout\r\n"), ("close", None)]
    with FaultServer(steps) as srv:
        t = Terminal([script("smtpchat"), "127.0.0.1", str(srv.port)])
        say(t, "EHLO me", r"250 fault")
        t.expect(PROMPT)
        import time

        time.sleep(1.5)  # the server gives up on us meanwhile
        t.send("NOOP")
        t.expect(r"<\*\* 421 4\.4\.2 idle timeout")
        code = t.wait()
    assert code == status.CONNECTION_LOST
    assert "*** Remote host is closing the connection (421)" in t.text
    assert srv.received == [b"EHLO me\r\n"]  # the NOOP typed after the 421 was not sent
