"""End to end through the installed sendmail: submit, run the queue, read the mailbox back."""

import hashlib
import mailbox
import os
import pwd
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.cli import run as tool
from tests.support.mail import mbox_messages

from .conftest import Sendmail, need_tool, script

BODY = b"First line\nFrom the start of a line\n>From quoted already\n\ttabbed \xc3\xa9\nlast\n"


def run_queue(sendmail: Sendmail) -> subprocess.CompletedProcess[bytes]:
    p = sendmail("-q")
    assert p.returncode == 0, p.stderr
    return p


def test_message_arrives_intact(sendmail: Sendmail, spool: Path,
                                system_user: pwd.struct_passwd) -> None:
    name = system_user.pw_name
    msg = b"Subject: e2e\nX-Test: 1\n\n" + BODY
    p = sendmail("-i", "-f", "sender@example.test", name, input=msg)
    assert p.returncode == 0, p.stderr
    run_queue(sendmail)
    box = spool / name
    st = box.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (system_user.pw_uid, 0o660)
    raw = box.read_bytes()
    assert raw.startswith(b"From sender@example.test ")
    assert b"\n>From the start of a line\n>>From quoted already\n" in raw  # mboxrd
    (m,) = mbox_messages(box)
    assert m["Subject"] == "e2e"
    assert m["Return-Path"] == "<sender@example.test>"
    assert m["Delivered-To"] == f"{name}@host.example.test"
    # mboxrd-unquote the stored body: exactly the bytes we submitted.
    mb = mailbox.mbox(str(box), create=False)
    body = mb.get_bytes(next(iter(mb.keys()))).split(b"\n\n", 1)[1]
    mb.close()
    unquoted = b"".join(
        line[1:] if line.lstrip(b">").startswith(b"From ") and line.startswith(b">") else line
        for line in body.splitlines(keepends=True))
    assert unquoted.rstrip(b"\n") == BODY.rstrip(b"\n")
    assert sendmail.entries() == []


def test_s_nail_lists_delivered_mail(sendmail: Sendmail, spool: Path,
                                     system_user: pwd.struct_passwd, tmp_path: Path) -> None:
    snail = need_tool("s-nail", "s-nail")
    for i in range(3):
        assert sendmail("-i", system_user.pw_name,
                        input=b"Subject: snail %d\n\nFrom body %d\n" % (i, i)).returncode == 0
    run_queue(sendmail)
    p = subprocess.run([snail, "-N", "-H", "-f", str(spool / system_user.pw_name)],
                       capture_output=True, env={"HOME": str(tmp_path), "MAILRC": "/dev/null",
                                                 "PATH": os.environ["PATH"], "LC_ALL": "C"},
                       timeout=30)
    lines = [ln for ln in p.stdout.decode().splitlines() if "snail" in ln]
    assert len(lines) == 3, p.stdout + p.stderr
    assert all(f"snail {i}" in lines[i] for i in range(3))


def test_unknown_user_bounces_to_sender(sendmail: Sendmail, spool: Path,
                                        system_user: pwd.struct_passwd) -> None:
    p = sendmail("-i", "-f", system_user.pw_name, "nosuchuser4711",
                 input=b"Subject: lost\n\nbody\n")
    assert p.returncode == 0
    run_queue(sendmail)  # delivers the original, then the bounce it queued
    (dsn,) = mbox_messages(spool / system_user.pw_name)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn["From"].startswith("MAIL DELIVERY SYSTEM <MAILER-DAEMON@")
    report = next(p for p in dsn.walk() if p.get_content_type() == "message/delivery-status")
    text = report.as_string()
    assert "Status: 5.1.1" in text and "nosuchuser4711@host.example.test" in text
    assert (spool / system_user.pw_name).read_bytes().startswith(b"From MAILER-DAEMON ")
    assert sendmail.entries() == []


