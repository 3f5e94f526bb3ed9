"""mail(1) read mode: -H, -e, -f, -u, commands from a pipe and a pseudo-terminal, Status, q."""

import hashlib
import io
import os
import subprocess
import time
from pathlib import Path

import pytest

from pymailtools.config import Config
from pymailtools.local import mbox
from tests.conftest import need_tool, script
from tests.support.mail import Pty, mail_env, run_mail


def message(n: int, sender: str = "alice@example.org", subject: str = "") -> bytes:
    return (f"From: {sender}\nTo: root@host.example.test\nSubject: {subject or f'msg {n}'}\n"
            f"Message-ID: <m{n}@example.org>\n\nbody of message {n}\n").encode()


def deliver(config: Config, path: Path, data: bytes, sender: str = "alice@example.org") -> None:
    """Append with our own MDA (locks, From_ line, mboxrd), as the runner would."""
    mbox.append(str(path), io.BytesIO(data), sender=sender, recipient="root@host.example.test",
                uid=os.getuid(), gid=os.getgid(), config=config)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


@pytest.fixture
def box(tmp_path: Path, config: Config) -> Path:
    path = tmp_path / "box"
    for n in (1, 2, 3):
        deliver(config, path, message(n, subject=f"Subject number {n}"))
    return path


@pytest.fixture
def env(config_file: Path, home: Path, box: Path) -> dict[str, str]:
    return mail_env(config_file, home, MAIL=str(box))


def statuses(path: Path) -> list[str]:
    """The Status: value of each message in an mbox ('' when absent)."""
    out = []
    for chunk in path.read_bytes().split(b"\nFrom ")[0:]:
        head = chunk.split(b"\n\n", 1)[0]
        found = [ln[7:].strip().decode() for ln in head.split(b"\n") if ln.startswith(b"Status:")]
        out.append(found[0] if found else "")
    return out


# --- -H, -e, empty mailboxes -------------------------------------------------------------------

def test_dash_H_lists_and_never_modifies(env: dict[str, str], box: Path) -> None:
    before, st = sha(box), box.stat()
    r = run_mail(env, "-H")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(">N  1 alice@example.org ")
    assert lines[0].endswith("Subject number 1")
    assert lines[2].startswith(" N  3 ")
    assert sha(box) == before and box.stat().st_size == st.st_size
    assert not Path(str(box) + ".lock").exists()


def test_header_line_shape(env: dict[str, str], box: Path) -> None:
    line = run_mail(env, "-H").stdout.decode().splitlines()[1]
    size = len(box.read_bytes().split(b"\nFrom ")[1]) + len(b"From ") + 1
    # cursor, status, number, sender (18), date (16), lines/bytes, subject
    parts = line.split()
    assert parts[0] == "N" and parts[1] == "2" and parts[2] == "alice@example.org"
    assert parts[7].split("/")[1] == str(size - 1) or parts[7].split("/")[1] == str(size)
    assert line[24:40].strip()[:3] in ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def test_dash_e_status_and_silence(env: dict[str, str], tmp_path: Path) -> None:
    r = run_mail(env, "-e")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
    r = run_mail(dict(env, MAIL=str(tmp_path / "nothing")), "-e")
    assert (r.returncode, r.stdout, r.stderr) == (1, b"", b"")
    (tmp_path / "empty").write_bytes(b"")
    assert run_mail(dict(env, MAIL=str(tmp_path / "empty")), "-e").returncode == 1


def test_no_mail_for_user(env: dict[str, str], tmp_path: Path) -> None:
    r = run_mail(dict(env, MAIL=str(tmp_path / "nothing")))
    assert r.returncode == 1
    assert r.stderr.decode() == "No mail for root\n"


