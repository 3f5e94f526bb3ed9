"""mail(1) send mode, run as the installed script: headers, recipients, attachments, callers."""

import email
import email.policy
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Sendmail, need_tool, script
from tests.support.mail import mail_env, run_mail
from tests.support.net import free_port


@pytest.fixture
def env(config_file: Path, tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    return mail_env(config_file, home)


def queued(sendmail: Sendmail) -> list[tuple[list[str], email.message.EmailMessage, bytes]]:
    """(envelope recipients, parsed message, raw bytes) of each queued entry."""
    out = []
    for _, envelope, data in sendmail.entries():
        msg = email.message_from_bytes(data, policy=email.policy.default)
        out.append(([r.address for r in envelope.recipients], msg, data))
    return out


def only(sendmail: Sendmail) -> tuple[list[str], email.message.EmailMessage, bytes]:
    entries = queued(sendmail)
    assert len(entries) == 1, entries
    return entries[0]


# --- header injection and bad arguments: refused with exit 64, nothing queued -----------------

@pytest.mark.parametrize("subject", ["hi\nBcc: victim@example.com",
                                     "Hi\r\nBcc: victim@example.test"])
def test_subject_with_line_break_is_refused_and_nothing_queued(
        env: dict[str, str], sendmail: Sendmail, subject: str) -> None:
    before = sendmail.snapshot()
    r = run_mail(env, "-s", subject, "user@example.test", input=b"body\n")
    assert r.returncode == 64
    err = r.stderr.decode()
    assert err.startswith("mail: ") and err.count("\n") == 1 and "Traceback" not in err
    assert sendmail.snapshot() == before


@pytest.mark.parametrize("args", [
    ["-s", "x", "user@example.test\r\nRCPT TO:<victim@example.test>"],          # SMTP injection
    ["-s", "x", "-c", "a@x.test\nBcc: y@y.test", "u@x.test"],                    # header injection
    ["-s", "x", "-b", "b@x.test\r", "u@x.test"],                                 # header injection
    ["-r", "me@x.test\r\nX-Evil: 1", "-s", "x", "u@x.test"],                     # forged sender
    ["-s", "x", "--", "-X/var/www/x.php"],                                       # sendmail flag
    ["-s", "x", "|/bin/sh -c 'touch pwned'"],                                    # command
    ["-s", "x", "/etc/cron.d/evil"],                                             # file
    ["-s", "x", "./mbox"],                                                       # file
    ["-a", "X-Evil: 1\nBcc: v@x.test", "u@x.test"],
])
def test_unsafe_arguments_exit_64_nothing_queued(env: dict[str, str], sendmail: Sendmail,
                                                 tmp_path: Path, args: list[str]) -> None:
    before = sendmail.snapshot()
    r = run_mail(env, *args, input=b"body\n")
    assert r.returncode == 64, r.stderr
    assert b"Traceback" not in r.stderr
    assert sendmail.snapshot() == before
    assert not (tmp_path / "pwned").exists() and not Path("/etc/cron.d/evil").exists()


def test_tilde_lines_from_a_pipe_are_body_text(env: dict[str, str], sendmail: Sendmail,
                                               tmp_path: Path) -> None:
    """No tilde escapes without a terminal; a lone "." does not end the body either."""
    body = f"hello\n~! touch {tmp_path}/pwned\n~r /etc/shadow\n~| cat\n.\nafter dot\n"
    r = run_mail(env, "-s", "x", "u@x.test", input=body.encode())
    assert r.returncode == 0, r.stderr
    _, msg, _ = only(sendmail)
    assert msg.get_content() == body
    assert not (tmp_path / "pwned").exists()


def test_missing_attachment_exits_66_before_queueing(env: dict[str, str],
                                                     sendmail: Sendmail) -> None:
    r = run_mail(env, "-s", "x", "-a", "/nonexistent", "u@x.test")
    assert r.returncode == 66
    assert r.stderr.decode() == "mail: /nonexistent: No such file or directory\n"
    assert sendmail.entries() == []


@pytest.mark.parametrize("special", ["/dev/zero", "fifo"])
def test_non_regular_attachment_refused_without_reading(env: dict[str, str], sendmail: Sendmail,
                                                        tmp_path: Path, special: str) -> None:
    path = special
    if special == "fifo":
        path = str(tmp_path / "fifo")
        os.mkfifo(path)
    r = run_mail(env, "-s", "x", "-a", path, "u@x.test", timeout=30)
    assert r.returncode == 66 and b"not a regular file" in r.stderr
    assert sendmail.entries() == []


# --- what gets queued --------------------------------------------------------------------------

def test_cc_bcc_lists_in_envelope_bcc_not_in_headers(env: dict[str, str],
                                                     sendmail: Sendmail) -> None:
    r = run_mail(env, "-s", "Report", "-c", "c1@x.test,c2@x.test", "-c", "c3@x.test",
                 "-b", "b1@x.test, b2@x.test", "to1@x.test,to2@x.test", "to3@x.test",
                 input=b"line\n")
    assert r.returncode == 0, r.stderr
    rcpts, msg, raw = only(sendmail)
    assert sorted(rcpts) == sorted(["to1@x.test", "to2@x.test", "to3@x.test", "c1@x.test",
                                    "c2@x.test", "c3@x.test", "b1@x.test", "b2@x.test"])
    assert [a.addr_spec for a in msg["To"].addresses] == ["to1@x.test", "to2@x.test",
                                                          "to3@x.test"]
    assert [a.addr_spec for a in msg["Cc"].addresses] == ["c1@x.test", "c2@x.test",
                                                          "c3@x.test"]
    assert "Bcc" not in msg and b"b1@x.test" not in raw
    assert msg["Subject"] == "Report"
    assert msg["Date"] and msg["Message-ID"]
    assert msg["From"].addresses[0].addr_spec == f"root@{'host.example.test'}"


def test_options_after_recipients_are_options(env: dict[str, str], sendmail: Sendmail) -> None:
    """bsd-mailx permutes arguments: `mail rcpt -s subj` works."""
    r = run_mail(env, "u@x.test", "-s", "late subject", input=b"x\n")
    assert r.returncode == 0, r.stderr
    rcpts, msg, _ = only(sendmail)
    assert rcpts == ["u@x.test"] and msg["Subject"] == "late subject"


def test_non_ascii_subject_name_and_body(env: dict[str, str], sendmail: Sendmail) -> None:
    subject = "Grüße — ☃ " * 30
    r = run_mail(env, "-s", subject, "-r", "Jörg Müller <joerg@example.test>", "u@x.test",
                 input="Grüße\n".encode())
    assert r.returncode == 0, r.stderr
    _, msg, raw = only(sendmail)
    head = raw.split(b"\n\n", 1)[0]
    assert head.isascii()
    assert all(len(line) <= 78 for line in head.split(b"\n"))
    assert b"From: =?utf-8?q?J=C3=B6rg_M=C3=BCller?= <joerg@example.test>" in head
    assert msg["Subject"] == subject.strip() or msg["Subject"] == subject
    assert msg.get_content_charset() == "utf-8" and msg.get_content() == "Grüße\n"
    _, envelope, _ = sendmail.entries()[0]
    assert envelope.sender == "joerg@example.test"


def test_internationalised_address_is_sent_as_utf8(env: dict[str, str],
                                                   sendmail: Sendmail) -> None:
    """An address with a non-ASCII local part (RFC 6531) is queued with raw UTF-8 headers
    (RFC 6532) for the SMTPUTF8 path, as sendmail takes it; it crashed the composer."""
    r = run_mail(env, "-s", "Grüße", '"Jörg, M." <Müller@example.test>', "plain@example.test",
                 input=b"hi\n")
    assert r.returncode == 0, r.stderr
    rcpts, msg, raw = only(sendmail)
    assert rcpts == ["Müller@example.test", "plain@example.test"]
    head = raw.split(b"\n\n", 1)[0]
    assert '"Jörg, M." <Müller@example.test>, plain@example.test'.encode() in head
    assert "Subject: Grüße\n".encode() in head  # UTF-8 throughout, no encoded words


def test_invalid_utf8_subject_is_encoded_not_crashed(env: dict[str, str],
                                                     sendmail: Sendmail) -> None:
    """Argv bytes that are not UTF-8 become an unknown-8bit encoded word."""
    r = subprocess.run([os.fsencode(script("mail")), b"-s", b"\xff\xfe caf\xe9", b"u@x.test"],
                       input=b"", capture_output=True, env=dict(env, LANG="C.UTF-8"), timeout=60)
    assert r.returncode == 0, r.stderr
    _, _, raw = only(sendmail)
    subject = next(line for line in raw.split(b"\n") if line.startswith(b"Subject:"))
    assert subject == b"Subject: =?unknown-8bit?q?=FF=FE_caf=E9?="


def test_escape_sequences_never_stored_raw(env: dict[str, str], sendmail: Sendmail) -> None:
    r = run_mail(env, "-s", "\x1b]0;owned\x07\x1b[2Jreal", "u@x.test", input=b"x\n")
    assert r.returncode == 0
    _, msg, raw = only(sendmail)
    assert b"\x1b" not in raw and b"\x07" not in raw
    assert msg["Subject"] == "]0;owned[2Jreal"


def test_long_lines_get_a_transfer_encoding(env: dict[str, str], sendmail: Sendmail) -> None:
    body = ("x" * 5000 + "\n").encode()
    assert run_mail(env, "-s", "long", "u@x.test", input=body).returncode == 0
    _, msg, raw = only(sendmail)
    assert max(len(line) for line in raw.split(b"\n")) <= 998
    assert msg["Content-Transfer-Encoding"] in ("quoted-printable", "base64")
    assert msg.get_content().encode() == body


def test_attachments_round_trip(env: dict[str, str], sendmail: Sendmail,
                                tmp_path: Path) -> None:
    binary = os.urandom(100_000)
    (tmp_path / "blob.bin").write_bytes(binary)
    named = tmp_path / "Übersicht März.txt"
    named.write_text("Zeile 1\nä ö ü\n", encoding="utf-8")
    r = run_mail(env, "-s", "files", "-a", str(tmp_path / "blob.bin"), "-a", str(named),
                 "u@x.test", input=b"see attached\n")
    assert r.returncode == 0, r.stderr
    _, msg, raw = only(sendmail)
    assert msg.get_content_type() == "multipart/mixed"
    parts = list(msg.iter_parts())
    assert parts[0].get_content() == "see attached\n"
    atts = list(msg.iter_attachments())
    assert [a.get_filename() for a in atts] == ["blob.bin", "Übersicht März.txt"]
    assert atts[0].get_content() == binary and atts[0]["Content-Transfer-Encoding"] == "base64"
    assert atts[1].get_content_type() == "text/plain"
    assert atts[1].get_payload(decode=True) == named.read_bytes()
    assert b"filename*=utf-8''%C3%9Cbersicht%20M%C3%A4rz.txt" in raw
    assert max(len(line) for line in raw.split(b"\n")) <= 998


def test_dash_a_header_form_sets_content_type(env: dict[str, str], sendmail: Sendmail) -> None:
    """bsd-mailx scripts: -a 'Content-Type: text/html' is a header, not a file."""
    r = run_mail(env, "-s", "html", "-a", "Content-Type: text/html", "-a", "X-Tag: 7",
                 "u@x.test", input=b"<p>hi</p>\n")
    assert r.returncode == 0, r.stderr
    _, msg, _ = only(sendmail)
    assert msg.get_content_type() == "text/html"
    assert msg["X-Tag"] == "7"
    assert msg.get_content() == "<p>hi</p>\n"
    assert len(msg.get_all("Content-Type")) == 1


def test_dash_a_prefers_an_existing_file(env: dict[str, str], sendmail: Sendmail,
                                         tmp_path: Path) -> None:
    odd = tmp_path / "Note: one"
    odd.write_bytes(b"\x00\x01")
    r = subprocess.run([script("mail"), "-s", "f", "-a", "Note: one", "u@x.test"], input=b"b\n",
                       capture_output=True, env=env, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    _, msg, _ = only(sendmail)
    assert [a.get_filename() for a in msg.iter_attachments()] == ["Note: one"]
    assert "Note" not in msg


# --- empty bodies and -E -------------------------------------------------------------------------

def test_empty_body_is_sent_with_a_warning(env: dict[str, str], sendmail: Sendmail) -> None:
    r = run_mail(env, "-s", "x", "u@x.test")
    assert r.returncode == 0
    assert r.stderr == b"Null message body; hope that's ok\n"
    assert len(sendmail.entries()) == 1


@pytest.mark.parametrize("stdin", [b"", b"\n\n  \n"])
def test_dash_E_skips_an_empty_message(env: dict[str, str], sendmail: Sendmail,
                                       stdin: bytes) -> None:
    r = run_mail(env, "-E", "-s", "x", "u@x.test", input=stdin)
    assert r.returncode == 0 and r.stderr == b""
    assert sendmail.snapshot() == {} or sendmail.entries() == []


def test_dash_E_with_body_sends(env: dict[str, str], sendmail: Sendmail) -> None:
    assert run_mail(env, "-E", "-s", "x", "u@x.test", input=b"text\n").returncode == 0
    assert len(sendmail.entries()) == 1


# --- real callers: the command lines fail2ban, cron and scripts use -----------------------------

def test_fail2ban_mail_action(env: dict[str, str], sendmail: Sendmail) -> None:
    """action.d/mail.conf: mail -E 'set escape' -s ... dest — 'set escape' is no recipient."""
    r = run_mail(env, "-E", "set escape", "-s", "[Fail2Ban] sshd: started on host",
                 "admin@example.test", input=b"Hi,\nThe jail sshd has been started.\n")
    assert r.returncode == 0, r.stderr
    rcpts, msg, _ = only(sendmail)
    assert rcpts == ["admin@example.test"]
    assert msg["Subject"] == "[Fail2Ban] sshd: started on host"


def test_smartd_invocation(env: dict[str, str], sendmail: Sendmail) -> None:
    """10mail: mail -s "$SMARTD_SUBJECT" $SMARTD_ADDRESS (space-separated) < message."""
    body = b"This message was generated by the smartd daemon.\n\nDevice: /dev/sda\n"
    r = run_mail(env, "-s", "SMART error (CurrentPendingSector) detected on host: x",
                 "root", "ops@example.test", input=body)
    assert r.returncode == 0, r.stderr
    rcpts, msg, _ = only(sendmail)
    assert rcpts == ["root@host.example.test", "ops@example.test"]
    assert msg.get_content().encode() == body


def test_logrotate_invocation(env: dict[str, str], sendmail: Sendmail, tmp_path: Path) -> None:
    log = tmp_path / "app.log.1"
    log.write_bytes(b"".join(b"line %d\n" % i for i in range(2000)))
    with log.open("rb") as f:
        r = subprocess.run([script("mail"), "-s", "/var/log/app.log.1", "logs@example.test"],
                           stdin=f, capture_output=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    rcpts, msg, _ = only(sendmail)
    assert rcpts == ["logs@example.test"]
    assert msg.get_content().encode() == log.read_bytes()


def test_unattended_upgrades_fallback(env: dict[str, str], sendmail: Sendmail) -> None:
    r = run_mail(env, "-r", "root", "-s", "unattended-upgrades result for host: SUCCESS",
                 "root", input="Pakete aktualisiert: ä\n".encode())
    assert r.returncode == 0, r.stderr
    rcpts, msg, _ = only(sendmail)
    assert rcpts == ["root@host.example.test"]
    assert msg["From"].addresses[0].addr_spec == "root@host.example.test"


def test_subject_without_recipient_is_a_usage_error(env: dict[str, str],
                                                    sendmail: Sendmail) -> None:
    r = run_mail(env, "-s", "x", input=b"x\n")
    assert r.returncode == 64 and b"recipients" in r.stderr
    assert sendmail.entries() == []


def test_read_recipients_takes_headers_from_stdin(env: dict[str, str],
                                                  sendmail: Sendmail) -> None:
    """mailx's -t (here when followed by an option or nothing) and --read-recipients."""
    message = (b"To: a@x.test, B <b@x.test>\nCc: c@x.test\nBcc: hidden@x.test\n"
               b"Subject: from headers\n\nbody\n")
    for args in (["-t"], ["--read-recipients"], ["-t", "-s", "ignored"]):
        r = run_mail(env, *args, input=message)
        assert r.returncode == 0, r.stderr
    entries = queued(sendmail)
    assert len(entries) == 3
    for rcpts, msg, raw in entries:
        assert sorted(rcpts) == ["a@x.test", "b@x.test", "c@x.test", "hidden@x.test"]
        assert msg["Subject"] == "from headers"
        assert b"hidden" not in raw and msg.get_content() == "body\n"


# --- SMTP server chosen with -t HOST:PORT -------------------------------------------------------

class Recorder:
    """aiosmtpd handler keeping each transaction's envelope and data."""

    def __init__(self, refuse: bool = False) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.refuse = refuse

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: ANN001
        if self.refuse:
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: ANN001
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 2.0.0 queued"


@pytest.fixture
def smtp_server() -> Iterator[tuple[Recorder, int]]:
    from aiosmtpd.controller import Controller

    handler = Recorder()
    port = free_port()
    ctl = Controller(handler, hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        yield handler, port
    finally:
        ctl.stop()


@pytest.mark.parametrize("form", ["-t", "-S smtp=", "-S mta=smtp://"])
def test_sends_through_smtp_server(env: dict[str, str], sendmail: Sendmail,
                                   smtp_server: tuple[Recorder, int], form: str) -> None:
    handler, port = smtp_server
    opt, _, prefix = form.partition(" ")
    server_args = [opt, f"{prefix}127.0.0.1:{port}"]
    r = run_mail(env, *server_args, "-s", "SMTP Example", "-c", "cc@x.test", "-b",
                 "bcc@x.test", "recipient@example.test", input=b"via smtp\n.\nend\n")
    assert r.returncode == 0, r.stderr
    assert len(handler.messages) == 1
    mail_from, rcpts, data = handler.messages[0]
    assert mail_from == "root@host.example.test"
    assert sorted(rcpts) == ["bcc@x.test", "cc@x.test", "recipient@example.test"]
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg["Subject"] == "SMTP Example" and "Bcc" not in msg
    assert msg.get_content().replace("\r\n", "\n") == "via smtp\n.\nend\n"
    assert sendmail.entries() == []  # not queued locally


def test_smtp_refused_recipient_is_failure(env: dict[str, str], sendmail: Sendmail) -> None:
    from aiosmtpd.controller import Controller

    handler = Recorder(refuse=True)
    port = free_port()
    ctl = Controller(handler, hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        r = run_mail(env, "-t", f"127.0.0.1:{port}", "-s", "x", "u@x.test", input=b"x\n")
    finally:
        ctl.stop()
    assert r.returncode == 69
    assert b"550" in r.stderr and handler.messages == []


def test_smtp_connection_refused_is_69(env: dict[str, str]) -> None:
    port = free_port()  # nothing listens there now
    r = run_mail(env, "-t", f"127.0.0.1:{port}", "-s", "x", "u@x.test", input=b"x\n")
    assert r.returncode == 69
    assert r.stderr.startswith(b"mail: cannot connect to 127.0.0.1[")


def test_smtp_unknown_host_is_68(env: dict[str, str]) -> None:
    r = run_mail(env, "-t", "no-such-host.invalid:2525", "-s", "x", "u@x.test", input=b"x\n")
    assert r.returncode == 68, r.stderr
    assert b"no-such-host.invalid" in r.stderr


def test_smtp_via_thread_server_receives_starttls_free_session(
        env: dict[str, str], smtp_server: tuple[Recorder, int]) -> None:
    """Two sends in parallel both arrive (no shared state in the client)."""
    handler, port = smtp_server
    results: list[int] = []

    def one(n: int) -> None:
        r = run_mail(env, "-t", f"127.0.0.1:{port}", "-s", f"n{n}", "u@x.test", input=b"x\n")
        results.append(r.returncode)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [0, 0]
    subjects = sorted(email.message_from_bytes(d)["Subject"] for _, _, d in handler.messages)
    assert subjects == ["n0", "n1"]


# --- interop: s-nail reads what mail queued and our MDA delivered -------------------------------

@pytest.mark.interop
def test_snail_reads_delivered_message(config_file: Path, sendmail: Sendmail, spool: Path,
                                       system_user: object, tmp_path: Path) -> None:
    snail = need_tool("s-nail", "s-nail")
    user = system_user.pw_name  # type: ignore[attr-defined]
    home = tmp_path / "home"
    home.mkdir()
    env = mail_env(config_file, home, PYMAILTOOLS_DELIVERY_MODE="foreground")
    (tmp_path / "a.bin").write_bytes(b"\x00\x01binary")
    r = run_mail(env, "-s", "Grüße from mail", "-a", str(tmp_path / "a.bin"), user,
                 input=b"first line\nFrom the start\n")
    assert r.returncode == 0, r.stderr
    box = spool / user
    assert box.exists(), sendmail.entries()
    h = subprocess.run([snail, "-n", "-Sheadline-plain", "-Sttycharset=utf-8", "-H", "-f",
                        str(box)], capture_output=True, env=dict(env, LC_ALL="C.UTF-8"),
                       timeout=60)
    lines = h.stdout.decode().splitlines()
    assert len(lines) == 1 and "Grüße from mail" in lines[0]
    p = subprocess.run([snail, "-n", "-Sheadline-plain", "-f", str(box)], input=b"p 1\nx\n",
                       capture_output=True, env=dict(env, LC_ALL="C.UTF-8"), timeout=60)
    out = p.stdout.decode()
    # s-nail shows mboxrd quoting as stored, so ">From" here.
    assert "first line\n>From the start" in out
    assert "a.bin" in out
