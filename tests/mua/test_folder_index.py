"""The mbox index of mail's folders: what it finds per message (start, size, header block,
lines, stored Status:) agrees with a plain reading of the file, across read blocks."""

import random
import subprocess
from pathlib import Path

import pytest

from pymailtools.config import Config
from pymailtools.mua import folder
from tests.conftest import need_tool
from tests.support.mail import mail_env, run_mail

FROM = b"From a@example.org Thu Jan  1 00:00:00 1970\n"


def plain_reading(data: bytes) -> list[tuple[int, int, bytes, int, bool, bool]]:
    """(start, size, header block, lines, R, O) of each message: split at every "\\nFrom ",
    the header block up to the first blank line, its Status: fields (the name in any case),
    R and O anywhere in any of their values."""
    starts = [0] if data.startswith(b"From ") else []
    pos = data.find(b"\nFrom ")
    while pos >= 0:
        starts.append(pos + 1)
        pos = data.find(b"\nFrom ", pos + 1)
    out = []
    for start, end in zip(starts, starts[1:] + [len(data)]):  # noqa: B905 (one more end)
        msg = data[start:end]
        lines = msg.split(b"\n")  # the header block ends before the first empty or CR line
        blank = next((n for n, line in enumerate(lines[:-1]) if line in (b"", b"\r")), None)
        head = msg if blank is None else b"\n".join(lines[:blank]) + b"\n"
        letters = b"".join(line[7:] for line in head.split(b"\n")[1:]
                           if line[:7].lower() == b"status:")
        out.append((start, len(msg), head, msg.count(b"\n"), b"R" in letters, b"O" in letters))
    return out


PIECES = [b"Subject: x\n", b"Status: RO\n", b"STATUS: R\n", b"status:O\n", b"Status:\tOR x\n",
          b"Status: X\n", b"Status: \n", b"sTaTuS: RO\n", b"X-Status: R\n", b">From here\n",
          b"Status: RO\r\n", b"Status: R\r\n", b"Status: O\rx\n",
          b"From inside a line\n", b"Status: R", b"\n", b"text\n", b"\r\n",
          b"X-Long: " + b"h" * 3000 + b"\n"]


def random_mbox(rnd: random.Random) -> bytes:
    out = [b"text before the first message\n"] if rnd.random() < 0.2 else []
    for _ in range(rnd.randrange(0, 40)):
        head = [FROM]
        fields = [rnd.choice(PIECES[:13] + PIECES[17:]) for _ in range(rnd.randrange(0, 5))]
        status = [f for f in fields if f[:7].lower() == b"status:"]
        if rnd.random() < 0.7:  # one Status: field at most; else they add up
            fields = [f for f in fields if f not in status[1:]]
        head += fields
        body = [rnd.choice(PIECES) for _ in range(rnd.randrange(0, 6))]
        if rnd.random() < 0.05:
            body.append(b"y" * rnd.randrange(1, 20_000) + b"\n")
        # a blank line (CRLF in some mailboxes) or none: all header
        blank = [rnd.choice([b"\n", b"\n", b"\r\n"])] if rnd.random() < 0.85 else []
        out.append(b"".join(head + blank + body) + (b"\n" if rnd.random() < 0.9 else b""))
    return b"".join(out)


def opened_by_both(env: dict[str, str], path: Path) -> tuple[list[str], list[str]]:
    """The banner and window lines of ``mail -f path`` and of ``s-nail -f path``, x typed."""
    snail = need_tool("s-nail", "s-nail")
    ours = run_mail(env, "-f", str(path), input=b"x\n").stdout.decode().splitlines()
    theirs = subprocess.run([snail, "-:/", "-Sheadline-plain", "-f", str(path)],
                            input=b"x\n", capture_output=True, timeout=60,
                            env=env).stdout.decode().splitlines()
    return ours, [ln for ln in theirs if ln.strip() and not ln.startswith("s-nail version")]


