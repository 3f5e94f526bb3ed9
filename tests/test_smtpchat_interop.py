"""smtpchat against real peers on loopback: Postfix's smtpd and smtp-sink, and swaks itself."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from pymailtools.chat import status
from tests.conftest import need_root, need_tool
from tests.support.chat import smtpchat
from tests.support.postfix import postfix_instance, smtp_sink
from tests.support.smtp import Certs

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def postfix(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[int]:
    need_tool("postfix", "postfix")
    need_root()
    # Postfix's SMTP smuggling defence, on for everyone but clients from 127.0.0.2, so that
    # one instance shows both a protected and an unprotected server.
    with postfix_instance(certs, "smtpd_forbid_bare_newline = yes\n"
                          "smtpd_forbid_bare_newline_exclusions = 127.0.0.2/32\n") as port:
        yield port


QUEUED = re.compile(r"^<[-~]  250 2\.0\.0 Ok: (\d+ bytes )?queued as [0-9A-F]+$", re.M)


def test_postfix_starttls_verified_pipelining_chunking(postfix: int, certs: Certs) -> None:
    r = smtpchat("-s", f"127.0.0.1:{postfix}", "-t", "bob@example.test", "-f", "a@example.org",
                 "--tls", "--tls-verify", "--tls-ca-path", str(certs.ca_file),
                 "--pipeline", "--chunking")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert "<-  220 2.0.0 Ready to start TLS" in lines
    assert "=== TLS certificate verified" in lines
    assert "<~  250 CHUNKING" in lines and "<~  250-PIPELINING" in lines
    i = lines.index(" ~> MAIL FROM:<a@example.org> SIZE=" + lines[lines.index(
        " ~> RCPT TO:<bob@example.test>") - 1].rsplit("=", 1)[1])
    assert [x[:3] for x in lines[i : i + 4]] == [" ~>", " ~>", "<~ ", "<~ "]
    assert any(re.fullmatch(r" ~> BDAT \d+ LAST", x) for x in lines)
    assert QUEUED.search(r.stdout)
    assert lines[-3:] == [" ~> QUIT", "<~  221 2.0.0 Bye",
                          "=== Connection closed with remote host."]


def test_postfix_smtputf8_and_refusal_codes(postfix: int) -> None:
    ok = smtpchat("-s", f"127.0.0.1:{postfix}", "-t", "jörg@exämple.test", "-n")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert re.search(r"^ -> MAIL FROM:<\S+> SIZE=\d+ BODY=8BITMIME SMTPUTF8$", ok.stdout, re.M)
    assert QUEUED.search(ok.stdout)
    # Postfix refuses a recipient without a domain part: no RCPT accepted = swaks' 24.
    bad = smtpchat("-s", f"127.0.0.1:{postfix}", "-t", "bob@")
    assert bad.returncode == status.USAGE  # caught before connecting
    refused = smtpchat("-s", f"127.0.0.1:{postfix}", "-t", "bob@[300.1.1.1]")
    assert refused.returncode == status.RCPT, refused.stdout
    assert re.search(r"^<\*\* 5\d\d ", refused.stdout, re.M)


PROBE = ["-t", "bob@example.test", "-d", "Subject: probe\n\nbody", "--raw-line",
         r"\n.\r\nRSET\r\n"]


def test_smuggling_probe_against_protected_postfix(postfix: int) -> None:
    # <LF>.<CR><LF> and then a command: Postfix with smtpd_forbid_bare_newline (3.7.11) keeps it
    # all as message text, so the session stays in step and QUIT gets its 221.
    r = smtpchat("-s", f"127.0.0.1:{postfix}", *PROBE)
    lines = r.stdout.splitlines()
    assert "**> \\n.\\r\\nRSET\\r\\n" in lines
    assert len(QUEUED.findall(r.stdout)) == 1
    assert lines[-3:-1] == [" -> QUIT", "<-  221 2.0.0 Bye"]
    assert r.returncode == 0, r.stdout + r.stderr


def test_smuggling_probe_detects_an_unprotected_server(postfix: int) -> None:
    # From 127.0.0.2 (excluded from the defence) Postfix ends the data at <LF>.<CR><LF> and
    # runs the smuggled RSET; its reply then arrives in place of the 221 to QUIT.
    r = smtpchat("-s", f"127.0.0.1:{postfix}", "-li", "127.0.0.2", *PROBE)
    lines = r.stdout.splitlines()
    assert re.fullmatch(r"<-  250 2\.0\.0 Ok: queued as [0-9A-F]+", lines[-4]), r.stdout
    assert lines[-3:-1] == [" -> QUIT", "<-  250 2.0.0 Ok"]
    assert "*** Unexpected reply to QUIT: the server and smtpchat are out of step" in r.stderr
    assert r.returncode == status.QUIT


def test_postfix_interactive_nc_mode(postfix: int) -> None:
    r = smtpchat("127.0.0.1", str(postfix), input=b"EHLO client.test\r\nNOOP\r\nQUIT\r\n")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "220 mx.example.test ESMTP Postfix"
    assert "250 2.0.0 Ok" in lines and lines[-1] == "221 2.0.0 Bye"


def test_same_transcript_as_swaks_against_smtp_sink() -> None:
    sink = need_tool("smtp-sink", "postfix")
    swaks = need_tool("swaks", "swaks")
    import subprocess

    args = ["--to", "bob@example.test", "--from", "a@example.org", "--ehlo", "client.test",
            "-n"]
    with smtp_sink(sink) as port:
        ours = smtpchat("--server", f"127.0.0.1:{port}", *args)
        theirs = subprocess.run([swaks, "--server", f"127.0.0.1:{port}", *args],
                                capture_output=True, text=True, timeout=60, check=False)
    assert ours.returncode == theirs.returncode == 0, ours.stdout + theirs.stdout
    # Byte for byte the same, apart from the line count of the two test messages.
    def norm(text: str) -> list[str]:
        return [re.sub(r"^ -> \d+ lines sent$", " -> N lines sent", x) for x in text.splitlines()]

    assert norm(ours.stdout) == norm(theirs.stdout)


def test_exit_codes_match_swaks_on_refusals(tmp_path: Path) -> None:
    sink = need_tool("smtp-sink", "postfix")
    swaks = need_tool("swaks", "swaks")
    import subprocess

    # smtp-sink -r RCPT soft-rejects every recipient; -f DATA hard-rejects DATA.
    for flag, stage in (("-r", "RCPT"), ("-f", "DATA"), ("-r", "MAIL")):
        from tests.support.net import free_port, wait_for_port

        port = free_port()
        import os

        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        proc = subprocess.Popen([sink, *user, flag, stage, f"127.0.0.1:{port}", "10"],
                                stderr=subprocess.DEVNULL)
        try:
            wait_for_port("127.0.0.1", port)
            args = ["--server", f"127.0.0.1:{port}", "--to", "bob@example.test",
                    "--from", "a@example.org"]
            ours = smtpchat(*args)
            theirs = subprocess.run([swaks, *args], capture_output=True, timeout=60, check=False)
        finally:
            proc.terminate()
            proc.wait(60)
        assert ours.returncode == theirs.returncode != 0, (stage, ours.stdout)