def test_dash_f_file_and_default_mbox(env: dict[str, str], home: Path, config: Config,
                                      box: Path) -> None:
    other = home / "saved"
    deliver(config, other, message(9, subject="in the other file"))
    r = run_mail(env, "-H", "-f", str(other))
    assert r.returncode == 0 and "in the other file" in r.stdout.decode()
    r = run_mail(env, "-f", str(other), "-H")  # options after -f: the file is still the operand
    assert "in the other file" in r.stdout.decode()
    deliver(config, home / "mbox", message(7, subject="in mbox"))
    r = run_mail(env, "-H", "-f")
    assert r.returncode == 0 and "in mbox" in r.stdout.decode()
    r = run_mail(env, "-H", "-f", str(home / "missing"))
    assert r.returncode == 66 and b"No such file" in r.stderr


def test_dash_u_reads_that_users_spool(config_file: Path, home: Path, spool: Path,
                                       config: Config, system_user: object) -> None:
    name = system_user.pw_name  # type: ignore[attr-defined]
    deliver(config, spool / name, message(1, subject="for the user"))
    r = run_mail(mail_env(config_file, home), "-H", "-u", name)
    assert r.returncode == 0, r.stderr
    assert "for the user" in r.stdout.decode()


def test_hostile_headers_are_shown_safely(env: dict[str, str], tmp_path: Path,
                                          config: Config) -> None:
    """Escape sequences, bogus charsets, invalid UTF-8 never reach the terminal raw."""
    path = tmp_path / "hostile"
    deliver(config, path, b"From: \x1b]0;x\x07evil@x.test\nSubject: =?x-unknown?B?!!!?= \xff\x1b[2J"
            b"\n\nbody \x1b[31mred\n")
    r = run_mail(dict(env, MAIL=str(path)), "-H")
    assert r.returncode == 0
    assert b"\x1b" not in r.stdout and b"\x07" not in r.stdout
    r = run_mail(dict(env, MAIL=str(path)), input=b"p 1\nx\n")
    assert r.returncode == 0 and b"\x1b" not in r.stdout and b"^[[31mred" in r.stdout


# --- commands from a pipe ----------------------------------------------------------------------

def test_print_delete_quit_on_a_folder(env: dict[str, str], box: Path) -> None:
    r = run_mail(env, "-f", str(box), input=b"p 1\nd 2\nq\n")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert out.startswith(f'"{box}": 3 messages 3 new\n')
    assert "Message 1:" in out and "body of message 1" in out and "Subject: Subject number 1" in out
    data = box.read_bytes()
    assert b"message 2" not in data and data.count(b"\nFrom ") + data.startswith(b"From ") == 2
    # Read -> RO; seen but unread -> O (mailx); a -f folder keeps read messages.
    assert statuses(box) == ["RO", "O"]


def test_quit_moves_read_messages_to_mbox(env: dict[str, str], box: Path, home: Path) -> None:
    r = run_mail(env, input=b"t 2\nq\n")
    assert r.returncode == 0, r.stderr
    assert f"Saved 1 message in {home}/mbox" in r.stdout.decode()
    assert f"Held 2 messages in {box}" in r.stdout.decode()
    assert b"message 2" in (home / "mbox").read_bytes()
    assert b"message 2" not in box.read_bytes()
    assert statuses(home / "mbox") == ["RO"]


def test_hold_keeps_read_messages(env: dict[str, str], box: Path, home: Path) -> None:
    r = run_mail(env, "-S", "hold", input=b"p 2\nq\n")
    assert r.returncode == 0
    assert not (home / "mbox").exists()
    assert statuses(box) == ["O", "RO", "O"]


def test_exit_leaves_file_byte_identical(env: dict[str, str], box: Path) -> None:
    before = sha(box)
    r = run_mail(env, input=b"p 1\nd 2\nx\n")
    assert r.returncode == 0 and sha(box) == before