@pytest.mark.parametrize("block", [300, 1024, 4096, folder.BLOCK])
def test_index_agrees_with_a_plain_reading(tmp_path: Path, config: Config, block: int,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages and header blocks longer than a read block, Status: fields in any case, in
    the body, after a message without a blank line, at the end of a file without a newline;
    header blocks and line counts both as a summary batch and one by one."""
    monkeypatch.setattr(folder, "BLOCK", block)
    monkeypatch.setattr(folder, "HEAD_BLOCK", max(64, block // 4))
    rnd = random.Random(block)
    path = tmp_path / "box"
    for round_ in range(60):
        data = random_mbox(rnd)
        path.write_bytes(data)
        want = plain_reading(data)
        box = folder.load(str(path), config)
        try:
            assert isinstance(box, folder.MboxFolder)
            assert box.prefix == (want[0][0] if want else len(data))
            entries = list(box.entries)
            assert len(entries) == len(want)
            if round_ % 2:
                heads = list(box.header_blocks(entries))
            else:
                heads = [box.header_block(e) for e in entries]
            got = [(box.starts[i], e.size, heads[i], e.lines, e.seen, e.old)
                   for i, e in enumerate(entries)]
            assert got == want, data
        finally:
            box.close()


def test_odd_status_fields_open_as_snail_reads_them(config_file: Path, tmp_path: Path) -> None:
    """The banner's counts and the window's letters of a folder whose Status: fields sit in
    odd places agree with s-nail's."""
    msgs = [
        b"STATUS: RO\nSubject: one\n\nbody\n",  # read, the field name in capitals
        b"Subject: two\n\nStatus: RO\n",  # a Status: line in the body: new
        b"Subject: three\nstatus: O\n\nbody\n",  # old, lower-case name
        b"Subject: four\nStatus: O\nno blank line follows\n",  # all header
        b"Subject: five\n\n\nStatus: R\n",
        b"Subject: six\nX-Status: RO\n\n>From the body\n",
        b"Subject: seven\nStatus:\tRO junk\n\nbody\n",
        b"Subject: eight\nStatus: O",  # the file's last line, no newline
    ]
    path = tmp_path / "odd"
    path.write_bytes(b"\n".join(FROM + m for m in msgs))
    env = mail_env(config_file, tmp_path)
    ours, theirs = opened_by_both(env, path)
    assert ours[0].split(": ", 1)[1] == theirs[0].split(": ", 1)[1] == "8 messages 3 new 6 unread"
    assert [ln[1] for ln in ours[1:]] == [ln[1] for ln in theirs[1:]] == list("ONUUNNOU")


@pytest.mark.parametrize("msgs", [
    [b"Subject: O then R\nStatus: O\nStatus: R\n\nb\n",  # the fields add up
     b"Subject: X R O\nStatus: X R O\n\nb\n",  # R and O anywhere in the value
     b"Subject: R\nStatus: R\n\nb\n",  # read, not old: new, shown R
     b"Subject: RO\nStatus: RO\n\nb\n", b"Subject: O\nStatus: O\n\nb\n",
     b"Subject: none\n\nb\n"],
    [b"Subject: none\n\nb\n", b"Subject: R\nStatus: R\n\nb\n"],  # unread <= new: not said
    [b"Subject: R\nStatus: R\n\nb\n", b"Subject: RO\nStatus: RO\n\nb\n"],
    [b"Subject: none\n\nb\n", b"Subject: R\nStatus: R\n\nb\n",
     b"Subject: O\nStatus: O\n\nb\n"],
    # lowercase letters are no flags (capitals only), whichever way the field is read
    [b"Subject: r\nStatus: r\n\nb\n", b"Subject: ro\nStatus: ro\n\nb\n",
     b"Subject: Ro\nStatus: Ro\nX: y\n\nb\n", b"Subject: o\nStatus: o\r\n\nb\n",
     b"Subject: RO\nStatus: RO\n\nb\n"],
])
def test_status_flags_read_as_snail_reads_them(config_file: Path, tmp_path: Path,
                                               msgs: list[bytes]) -> None:
    """The banner, the current message and each message's letter agree with s-nail's on
    the same folder: every Status: field counts, a read message without O is still new."""
    path = tmp_path / "box"
    path.write_bytes(b"\n".join(FROM + m for m in msgs))
    env = mail_env(config_file, tmp_path)
    ours, theirs = opened_by_both(env, path)
    assert ours[0].split(": ", 1)[1] == theirs[0].split(": ", 1)[1]
    assert [ln[:2] for ln in ours[1:]] == [ln[:2] for ln in theirs[1:]]
    assert len(ours) == len(msgs) + 1


def test_a_crlf_mailbox_opens_as_snail_reads_it(config_file: Path, tmp_path: Path) -> None:
    """A mailbox written with CRLF line ends: its header blocks end at the first "\\r\\n"
    line, so a Status: line in a body is no flag (it was read as one)."""
    msgs = [b"Subject: one\nStatus: RO\n\nbody\n",
            b"Subject: two\n\nbody\nStatus: RO\n",  # in the body: new
            b"Subject: three\nstatus: O\n\nStatus: R\n",
            b"Subject: four\n\nStatus: O\n"]
    path = tmp_path / "crlf"
    path.write_bytes(b"\n".join(FROM + m for m in msgs).replace(b"\n", b"\r\n"))
    env = mail_env(config_file, tmp_path)
    ours, theirs = opened_by_both(env, path)
    assert ours[0].split(": ", 1)[1] == theirs[0].split(": ", 1)[1]
    assert [ln[1] for ln in ours[1:]] == [ln[1] for ln in theirs[1:]] == list("ONUN")
    # w writes the body after the CRLF blank line, not the whole message
    out = tmp_path / "bodies"
    run_mail(env, "-f", str(path), input=f"w 2 {out}\nx\n".encode())
    assert out.read_bytes() == b"body\r\nStatus: RO\r\n\r\n"
    # reading message 2 and quitting writes its Status: field with the mailbox's line ends
    run_mail(env, "-f", str(path), input=b"p 2\nq\n")
    data = path.read_bytes()
    assert data.count(b"\n") == data.count(b"\r\n")
    assert b"Subject: two\r\nStatus: RO\r\n\r\nbody\r\n" in data


def test_a_crlf_message_without_header_fields_gets_a_crlf_status_field(config_file: Path,
                                                                      tmp_path: Path) -> None:
    """The Status: field written into a CRLF mailbox ends in CRLF also when the message has
    no header field to take the line end from (its From_ line has one)."""
    path = tmp_path / "crlf"
    path.write_bytes((FROM + b"\nbody\n\n" + FROM + b"Subject: two\n\nbody\n").replace(
        b"\n", b"\r\n"))
    env = mail_env(config_file, tmp_path)
    run_mail(env, "-f", str(path), input=b"p 1\np 2\nq\n")
    data = path.read_bytes()
    assert data.count(b"\n") == data.count(b"\r\n")
    assert data.startswith(FROM.replace(b"\n", b"\r\n") + b"Status: RO\r\n\r\nbody\r\n")
    assert b"Subject: two\r\nStatus: RO\r\n\r\nbody\r\n" in data


def test_colon_selections_after_reading_agree_with_snail(config_file: Path,
                                                         tmp_path: Path) -> None:
    """:n, :o, :r and :u once a new message is read in the session: it stays new (not old)
    until the folder is left, as s-nail counts it."""
    snail = need_tool("s-nail", "s-nail")
    msgs = [b"Subject: none\n\nb\n", b"Subject: R\nStatus: R\n\nb\n",
            b"Subject: O\nStatus: O\n\nb\n", b"Subject: RO\nStatus: RO\n\nb\n",
            b"Subject: none2\n\nb\n"]
    path = tmp_path / "box"
    path.write_bytes(b"\n".join(FROM + m for m in msgs))
    env = mail_env(config_file, tmp_path)

    def listed(out: bytes) -> list[tuple[str, str]]:
        # (letter, number) of the header lines, the 5 of the opening summary first
        lines = [ln for ln in out.decode().splitlines()
                 if len(ln) > 4 and ln[0] in " >" and ln[2:].split()[:1] != []
                 and ln[2:].split()[0].isdigit()]
        return [(ln[1], ln[2:].split()[0]) for ln in lines]

    script = b"p 1\nf :n\nf :o\nf :r\nf :u\nx\n"
    ours = listed(run_mail(env, "-f", str(path), input=script).stdout)
    theirs = listed(subprocess.run([snail, "-:/", "-Sheadline-plain", "-f", str(path)],
                                   input=script, capture_output=True, timeout=60,
                                   env=env).stdout)
    assert ours == theirs
    assert len(ours) > 5
