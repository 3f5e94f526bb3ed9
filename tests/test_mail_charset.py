"""mail(1) read mode with 8-bit and RFC 2047 headers: summary, p/t and replies, beside s-nail."""

import email
import email.policy
import subprocess
from pathlib import Path

import pytest

from tests.conftest import need_tool
from tests.support.mail import mail_env, run_mail

LOCALE = {"LC_ALL": "C.UTF-8", "LANG": "C.UTF-8", "COLUMNS": "80", "MAILRC": "/dev/null"}

# What cron jobs and scripts send: raw UTF-8 in Subject and From, names with and without
# quotes, comments, RFC 2047 words (adjacent, mixed charsets, split inside a character),
# wide characters and names longer than the sender column.
HEADERS = [
    b"From: Alice Ex\xc3\xa4mple <alice@example.org>\nSubject: Report 1 \xc3\xbcn\xc3\xafcode",
    b'From: "J\xc3\xb6rg M\xc3\xbcller" <bob@example.org>\nSubject: caf\xc3\xa9 cr\xc3\xa8me',
    b"From: =?UTF-8?Q?Ren=C3=A9e_D?= <c@example.org>\n"
    b"Subject: =?ISO-8859-1?Q?caf=E9?= =?UTF-8?B?w6k=?= encoded",
    b"From: =?UTF-8?Q?M=C3=BCller=2C_J=C3=B6rg?= <j@example.org>\nSubject: comma in a name",
    b"From: d@example.org\nSubject: plain",
    b"From: e@example.org (\xc3\x88ve Comment)\nSubject: name in a comment",
    b"From: J\xc3\xb6rg M\xc3\xbcller-L\xc3\xbcdenscheidt <l@example.org>\nSubject: long name",
    b"From: \xe5\xb1\xb1\xe7\x94\xb0\xe5\xa4\xaa\xe9\x83\x8e\xe5\xb1\xb1\xe7\x94\xb0\xe5\xa4\xaa"
    b"\xe9\x83\x8e\xe5\xb1\xb1\xe7\x94\xb0 <y@example.org>\nSubject: "
    + "日本語の件名".encode() * 5,
    b"From: =?UTF-8?B?YcM=?= =?UTF-8?B?vGI=?= <s@example.org>\n"
    b"Subject: =?UTF-8?B?YcM=?=\n =?UTF-8?B?vGI=?= split",
    b'From: "=?UTF-8?Q?Ren=C3=A9e?=" <q@example.org>\nSubject: folded\n  across \xc3\xbc lines',
    b"From: <angle@example.org>\nSubject: 0123456789012345678901234567890123456789 long ascii",
]


def mbox(path: Path, headers: list[bytes]) -> Path:
    chunks = []
    for i, head in enumerate(headers):
        chunks.append(b"From sender@example.org Mon Nov 16 10:%02d:00 2026\n" % i + head
                      + b"\nTo: team@example.org\nMessage-ID: <m%d@example.org>\n\nbody\n\n" % i)
    path.write_bytes(b"".join(chunks))
    return path