def test_message_lists_and_navigation(env: dict[str, str], config: Config, box: Path) -> None:
    deliver(config, box, message(4, sender="bob@example.net", subject="lunch?"))
    r = run_mail(env, input=b"f bob\nf /number\nf 2-3\nf $\n=\n\n\nn\n-\nx\n")
    out = r.stdout.decode().splitlines()
    summaries = [ln for ln in out if ln[2:5].strip().isdigit() and "@" in ln]
    shown = [ln.split()[-1] for ln in summaries[4:]]
    assert shown[0] == "lunch?"                         # f bob
    assert shown[1:4] == ["1", "2", "3"]                # f /number
    assert shown[4:6] == ["2", "3"] and shown[6] == "lunch?"  # f 2-3, f $
    assert "1" in out
    order = [ln for ln in out if ln.startswith("Message ")]
    assert order == ["Message 1:", "Message 2:", "Message 3:", "Message 2:"]


def test_save_marks_and_removes_from_system_mailbox(env: dict[str, str], box: Path,
                                                    tmp_path: Path) -> None:
    target = tmp_path / "saved.mbox"
    r = run_mail(env, input=f"s 1 {target}\nc 3 {target}\nh\nq\n".encode())
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert f'"{target}" [New file]' in out and f'"{target}" [Appended]' in out
    assert any(ln.startswith(">*  1") or ln.startswith(" *  1") for ln in out.splitlines())
    saved = target.read_bytes()
    assert b"message 1" in saved and b"message 3" in saved
    assert b"message 1" not in box.read_bytes() and b"message 3" in box.read_bytes()


def test_write_saves_body_only(env: dict[str, str], tmp_path: Path) -> None:
    target = tmp_path / "body.txt"
    run_mail(env, input=f"w 2 {target}\nx\n".encode())
    assert target.read_bytes() == b"body of message 2\n\n" or \
        target.read_bytes() == b"body of message 2\n"


def test_reply_queues_with_references(env: dict[str, str], sendmail: object) -> None:
    r = run_mail(env, input=b"r 2\nthanks\n.\nx\n")
    assert r.returncode == 0, r.stderr
    entries = sendmail.entries()  # type: ignore[attr-defined]
    assert len(entries) == 1
    _, envelope, data = entries[0]
    assert [x.address for x in envelope.recipients] == ["alice@example.org"]
    assert b"Subject: Re: Subject number 2\n" in data
    assert b"In-Reply-To: <m2@example.org>\n" in data and b"References: <m2@example.org>\n" in data
    assert data.endswith(b"thanks\n")


def test_mime_message_shows_text_and_lists_attachments(env: dict[str, str], tmp_path: Path,
                                                       config_file: Path, home: Path,
                                                       config: Config) -> None:
    (tmp_path / "data.bin").write_bytes(bytes(300))
    menv = mail_env(config_file, home)
    assert run_mail(menv, "-s", "mime", "-a", str(tmp_path / "data.bin"), "u@x.test",
                    input="Grüße aus dem Text\n".encode()).returncode == 0
    from pymailtools.queue.store import Queue

    q = Queue(config.queue_directory)
    qid = q.ids("incoming")[0]
    path = tmp_path / "mimebox"
    deliver(config, path, q.read_message(qid))
    r = run_mail(dict(env, MAIL=str(path)), input=b"p\nx\n")
    out = r.stdout.decode()
    assert "Grüße aus dem Text" in out
    assert "[-- Attachment #2: data.bin (application/octet-stream, 300 bytes) --]" in out
    assert "AAAA" not in out  # base64 is not dumped on the user


# --- concurrency and unsafe mailboxes -----------------------------------------------------------

