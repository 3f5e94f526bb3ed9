"""A runner killed mid-append: its dotlock (the dead PID) and its torn message must not hold up
or spoil the next run; a lock held by a live process costs a run one wait, not one per message."""

import mailbox
import os
import pwd
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pymailtools.config import Config
from pymailtools.local.lock import MailboxBusy, MailboxLock
from tests.conftest import Sendmail, need_tool, script

BIG_BODY = b"".join(b"line %07d of a three megabyte message, every byte counts\n" % i
                    for i in range(54000))
BIG = b"Subject: big\n\n" + BIG_BODY


@pytest.fixture
def config_values(config_values: dict[str, object]) -> dict[str, object]:
    # The shipped lock timing (20 attempts, 1 s apart), so a blocked mailbox really costs time.
    return {**config_values, "deliver_lock_delay": 1, "deliver_lock_attempts": 20}


def small(i: int) -> bytes:
    return b"Subject: small %d\n\nFrom the body of message %d\nlast line\n" % (i, i)


def bodies(path: Path) -> list[tuple[str, bytes]]:
    """(Subject, body as stored) of every message Python's mailbox finds."""
    box = mailbox.mbox(str(path), create=False)
    try:
        out = []
        for key in box.keys():
            msg = box.get_bytes(key)
            head, _, body = msg.partition(b"\n\n")
            subject = next((line[9:].decode() for line in head.split(b"\n")
                            if line.startswith(b"Subject: ")), "")
            out.append((subject, body))
        return out
    finally:
        box.close()


def raw_messages(path: Path) -> list[bytes]:
    """Every message as Python's mailbox finds it, From_ line included."""
    box = mailbox.mbox(str(path), create=False)
    try:
        return [box.get_bytes(key, from_=True) for key in box.keys()]
    finally:
        box.close()


def s_nail_messages(path: Path, work: Path) -> list[bytes]:
    """Every message as s-nail finds it in the mbox ``path``: each one copied by s-nail
    (read-only, so nothing is marked) into a file of its own, and read back."""
    snail = need_tool("s-nail", "s-nail")
    env = {"HOME": str(work), "MAILRC": "/dev/null", "PATH": os.environ["PATH"], "LC_ALL": "C"}

    def run(*commands: str) -> str:
        argv = [snail, "-#", "-N", "-R", "-S", "headline=%m"]
        for c in commands:
            argv += ["-Y", c]
        p = subprocess.run([*argv, "-Y", "x", "-f", str(path)], env=env, timeout=60,
                           stdin=subprocess.DEVNULL, capture_output=True)
        assert p.returncode == 0, p
        return p.stdout.decode()

    count = len(run("headers").split())
    copies = [work / f"s-nail-{n}" for n in range(1, count + 1)]
    run(*(f"copy {n} {c}" for n, c in enumerate(copies, 1)))
    out = []
    for c in copies:
        (one,) = raw_messages(c)
        out.append(one)
        c.unlink()
    return out