def test_remote_recipient_waits_for_its_retry_time(sendmail: Sendmail) -> None:
    assert sendmail("someone@example.com", input=b"Subject: r\n\nb\n").returncode == 0
    before = time.time()
    run_queue(sendmail)
    ((state, env, _),) = sendmail.entries()
    (r,) = env.recipients
    assert state == "deferred" and r.state == "deferred"
    # The test resolver is a closed loopback port: DNS fails temporarily, never a bounce.
    assert r.status == "4.4.3" and "try again" in r.reason
    assert r.next_try >= before + 300 and r.attempts == 1
    # The retry time is persisted: a new run does not retry before it.
    run_queue(sendmail)
    ((_, env2, _),) = sendmail.entries()
    assert env2.recipients[0].attempts == 1
    assert f"({r.reason})" in sendmail("-bp").stdout.decode()


def test_expired_message_bounces_once(sendmail: Sendmail, spool: Path,
                                      system_user: pwd.struct_passwd) -> None:
    assert sendmail("-f", system_user.pw_name, "someone@example.com",
                    input=b"Subject: old\n\nb\n").returncode == 0
    p = sendmail("-q", env={"PYMAILTOOLS_MAXIMAL_QUEUE_LIFETIME": "0"})
    assert p.returncode == 0
    assert sendmail.entries() == []
    (dsn,) = mbox_messages(spool / system_user.pw_name)
    text = dsn.as_string()
    assert "Action: failed" in text and "someone@example.com" in text
    assert "Status: 4.4.3" in text  # the last (temporary) reason, now final


def test_symlinked_mailbox_keeps_message_queued(sendmail: Sendmail, spool: Path, tmp_path: Path,
                                                system_user: pwd.struct_passwd) -> None:
    target = tmp_path / "passwd-copy"
    target.write_bytes(b"root:x:0:0::/root:/bin/sh\n")
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    (spool / system_user.pw_name).symlink_to(target)
    assert sendmail(system_user.pw_name, input=b"Subject: s\n\nb\n").returncode == 0
    run_queue(sendmail)
    assert hashlib.sha256(target.read_bytes()).hexdigest() == digest
    ((state, env, _),) = sendmail.entries()
    assert state == "deferred" and "symbolic link" in env.recipients[0].reason