def test_mail_arriving_during_session_survives_quit(env: dict[str, str], box: Path,
                                                    config: Config) -> None:
    """A delivery while mail is open is still in the mailbox after q."""
    proc = subprocess.Popen([script("mail")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    try:
        assert proc.stdin and proc.stdout
        proc.stdin.write(b"p 1\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 60
        seen = b""
        while b"body of message 1" not in seen and time.monotonic() < deadline:
            seen += proc.stdout.readline()
        assert b"body of message 1" in seen
        deliver(config, box, message(4, subject="arrived meanwhile"))
        out, err = proc.communicate(b"d 2\nq\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    data = box.read_bytes()
    assert b"arrived meanwhile" in data and b"message 2" not in data
    assert b"You have new mail." in out
    assert data.count(b"\nFrom ") + 1 == 2  # message 3 and the new one (1 went to mbox)


def test_mailbox_changed_in_place_meanwhile_is_not_rewritten(env: dict[str, str],
                                                             box: Path) -> None:
    """Another program rewrote the mailbox in place while mail was open: q refuses (75) and
    leaves that program's content alone."""
    proc = subprocess.Popen([script("mail"), "-f", str(box)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert proc.stdin and proc.stdout
        proc.stdin.write(b"=\n")
        proc.stdin.flush()
        assert proc.stdout.readline().startswith(b'"')  # the banner: the folder is indexed
        data = box.read_bytes().replace(b"body of message 2", b"BODY OF MESSAGE 2")
        with open(box, "r+b") as f:
            f.write(data)
        out, err = proc.communicate(b"d 1\nq\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75
    assert err.decode() == f"mail: {box}: changed by another program while open; your changes " \
        "were not saved\n"
    assert box.read_bytes() == data


def test_rewrite_follows_our_deliverer_inode_check(env: dict[str, str], box: Path,
                                                   config: Config) -> None:
    """After q rewrote by rename, a later delivery lands in the new file, not a dead inode."""
    ino = box.stat().st_ino
    assert run_mail(env, "-f", str(box), input=b"d 1\nq\n").returncode == 0
    deliver(config, box, message(5, subject="after rewrite"))
    data = box.read_bytes()
    assert b"after rewrite" in data and b"message 1" not in data
    assert box.stat().st_ino != ino or data.count(b"\nFrom ") == 2


def test_symlinked_mailbox_is_not_rewritten(env: dict[str, str], box: Path,
                                            tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(box)
    before = sha(box)
    r = run_mail(dict(env, MAIL=str(link)), input=b"d 1\nq\n")
    assert r.returncode == 75
    assert r.stderr.decode() == f"mail: {link}: is a symbolic link; not rewritten\n"
    assert sha(box) == before and link.is_symlink()


def test_maildir_listing_and_quit(env: dict[str, str], tmp_path: Path) -> None:
    md = tmp_path / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (md / sub).mkdir(parents=True)
    (md / "new" / "1.a.host").write_bytes(message(1, subject="maildir new"))
    (md / "cur" / "2.b.host:2,S").write_bytes(message(2, subject="maildir seen"))
    os.utime(md / "cur" / "2.b.host:2,S", (1, 1))
    r = run_mail(dict(env, MAIL=str(md)), "-H")
    lines = r.stdout.decode().splitlines()
    assert lines[0].startswith(" O  1") and lines[0].endswith("maildir seen")
    assert lines[1].startswith(">N  2") and lines[1].endswith("maildir new")
    r = run_mail(dict(env, MAIL=str(md)), "-f", str(md), input=b"p 2\nq\n")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(md / "cur")) == ["1.a.host:2,S", "2.b.host:2,S"]
    assert os.listdir(md / "new") == []


def test_save_from_maildir_frames_as_our_deliverer_does(env: dict[str, str], tmp_path: Path,
                                                        config: Config) -> None:
    """`s` out of a Maildir writes the MDA's framing (separator after a torn last message, From_
    line, mboxrd quoting), and reading the saved file gives the message back."""
    md = tmp_path / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (md / sub).mkdir(parents=True)
    raw = (b"Return-Path: <bea@example.org>\nFrom: bea@example.org\nSubject: quoting\n\n"
           b"From here on\n>From there\nend\n")
    (md / "new" / "1.a.host").write_bytes(raw)
    target = tmp_path / "saved.mbox"
    target.write_bytes(b"From x Thu Jan  1 00:00:00 1970\nSubject: torn\n\nno newline")
    r = run_mail(dict(env, MAIL=str(md)), "-f", str(md), input=f"s 1 {target}\nx\n".encode())
    assert r.returncode == 0, r.stderr
    saved = target.read_bytes()
    first, second = saved.split(b"\n\nFrom ", 1)
    assert first.endswith(b"no newline")
    assert second.startswith(b"bea@example.org ")
    assert second.endswith(b"\n>From here on\n>>From there\nend\n\n")
    # The same bytes our deliverer writes for that message.
    ours = tmp_path / "ours.mbox"
    deliver(config, ours, raw.split(b"\n", 1)[1], sender="bea@example.org")
    assert ours.read_bytes().endswith(b"\n>From here on\n>>From there\nend\n\n")
    r = run_mail(env, "-f", str(target), input=b"p 2\nx\n")
    assert r.returncode == 0, r.stderr
    shown = r.stdout.decode("utf-8", "replace")
    assert "\nFrom here on\n>From there\nend" in shown


# --- interop with s-nail ------------------------------------------------------------------------

@pytest.mark.interop
def test_snail_agrees_with_our_status(env: dict[str, str], box: Path) -> None:
    snail = need_tool("s-nail", "s-nail")
    assert run_mail(env, "-f", str(box), input=b"p 2\nq\n").returncode == 0
    ours = [ln[:5] for ln in run_mail(env, "-H", "-f", str(box)).stdout.decode().splitlines()]
    theirs = subprocess.run([snail, "-n", "-Sheadline-plain", "-H", "-f", str(box)],
                            capture_output=True, timeout=60, env=env).stdout.decode()
    theirs_lines = [ln[:5] for ln in theirs.splitlines()]
    assert len(ours) == len(theirs_lines) == 3
    assert [s[1] for s in ours] == [s[1] for s in theirs_lines] == ["U", "O", "U"]


@pytest.mark.interop
def test_we_read_a_mailbox_snail_modified(env: dict[str, str], box: Path) -> None:
    snail = need_tool("s-nail", "s-nail")
    # Without MAIL pointing at it, s-nail treats the file as a folder (no move to ~/mbox).
    senv = {k: v for k, v in env.items() if k != "MAIL"}
    subprocess.run([snail, "-n", "-Sheadline-plain", "-f", str(box)], input=b"p 1\nd 3\nq\n",
                   capture_output=True, timeout=60, env=senv, check=True)
    lines = run_mail(env, "-H", "-f", str(box)).stdout.decode().splitlines()
    assert len(lines) == 2
    assert lines[0][1] == "O" and lines[0].endswith("Subject number 1")
    assert lines[1][1] == "U" and lines[1].endswith("Subject number 2")


# --- pseudo-terminal sessions -------------------------------------------------------------------

def test_interactive_read_session(env: dict[str, str], box: Path, home: Path) -> None:
    t = Pty([script("mail")], env)
    try:
        t.expect("3 messages 3 new")
        t.expect("& ")
        t.send("t 2")
        t.expect("body of message 2")
        t.expect("& ")
        t.send("n")
        t.expect("Message 3:")
        t.expect("& ")
        t.send("d 1")
        t.expect("& ")
        t.send("h")
        header = t.expect("& ").decode()
        assert "Subject number 1" not in header and ">R  3" in header
        t.send("?")
        t.expect("reply|r")
        t.send("q")
        t.expect("Saved 2 messages in")
        assert t.wait() == 0
    finally:
        t.close()
    assert (home / "mbox").read_bytes().count(b"body of message") == 2
    assert b"message 1" not in box.read_bytes()


def test_interactive_compose_tilde_escapes(config_file: Path, home: Path, sendmail: object,
                                           tmp_path: Path) -> None:
    insert = tmp_path / "insert.txt"
    insert.write_text("inserted text\n")
    t = Pty([script("mail"), "to@x.test"], mail_env(config_file, home))
    try:
        t.expect("Subject: ")
        t.send("first subject")
        t.send("line one")
        t.send("~s Real subject")
        t.send("~c cc@x.test")
        t.send("~b bcc@x.test")
        t.send(f"~r {insert}")
        t.expect("1/14")
        t.send("~~tilde line")
        t.send("~p")
        t.expect("Message contains:")
        t.expect("(continue)")
        t.send("~?")
        t.expect("~x              Abort")
        t.send("~.")
        t.expect("EOT")
        assert t.wait() == 0
    finally:
        t.close()
    entries = sendmail.entries()  # type: ignore[attr-defined]
    assert len(entries) == 1
    _, envelope, data = entries[0]
    assert sorted(r.address for r in envelope.recipients) == ["bcc@x.test", "cc@x.test",
                                                            "to@x.test"]
    assert b"Subject: Real subject\n" in data and b"Cc: cc@x.test\n" in data
    assert b"bcc@x.test" not in data
    assert data.endswith(b"line one\ninserted text\n~tilde line\n")


@pytest.mark.parametrize("escape", ["~q", "~x"])
def test_interactive_abort(config_file: Path, home: Path, sendmail: object,
                           escape: str) -> None:
    t = Pty([script("mail"), "-s", "s", "to@x.test"], mail_env(config_file, home))
    try:
        t.send("unfinished words")
        t.send(escape)
        assert t.wait() == 0
    finally:
        t.close()
    assert sendmail.entries() == []  # type: ignore[attr-defined]
    dead = home / "dead.letter"
    if escape == "~q":
        assert b"unfinished words" in dead.read_bytes()
    else:
        assert not dead.exists()


def test_interactive_dot_ends_and_eof_ends(config_file: Path, home: Path,
                                           sendmail: object) -> None:
    t = Pty([script("mail"), "-s", "dot", "to@x.test"], mail_env(config_file, home))
    try:
        t.send("text")
        t.send(".")
        t.expect("EOT")
        assert t.wait() == 0
        t = Pty([script("mail"), "-s", "eof", "to@x.test"], mail_env(config_file, home))
        t.send("more")
        t.expect("more")
        t.eof()
        t.expect("EOT")
        assert t.wait() == 0
    finally:
        t.close()
    assert len(sendmail.entries()) == 2  # type: ignore[attr-defined]


# --- the folder-internal message of UW-IMAP and Dovecot ----------------------------------------

PSEUDO = (b"From MAILER_DAEMON  Sun Dec  6 10:00:00 2026\n"
          b"Date: Sun, 06 Dec 2026 10:00:00 +0000\n"
          b"From: Mail System Internal Data <MAILER-DAEMON@host.example.test>\n"
          b"Subject: DON'T DELETE THIS MESSAGE -- FOLDER INTERNAL DATA\n"
          b"Message-ID: <1765015200@host.example.test>\n"
          b"X-IMAP: 1765015200 0000000004\n"
          b"Status: RO\n\n"
          b"This text is part of the internal format of your mail folder, and is not\n"
          b"a real message.  It is created automatically by the mail system software.\n"
          b"If deleted, important folder data will be lost, and it will be re-created\n"
          b"with the data reset to initial values.\n\n")


def test_imap_server_internal_message_is_hidden_and_kept_first(env: dict[str, str], box: Path,
                                                               home: Path) -> None:
    """An mbox an IMAP server rewrote starts with its folder-internal message: mail neither
    counts, numbers, shows nor removes it, and a rewrite keeps it first, byte for byte."""
    box.write_bytes(PSEUDO + box.read_bytes())
    r = run_mail(env, "-H")
    lines = r.stdout.decode().splitlines()
    assert [ln[1:5] for ln in lines] == ["N  1", "N  2", "N  3"]
    assert lines[0].endswith("Subject number 1") and "INTERNAL" not in r.stdout.decode()
    r = run_mail(env, "-f", str(box), input=b"p 1\nf *\nd *\nq\n")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert out.startswith(f'"{box}": 3 messages 3 new\n') and "INTERNAL" not in out
    assert "Subject number 1" in out
    assert box.read_bytes() == PSEUDO
    assert run_mail(env, "-e").returncode == 1
    r = run_mail(env, "-f", str(box))
    assert r.returncode == 1 and r.stdout.decode() == f'"{box}": 0 messages\n'


def test_first_message_with_imap_headers_is_an_ordinary_message(env: dict[str, str],
                                                                  box: Path) -> None:
    """Dovecot also keeps X-IMAPbase in a real first message: that one is mail like any other."""
    data = box.read_bytes()
    first_nl = data.index(b"\n") + 1
    box.write_bytes(data[:first_nl] + b"X-IMAPbase: 1765015200 4\n" + data[first_nl:])
    lines = run_mail(env, "-H").stdout.decode().splitlines()
    assert len(lines) == 3 and lines[0].endswith("Subject number 1")


# --- big folders: the index is built in blocks --------------------------------------------------

def test_big_mbox_index_and_rewrite_across_read_blocks(env: dict[str, str], tmp_path: Path) -> None:
    """Messages and header blocks straddling the reader's 1 MiB reads are indexed as a whole
    read would, and a rewrite keeps every other message byte for byte (Status: O added)."""
    import random

    rnd = random.Random(7)
    entries = []
    for n in range(1, 3001):
        head = f"From a@x.test Thu Jan  1 00:00:{n % 60:02d} 1970\nSubject: m{n}\n"
        if n == 1500:
            head += "X-Long: " + "h" * 300_000 + "\n"  # a header block longer than a read
        if n % 2:
            head += "Status: O\n"
        body = "x" * rnd.randrange(0, 2000) + "\n" if n != 2000 else "y\n" * 1_200_000
        entries.append((head + "\n" + body + "\n").encode())
    path = tmp_path / "big"
    path.write_bytes(b"".join(entries))
    lines = run_mail(dict(env, MAIL=str(path)), "-H").stdout.decode().splitlines()
    assert len(lines) == 3000
    for n in (1, 1499, 1500, 1501, 2000, 2001, 3000):
        raw = entries[n - 1]
        assert lines[n - 1].endswith(f" m{n}")
        count = raw.count(b"\n")
        assert f" {count:4d}/{len(raw):<5d}" in lines[n - 1]
    r = run_mail(env, "-f", str(path), input=b"d 2\nd 1500\nd 2000-2002\nd 3000\nq\n")
    assert r.returncode == 0, r.stderr
    gone = {2, 1500, 2000, 2001, 2002, 3000}
    want = [e if n % 2 else e.replace(b"\n\n", b"\nStatus: O\n\n", 1)
            for n, e in enumerate(entries, 1) if n not in gone]
    assert path.read_bytes() == b"".join(want)


def test_date_column_without_the_email_package_agrees_with_it() -> None:
    """The summary's quick Date: reading gives what email.utils gives, or leaves it to it."""
    from pymailtools.mua.reader import _parsed_date, _plain_date

    for value in ("Tue, 14 Nov 2023 22:13:20 +0000", "1 Jan 2024 09:05 -0500",
                  "Thu, 29 Feb 2024 23:59:59 +0100 (CET)", "Mon, 29 Feb 2100 10:00:00 +0000",
                  "Sat, 1 jan 2000 00:00:00 GMT", "14 Nov 23 22:13 +0000", "9:05 1 Jan 2024",
                  "garbage", ""):
        quick = _plain_date(value)
        assert quick in ("", _parsed_date(value)), value
        assert quick or not value.startswith(("Tue", "1 Jan", "Thu", "Sat")), value


def test_header_window_without_a_terminal_is_snails(env: dict[str, str], tmp_path: Path,
                                                     config: Config) -> None:
    """Opened from a script, a big folder shows one window of 22 lines, as s-nail does, not a
    line per message; z shows the next window."""
    path = tmp_path / "thirty"
    for n in range(1, 31):
        deliver(config, path, message(n, subject=f"number {n}"))
    out = run_mail(env, "-f", str(path), input=b"x\n").stdout.decode().splitlines()
    assert out[0].startswith(f'"{path}": 30 messages') and len(out) == 1 + 22
    assert out[-1].endswith("number 22")
    out = run_mail(env, "-f", str(path), input=b"z\nx\n").stdout.decode().splitlines()
    assert len(out) == 1 + 22 + 8 and out[-1].endswith("number 30")