def dead_pid() -> int:
    """The PID of a process that has exited and been reaped."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def run_timed(sendmail: Sendmail, flush: bool = False) -> float:
    """Seconds a queue run takes: sendmail -q, or postqueue -f for every entry at once."""
    started = time.monotonic()
    if flush:
        p = subprocess.run([script("postqueue"), "-f"], capture_output=True, timeout=600,
                           env=dict(os.environ, PYMAILTOOLS_CONFIG=str(sendmail.config_file)))
    else:
        p = sendmail("-q", timeout=600)
    elapsed = time.monotonic() - started
    assert p.returncode == 0, p.stderr
    return elapsed


@pytest.mark.parametrize("cut", ["as_killed", "mid_line"])
def test_runner_killed_mid_append_does_not_block_the_next_run(
        sendmail: Sendmail, spool: Path, tmp_path: Path, system_user: pwd.struct_passwd,
        other_user: pwd.struct_passwd, cut: str) -> None:
    name, box = system_user.pw_name, spool / system_user.pw_name
    lock = Path(str(box) + ".lock")
    assert sendmail("-i", name, input=small(0)).returncode == 0
    assert sendmail("-q").returncode == 0
    assert sendmail("-i", name, input=BIG).returncode == 0
    before = box.stat().st_size
    killed = sendmail("-q", env={"PYMAILTOOLS_TEST_CRASH_AT": "mbox_mid_append"})
    assert killed.returncode == -signal.SIGKILL
    # What the bug report found: part of the message, and a lock naming a dead process.
    size = box.stat().st_size
    assert before + (1 << 20) <= size < before + len(BIG)
    pid = int(lock.read_bytes())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    if cut == "mid_line":
        # A write cut short by the kill ends where a page ended, anywhere in a line.
        with open(box, "r+b") as f:
            f.truncate(size - 17)
    for i in range(1, 4):
        assert sendmail("-i", name, input=small(i)).returncode == 0
    assert sendmail("-i", other_user.pw_name, input=small(9)).returncode == 0

    # The dead process's lock is broken at once: no 20 s wait per message, nothing deferred.
    assert run_timed(sendmail) < 10
    assert sendmail.entries() == []
    assert not lock.exists()

    # Every complete message parses intact and on its own; the torn one is a message of its
    # own, a prefix of the big one, and glued to nothing.
    found = bodies(box)
    assert sorted(s for s, _ in found) == ["big", "big"] + [f"small {i}" for i in range(4)]
    for subject, body in found:
        if subject.startswith("small"):
            i = int(subject.split()[1])
            assert body == b">" + small(i).split(b"\n\n", 1)[1]  # mboxrd-quoted From
    big = sorted((body for s, body in found if s == "big"), key=len)
    assert big[1] == BIG_BODY
    assert len(big[0]) < len(BIG_BODY) and BIG_BODY.startswith(big[0].rstrip(b"\n"))
    assert [s for s, _ in bodies(spool / other_user.pw_name)] == ["small 9"]
    # s-nail finds the very same messages.
    assert s_nail_messages(box, tmp_path) == raw_messages(box)


def test_live_lock_holder_costs_the_run_one_wait(
        sendmail: Sendmail, spool: Path, config_values: dict[str, object],
        system_user: pwd.struct_passwd, other_user: pwd.struct_passwd) -> None:
    tool = need_tool("dotlockfile", "liblockfile-bin")
    sendmail.config_file.write_text(sendmail.config_file.read_text().replace(
        "deliver_lock_attempts = 20", "deliver_lock_attempts = 3"))
    name, box = system_user.pw_name, spool / system_user.pw_name
    lock = str(box) + ".lock"
    # liblockfile's way of holding a mailbox: the lock names the shell, which lives on.
    holder = subprocess.Popen(["sh", "-c", f'"{tool}" -l -p -r 0 "{lock}" && exec sleep 120'])
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(lock) or not Path(lock).read_bytes():
            assert time.monotonic() < deadline and holder.poll() is None
            time.sleep(0.01)
        assert int(Path(lock).read_bytes()) == holder.pid
        for i in range(6):
            assert sendmail("-i", name, input=small(i)).returncode == 0
        for i in range(2):
            assert sendmail("-i", other_user.pw_name, input=small(10 + i)).returncode == 0

        # One wait of 2 pauses of 1-1.2 s for the first message; the other five are deferred
        # at once (before: one wait each, 12 s or more).
        elapsed = run_timed(sendmail)
        assert 2 <= elapsed < 8
        entries = sendmail.entries()
        assert len(entries) == 6
        reasons = {env.recipients[0].reason for _, env, _ in entries}
        assert len(reasons) == 1
        (reason,) = reasons
        assert reason.startswith(f"mailbox busy: {box}: dotlock {lock}"), reason
        assert all(env.recipients[0].status == "4.2.0" for _, env, _ in entries)
        assert [s for s, _ in bodies(spool / other_user.pw_name)] == ["small 10", "small 11"]
        assert not box.exists() or box.stat().st_size == 0
        assert int(Path(lock).read_bytes()) == holder.pid
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone and its lock names a dead PID: the next run breaks it and delivers.
    assert os.path.exists(lock)
    assert run_timed(sendmail, flush=True) < 8
    assert sendmail.entries() == []
    assert sorted(s for s, _ in bodies(box)) == [f"small {i}" for i in range(6)]
    assert not os.path.exists(lock)


# --- the PID rule, against liblockfile's own -------------------------------------------------


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "120"])


def _we_take(path: Path, config: Config) -> bool:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with MailboxLock(str(path), fd, config):
            return True
    except MailboxBusy:
        return False
    finally:
        os.close(fd)


def _dotlockfile_takes(tool: str, lock: Path) -> bool:
    ok = subprocess.run([tool, "-l", "-p", "-r", "0", str(lock)],
                        capture_output=True, timeout=30).returncode == 0
    if ok:
        subprocess.run([tool, "-u", str(lock)], check=True, timeout=30)
    return ok


def test_pid_rule_agrees_with_dotlockfile(tmp_path: Path, config_values: dict[str, object]
                                          ) -> None:
    """Fresh locks with various contents: we break exactly those liblockfile (-p) breaks."""
    tool = need_tool("dotlockfile", "liblockfile-bin")
    config = Config({**config_values, "deliver_lock_attempts": 1})
    box = tmp_path / "box"
    lock = tmp_path / "box.lock"
    live = _sleeper()
    try:
        contents = {
            "dead pid": b"%d\n" % dead_pid(),
            "dead pid, no newline": b"%d" % dead_pid(),
            "dead pid, blanks and junk": b"  %d junk\n" % dead_pid(),
            "live pid": b"%d\n" % live.pid,
            "our own pid": b"%d\n" % os.getpid(),
            "init": b"1\n",
            "zero": b"0\n",
            "empty": b"",
            "not a number": b"locked by somebody\n",
        }
        for what, content in contents.items():
            verdicts = []
            for taker in ("dotlockfile", "us"):
                lock.write_bytes(content)
                taken = (_dotlockfile_takes(tool, lock) if taker == "dotlockfile"
                         else _we_take(box, config))
                verdicts.append(taken)
                if lock.exists():
                    # Nothing but the judged lock was touched when it was not taken.
                    assert taken or lock.read_bytes() == content, what
                    lock.unlink()
            assert verdicts[0] == verdicts[1], (what, verdicts)
            assert verdicts[0] == what.startswith("dead pid"), (what, verdicts)
    finally:
        live.kill()
        live.wait()


def test_our_lock_is_judged_by_dotlockfile(tmp_path: Path) -> None:
    """What we write is what liblockfile reads: alive, our lock is respected; SIGKILLed, it is
    broken at once."""
    tool = need_tool("dotlockfile", "liblockfile-bin")
    box = tmp_path / "box"
    lock = tmp_path / "box.lock"
    code = ("import os, time\n"
            "from pymailtools.config import Config\n"
            "from pymailtools.local.lock import MailboxLock\n"
            f"fd = os.open({str(box)!r}, os.O_RDWR | os.O_CREAT, 0o600)\n"
            f"MailboxLock({str(box)!r}, fd, Config({{'deliver_lock_delay': 0}})).acquire()\n"
            "print('locked', flush=True)\n"
            "time.sleep(120)\n")
    child = subprocess.Popen([sys.executable, "-c", code],
                             stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"locked\n"
        assert lock.read_bytes() == b"%d\n" % child.pid
        assert not _dotlockfile_takes(tool, lock)
        assert lock.read_bytes() == b"%d\n" % child.pid
    finally:
        child.kill()
        child.wait()
    assert lock.read_bytes() == b"%d\n" % child.pid
    assert _dotlockfile_takes(tool, lock)


def test_odd_lock_files_are_never_judged_by_content(
        tmp_path: Path, config_values: dict[str, object], outside_pid_file: Path) -> None:
    """A symlink or FIFO named like the lock is not read for a PID: only the age rule applies
    to it, and a FIFO does not make us hang."""
    box = tmp_path / "box"
    lock = tmp_path / "box.lock"
    cfg = Config({**config_values, "deliver_lock_attempts": 1})
    lock.symlink_to(outside_pid_file)
    assert not _we_take(box, cfg)
    assert lock.is_symlink() and outside_pid_file.exists()
    lock.unlink()
    os.mkfifo(lock)
    assert not _we_take(box, cfg)
    assert lock.exists()


@pytest.fixture
def outside_pid_file(tmp_path: Path) -> Path:
    p = tmp_path / "elsewhere"
    p.write_bytes(b"%d\n" % dead_pid())
    return p