def test_two_runners_deliver_each_message_once(sendmail: Sendmail, spool: Path,
                                               system_user: pwd.struct_passwd) -> None:
    n = 150
    for i in range(n):
        assert sendmail(system_user.pw_name, input=b"Subject: m%d\n\nbody %d\n" % (i, i),
                        ).returncode == 0
    # The fixture's lock delay of 0 s suits single deliveries; two runners contend for the
    # mailbox, so give them the default retry pacing (a busy mailbox would defer, not lose).
    env = dict(os.environ, PYMAILTOOLS_CONFIG=str(sendmail.config_file),
               PYMAILTOOLS_DELIVER_LOCK_DELAY="1s")
    procs = [subprocess.Popen([script("sendmail"), "-q"], env=env) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    msgs = mbox_messages(spool / system_user.pw_name)
    assert sorted(m["Subject"] for m in msgs) == sorted(f"m{i}" for i in range(n))
    assert sendmail.entries() == []
    assert not any((sendmail.queue_dir / "corrupt").iterdir())




def test_background_runner_detaches_and_is_shared(sendmail: Sendmail, tmp_path: Path,
                                                  world_dir: Path) -> None:
    """Like cron: the caller waits for EOF on sendmail's stdout/stderr. It must return at
    once although delivery takes seconds; and 30 concurrent submissions share few runners."""
    log = world_dir / "runners"
    prog = (f"import os,time; open({str(log)!r},'a').write(str(os.getppid())+' '); "
            "time.sleep(0.3)")
    aliases = tmp_path / "aliases"
    aliases.write_text(f'slow: "|/usr/bin/python3 -c \\"{prog}\\""\n')
    aliases.chmod(0o644)
    env = dict(os.environ, PYMAILTOOLS_CONFIG=str(sendmail.config_file),
               PYMAILTOOLS_DELIVERY_MODE="background")
    start = time.monotonic()
    procs = [subprocess.Popen([script("sendmail"), "slow"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
             for _ in range(30)]
    for p in procs:
        out, err = p.communicate(b"Subject: x\n\nb\n", timeout=60)
        assert p.returncode == 0, err
    elapsed = time.monotonic() - start
    assert elapsed < 30 * 0.3  # nobody waited for the deliveries (9 s of sleeping commands)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not log.exists() or
                                           len(log.read_text().split()) < 30):
        time.sleep(0.2)
    parents = log.read_text().split()
    assert len(parents) == 30  # every message delivered by a background runner
    assert len(set(parents)) <= 5  # and not one process per message


def test_background_runner_reads_the_c_configuration(sendmail: Sendmail, tmp_path: Path,
                                                    world_dir: Path) -> None:
    """The runner sendmail starts is a fresh process: it reads the -C file again (not the
    default one) and delivers from that file's queue."""
    log = world_dir / "delivered"
    prog = f"import sys; open({str(log)!r},'ab').write(sys.stdin.buffer.read())"
    aliases = tmp_path / "aliases"
    aliases.write_text(f'done: "|/usr/bin/python3 -c \\"{prog}\\""\n')
    aliases.chmod(0o644)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYMAILTOOLS_")}
    p = subprocess.run([script("sendmail"), "-C", str(sendmail.config_file), "-odb", "done"],
                       input=b"Subject: via -C\n\nb\n", capture_output=True, env=env,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not log.exists() or b"via -C" not in log.read_bytes()):
        time.sleep(0.1)
    assert b"Subject: via -C" in log.read_bytes()
    assert sendmail.entries() == []


def test_qI_and_qR_deliver_only_what_they_name(sendmail: Sendmail, spool: Path,
                                              system_user: pwd.struct_passwd) -> None:
    name = system_user.pw_name
    for subject in (b"one", b"two"):
        assert sendmail(name, input=b"Subject: " + subject + b"\n\nb\n").returncode == 0
    assert sendmail("x@example.com", input=b"Subject: remote\n\nb\n").returncode == 0
    entries = {env.recipients[0].address: env.id for _, env, _ in sendmail.entries()}
    first = entries[f"{name}@host.example.test"]
    assert sendmail(f"-qI{first}").returncode == 0
    assert len(mbox_messages(spool / name)) == 1
    assert len(sendmail.entries()) == 2
    assert sendmail("-qRexample.com").returncode == 0  # only the remote one is tried
    states = sorted(state for state, _, _ in sendmail.entries())
    assert states == ["deferred", "incoming"]
    assert sendmail("-qI../x").returncode == 64
    assert sendmail("-qR$(id)").returncode == 64


def test_delay_warning_is_sent_once(sendmail: Sendmail, spool: Path,
                                    system_user: pwd.struct_passwd) -> None:
    name = system_user.pw_name
    assert sendmail("-f", name, "someone@example.com",
                    input=b"Subject: slow\n\nb\n").returncode == 0
    time.sleep(1.2)
    warn = {"PYMAILTOOLS_DELAY_WARNING_TIME": "1s"}
    assert sendmail("-q", env=warn).returncode == 0
    (dsn,) = mbox_messages(spool / name)  # queued and delivered in the same run
    assert dsn["Subject"] == "Delayed Mail (still being retried)"
    assert "Action: delayed" in dsn.as_string() and "someone@example.com" in dsn.as_string()
    ((state, env, _),) = sendmail.entries()
    assert state == "deferred" and env.warned
    assert sendmail("-qRexample.com", env=warn).returncode == 0  # tried again: no new warning
    assert len(mbox_messages(spool / name)) == 1
    ((_, env, _),) = sendmail.entries()
    assert env.recipients[0].attempts == 2


def test_queue_run_on_a_terminal_shows_progress(sendmail: Sendmail, spool: Path,
                                                system_user: pwd.struct_passwd) -> None:
    from tests.support.mail import Pty

    for i in range(3):
        assert sendmail(system_user.pw_name, input=b"Subject: p%d\n\nb\n" % i).returncode == 0
    env = dict(os.environ, PYMAILTOOLS_CONFIG=str(sendmail.config_file), COLUMNS="120")
    term = Pty([script("sendmail"), "-q"], env)
    try:
        term.expect("3/3")
        term.expect("3 delivered")
        assert term.wait() == 0
    finally:
        term.close()
    assert len(mbox_messages(spool / system_user.pw_name)) == 3
    # piped, the same run prints nothing (scripts parse silence as success)
    for i in range(2):
        assert sendmail(system_user.pw_name, input=b"Subject: q%d\n\nb\n" % i).returncode == 0
    p = sendmail("-q")
    assert (p.stdout, p.stderr) == (b"", b"")


@pytest.mark.parametrize(("mode", "flags"), [("foreground", []), ("queue", ["-odi"]),
                                             ("queue", ["-v"])], ids=["foreground", "odi", "v"])
def test_foreground_delivery_delivers_the_bounce_it_queues(
        sendmail: Sendmail, spool: Path, system_user: pwd.struct_passwd, mode: str,
        flags: list[str]) -> None:
    """No daemon, no later queue run: the bounce must be in the sender's mailbox when the
    submitting command returns."""
    name = system_user.pw_name
    p = sendmail(*flags, "-i", "-f", name, "nosuchuser4711", input=b"Subject: lost\n\nbody\n",
                 mode=mode)
    assert p.returncode == 0, p.stderr
    (dsn,) = mbox_messages(spool / name)
    assert dsn["Subject"] == "Undelivered Mail Returned to Sender"
    assert "Status: 5.1.1" in dsn.as_string()
    assert "nosuchuser4711@host.example.test" in dsn.as_string()
    assert sendmail.entries() == []


@pytest.mark.parametrize("argv", [["sendmail", "-q"], ["sendmail", "-qI{qid}"],
                                  ["sendmail", "-qRhost.example.test"], ["postqueue", "-f"],
                                  ["postqueue", "-i", "{qid}"],
                                  ["postqueue", "-s", "host.example.test"]],
                         ids=["q", "qI", "qR", "postqueue-f", "postqueue-i", "postqueue-s"])
def test_queue_run_delivers_the_bounce_it_queues(sendmail: Sendmail, spool: Path,
                                                 system_user: pwd.struct_passwd,
                                                 argv: list[str]) -> None:
    """Whatever the run was limited to (one id, one site), the notices it queued go out in it:
    here the sender is at another local domain than the -qR / -s site."""
    name = system_user.pw_name
    assert sendmail("-i", "-f", f"{name}@localhost", "nosuchuser4711",
                    input=b"Subject: lost\n\nbody\n").returncode == 0
    ((_, env, _),) = sendmail.entries()
    args = [a.format(qid=env.id) for a in argv]
    p = sendmail(*args[1:]) if args[0] == "sendmail" else tool(*args)
    assert p.returncode == 0, p.stderr
    (dsn,) = mbox_messages(spool / name)
    assert dsn["To"] == f"<{name}@localhost>"
    assert "nosuchuser4711@host.example.test" in dsn.as_string()
    assert sendmail.entries() == []


def test_qR_run_delivers_the_delay_warning_it_queues(sendmail: Sendmail, spool: Path,
                                                     system_user: pwd.struct_passwd) -> None:
    name = system_user.pw_name
    assert sendmail("-f", name, "someone@example.com",
                    input=b"Subject: slow\n\nb\n").returncode == 0
    time.sleep(1.2)
    assert sendmail("-qRexample.com", env={"PYMAILTOOLS_DELAY_WARNING_TIME": "1s"}
                    ).returncode == 0
    (dsn,) = mbox_messages(spool / name)
    assert dsn["Subject"] == "Delayed Mail (still being retried)"
    ((state, env, _),) = sendmail.entries()
    assert state == "deferred" and env.sender == f"{name}@host.example.test"