@pytest.fixture
def env(config_file: Path, tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    return mail_env(config_file, home, **LOCALE)


def snail(env: dict[str, str], *args: str, input: bytes = b"") -> str:
    """s-nail on the same mailbox: no rc files; showname as Debian's system s-nail.rc sets it."""
    path = need_tool("s-nail", "s-nail")
    r = subprocess.run([path, "-n", "-N", "-R", "-Sshowname", "-Sheadline-plain", *args],
                       input=input, capture_output=True, timeout=60, env=env, check=True)
    return r.stdout.decode()


def lines(text: str) -> list[str]:
    return [ln.rstrip() for ln in text.splitlines()]


@pytest.mark.interop
def test_summary_agrees_with_snail(env: dict[str, str], tmp_path: Path) -> None:
    box = mbox(tmp_path / "box", HEADERS)
    theirs = lines(snail(env, "-H", "-f", str(box)))
    r = run_mail(env, "-H", "-f", str(box))
    assert r.returncode == 0, r.stderr
    ours = lines(r.stdout.decode())
    assert len(theirs) == len(HEADERS)
    # Sender and subject columns first, for a readable failure; then the whole lines.
    assert [ln[6:24] for ln in ours] == [ln[6:24] for ln in theirs]
    assert [ln[54:] for ln in ours] == [ln[54:] for ln in theirs]
    assert ours == theirs
    assert "Report 1 ünïcode" in ours[0] and ours[0][6:24].rstrip() == "Alice Exämple"


@pytest.mark.interop
def test_print_type_top_show_decoded_headers_as_snail(env: dict[str, str], tmp_path: Path) -> None:
    box = mbox(tmp_path / "box", HEADERS[:3])
    commands = b"p 1\nt 2\ntop 3\n"
    theirs = [ln for ln in lines(snail(env, "-f", str(box), input=commands))
              if ln.startswith(("From:", "Subject:"))]
    r = run_mail(env, "-N", "-f", str(box), input=commands + b"x\n")
    assert r.returncode == 0, r.stderr
    ours = [ln for ln in lines(r.stdout.decode()) if ln.startswith(("From:", "Subject:"))]
    assert ours == theirs
    assert ours[:2] == ["From: Alice Exämple <alice@example.org>", "Subject: Report 1 ünïcode"]


def test_print_all_headers_decodes_each_occurrence(env: dict[str, str], tmp_path: Path) -> None:
    box = mbox(tmp_path / "box", [b"Received: from one\nReceived: from two\n"
                                  b"X-Note: gr\xc3\xbc\xc3\x9fe\nSubject: s"])
    r = run_mail(env, "-N", "-f", str(box), input=b"P 1\nx\n")
    out = lines(r.stdout.decode())
    assert [ln for ln in out if ln.startswith("Received:")] == ["Received: from one",
                                                                "Received: from two"]
    assert "X-Note: grüße" in out


def test_summary_on_open_and_h_and_f(env: dict[str, str], tmp_path: Path) -> None:
    box = mbox(tmp_path / "box", HEADERS[:1])
    r = run_mail(env, "-f", str(box), input=b"h\nf 1\nx\n")
    assert r.returncode == 0, r.stderr
    summaries = [ln for ln in r.stdout.decode().splitlines() if ln[2:5] == "  1"]
    assert len(summaries) == 3
    for ln in summaries:
        assert ln[6:24] == "Alice Exämple     " and ln.endswith("Report 1 ünïcode")


def test_latin1_headers_fall_back_per_header(env: dict[str, str], tmp_path: Path) -> None:
    # Subject in Latin-1, From in UTF-8: each header is decoded on its own.
    box = mbox(tmp_path / "box", [b"From: J\xc3\xb6rg <j@example.org>\nSubject: caf\xe9 \xe0 la"
                                  b" cr\xe8me", b"From: \xc9ric <e@example.org>\nSubject: x"])
    r = run_mail(env, "-H", "-f", str(box))
    out = lines(r.stdout.decode())
    assert out[0][6:24].rstrip() == "Jörg" and out[0].endswith("café à la crème")
    assert out[1][6:24].rstrip() == "Éric"
    r = run_mail(env, "-N", "-f", str(box), input=b"p 1\nx\n")
    assert "Subject: café à la crème\n" in r.stdout.decode()
    assert "\ufffd" not in r.stdout.decode()


def queued(sendmail: object) -> tuple[list[str], email.message.EmailMessage, bytes]:
    entries = sendmail.entries()  # type: ignore[attr-defined]
    assert len(entries) == 1
    _, envelope, data = entries[0]
    msg = email.message_from_bytes(data, policy=email.policy.default)
    return [x.address for x in envelope.recipients], msg, data  # type: ignore[return-value]


def test_reply_subject_and_to_are_decoded_and_encoded_again(
        env: dict[str, str], tmp_path: Path, sendmail: object) -> None:
    box = mbox(tmp_path / "box", HEADERS[:1])
    r = run_mail(env, "-f", str(box), input=b"r 1\nthanks\n.\nx\n")
    assert r.returncode == 0, r.stderr
    assert "To: Alice Exämple <alice@example.org>\n" in r.stdout.decode()
    recipients, msg, data = queued(sendmail)
    assert recipients == ["alice@example.org"]
    assert msg["Subject"] == "Re: Report 1 ünïcode"
    assert msg["To"].addresses[0].display_name == "Alice Exämple"
    assert msg["To"].addresses[0].addr_spec == "alice@example.org"
    head = data.split(b"\n\n", 1)[0]
    assert head.isascii() and b"=?utf-8?" in head.lower()  # RFC 2047 on the wire


def test_reply_to_an_encoded_name_with_a_comma(env: dict[str, str], tmp_path: Path,
                                               sendmail: object) -> None:
    """The name is decoded after the address list is parsed: "Müller, Jörg" is one mailbox."""
    box = mbox(tmp_path / "box", [HEADERS[3]])
    r = run_mail(env, "-f", str(box), input=b"r 1\nthanks\n.\nx\n")
    assert r.returncode == 0, r.stderr
    recipients, msg, _ = queued(sendmail)
    assert recipients == ["j@example.org"]
    assert [a.display_name for a in msg["To"].addresses] == ["Müller, Jörg"]
    assert msg["Subject"] == "Re: comma in a name"


def test_reply_all_carries_decoded_names(env: dict[str, str], tmp_path: Path,
                                         sendmail: object) -> None:
    box = mbox(tmp_path / "box", [
        b"From: \xc3\x81lvaro <a@example.org>\nCc: =?UTF-8?Q?Bj=C3=B6rn?= <b@example.org>,"
        b" \"Z\xc3\xbcrich, Team\" <z@example.org>\nSubject: \xc3\xa9t\xc3\xa9"])
    r = run_mail(env, "-f", str(box), input=b"R 1\nthanks\n.\nx\n")
    assert r.returncode == 0, r.stderr
    recipients, msg, data = queued(sendmail)
    assert sorted(recipients) == ["a@example.org", "b@example.org", "team@example.org",
                                  "z@example.org"]
    assert msg["Subject"] == "Re: été"
    assert [a.display_name for a in msg["To"].addresses] == ["Álvaro"]
    assert [a.display_name for a in msg["Cc"].addresses] == ["", "Björn", "Zürich, Team"]
    assert data.split(b"\n\n", 1)[0].isascii()
