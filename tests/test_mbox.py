"""mbox delivery and mailbox locking against real files, real users and real mail readers."""

import email.parser  # noqa: F401  (children that drop privileges cannot import from /root)
import errno
import fcntl
import grp
import hashlib
import io
import mailbox
import multiprocessing
import os
import pwd
import re
import resource
import signal
import stat
import subprocess
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from pymailtools.config import Config
from pymailtools.errors import DeliveryError
from pymailtools.local import mbox
from pymailtools.local.lock import MailboxBusy, MailboxLock
from tests.conftest import need_root, need_tool, tmpfs

CTX = multiprocessing.get_context("fork")
SENDER = "sender@example.test"


def unquote(data: bytes) -> bytes:
    """Undo mboxrd quoting: one '>' less on every line matching ^>+From ."""
    return re.sub(rb"(?m)^>(>*From )", rb"\1", data)


def stored(message: bytes, recipient: str, sender: str = SENDER) -> bytes:
    """What a reader should get back for ``message`` (after unquoting)."""
    if not message.endswith(b"\n"):
        message += b"\n"
    return f"Return-Path: <{sender}>\nDelivered-To: {recipient}\n".encode() + message


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def deliver(
    path: Path,
    message: bytes | BinaryIO,
    config: Config,
    user: pwd.struct_passwd,
    recipient: str | None = None,
    **kw: Any,
) -> None:
    body = io.BytesIO(message) if isinstance(message, bytes) else message
    mbox.append(
        str(path),
        body,
        sender=kw.pop("sender", SENDER),
        recipient=recipient or f"{user.pw_name}@host.example.test",
        uid=user.pw_uid,
        gid=user.pw_gid,
        config=config,
        **kw,
    )


def run_in_child(fn: Callable[[], object], timeout: float = 20) -> object:
    """Run ``fn`` in a forked process; its result or ("error", status, reason). Fails the test
    if it does not finish in time (a delivery that blocks is the bug we look for)."""
    parent, child = CTX.Pipe()

    def target() -> None:
        try:
            child.send(fn())
        except DeliveryError as e:
            child.send(("error", e.status, e.reason))

    proc = CTX.Process(target=target)
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        pytest.fail(f"child still running after {timeout} s (blocked?)")
    assert parent.poll(), f"child died with exit code {proc.exitcode}"
    return parent.recv()


def messages(path: Path) -> list[mailbox.mboxMessage]:
    return list(mailbox.mbox(str(path), create=False))


def raw_messages(path: Path) -> list[bytes]:
    """Each message's bytes as Python's mailbox finds them (From_ line and separator off)."""
    box = mailbox.mbox(str(path), create=False)
    return [box.get_bytes(key) for key in box.keys()]


@pytest.fixture
def mailbox_path(spool: Path, system_user: pwd.struct_passwd) -> Path:
    return spool / system_user.pw_name


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A file outside the spool that an attack would like us to append to."""
    target = tmp_path / "victim"
    target.write_bytes(b"root:x:0:0:root:/root:/bin/sh\n")
    return target




def small_config(config_values: dict[str, object], **over: object) -> Config:
    return Config({**config_values, **over})


# --- framing ----------------------------------------------------------------------------------

TRICKY = [
    b"From: a@example.test\nSubject: one\n\nFrom x\n>From y\n>>From z\nFromage\n From not\n",
    b"Subject: two\n\nno final newline",
    b"Subject: three\n\n\n\nFrom \n\nFrom the start\n",
    b"Subject: empty body\n\n",
    b"Subject: crlf\r\n\r\nline\r\nFrom crlf\r\n",
]


def test_messages_round_trip_through_python_mailbox(
    mailbox_path: Path, config: Config, system_user: pwd.struct_passwd
) -> None:
    for m in TRICKY:
        deliver(mailbox_path, m, config, system_user)
    got = raw_messages(mailbox_path)
    assert len(got) == len(TRICKY)
    rcpt = f"{system_user.pw_name}@host.example.test"
    for msg, original in zip(got, TRICKY, strict=True):
        assert unquote(msg) == stored(original, rcpt)
    raw = mailbox_path.read_bytes()
    assert b"\n>From x\n>>From y\n>>>From z\nFromage\n From not\n" in raw
    assert raw.endswith(b"\n\n")


def test_from_line_return_path_and_null_sender(
    mailbox_path: Path, config: Config, system_user: pwd.struct_passwd
) -> None:
    deliver(mailbox_path, b"Subject: a\n\nx\n", config, system_user)
    deliver(mailbox_path, b"Subject: b\n\ny\n", config, system_user, sender="")
    lines = mailbox_path.read_bytes().split(b"\n")
    date = rb"[A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \d{4}"
    assert re.fullmatch(rb"From sender@example\.test " + date, lines[0])
    assert lines[1] == b"Return-Path: <sender@example.test>"
    assert lines[2] == f"Delivered-To: {system_user.pw_name}@host.example.test".encode()
    second = mailbox_path.read_bytes().split(b"\n\nFrom ", 1)[1].split(b"\n")
    assert re.fullmatch(rb"MAILER-DAEMON " + date, second[0])
    assert second[1] == b"Return-Path: <>"


def test_mailbox_metadata_headers_are_dropped(
    mailbox_path: Path, config: Config, system_user: pwd.struct_passwd
) -> None:
    message = (
        b"From: a@example.test\nStatus: RO\nX-Status: A\nX-UID: 1\nX-IMAPbase: 1 2\n"
        b"X-IMAP: 3\nX-Keywords: $x\nContent-Length: 3\n  continued\n\tagain\n"
        b"X-Status-Report: kept\nSubject: kept\n\nStatus: RO in the body stays\n"
    )
    deliver(mailbox_path, message, config, system_user)
    body = raw_messages(mailbox_path)[0]
    assert body.endswith(
        b"From: a@example.test\nX-Status-Report: kept\nSubject: kept\n\n"
        b"Status: RO in the body stays\n"
    )
    assert b"continued" not in body and b"X-UID" not in body


def test_long_lines_and_large_message_stream(
    tmp_path: Path, mailbox_path: Path, config: Config, system_user: pwd.struct_passwd
) -> None:
    """30 MB with 200 KB lines and From lines around block edges, in bounded memory."""
    parts = [b"Subject: big\n\n"]
    for i in range(150):
        parts.append(b"From block %d\n" % i + b"x" * (200_000 + i) + b"\n")
        parts.append(b">From y\n" + b"y" * 1_000 + b"\n")
    source = tmp_path / "big.eml"
    source.write_bytes(b"".join(parts))
    with open(source, "rb") as f:
        tracemalloc.start()
        try:
            deliver(mailbox_path, f, config, system_user)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, f"peak {peak} bytes: message was not streamed"
    (msg,) = raw_messages(mailbox_path)
    rcpt = f"{system_user.pw_name}@host.example.test"
    assert unquote(msg) == stored(source.read_bytes(), rcpt)


# --- creation, ownership, modes ---------------------------------------------------------------


def test_new_mailbox_is_user_mail_0660_under_umask_000(
    spool: Path, mailbox_path: Path, config: Config, system_user: pwd.struct_passwd
) -> None:
    need_root()
    before = os.stat(spool)
    old = os.umask(0)
    try:
        deliver(mailbox_path, b"Subject: x\n\ny\n", config, system_user)
    finally:
        os.umask(old)
    st = os.lstat(mailbox_path)
    assert stat.S_ISREG(st.st_mode)
    assert (st.st_uid, st.st_gid) == (system_user.pw_uid, grp.getgrnam("mail").gr_gid)
    assert stat.S_IMODE(st.st_mode) == 0o660
    after = os.stat(spool)
    assert (after.st_mode, after.st_uid, after.st_gid) == (
        before.st_mode,
        before.st_uid,
        before.st_gid,
    )
    assert not os.path.exists(str(mailbox_path) + ".lock")


def test_existing_mailbox_mode_is_never_changed(
    mailbox_path: Path, config: Config, system_user: pwd.struct_passwd
) -> None:
    mailbox_path.write_bytes(b"")
    os.chown(mailbox_path, system_user.pw_uid, system_user.pw_gid)
    os.chmod(mailbox_path, 0o600)
    deliver(mailbox_path, b"Subject: x\n\ny\n", config, system_user)
    st = os.stat(mailbox_path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_gid == system_user.pw_gid


# --- refusals: links, other owners, odd files, hostile names ----------------------------------


def assert_deferred(excinfo: pytest.ExceptionInfo[DeliveryError], words: str) -> None:
    assert excinfo.value.status.startswith("4."), excinfo.value.status
    assert words in excinfo.value.reason


def test_symlink_mailbox_is_refused(
    mailbox_path: Path, outside: Path, config: Config, system_user: pwd.struct_passwd
) -> None:
    before = sha(outside)
    mailbox_path.symlink_to(outside)
    with pytest.raises(DeliveryError) as e:
        deliver(mailbox_path, b"Subject: x\n\nowned\n", config, system_user)
    assert_deferred(e, "mailbox is a symbolic link")
    assert e.value.status == "4.2.0"
    assert sha(outside) == before
    assert os.path.islink(mailbox_path)


def test_dangling_symlink_mailbox_is_not_created_through(
    tmp_path: Path, mailbox_path: Path, config: Config, system_user: pwd.struct_passwd
) -> None:
    target = tmp_path / "created-through-link"
    mailbox_path.symlink_to(target)
    with pytest.raises(DeliveryError) as e:
        deliver(mailbox_path, b"Subject: x\n\ny\n", config, system_user)
    assert_deferred(e, "symbolic link")
    assert not target.exists()


def test_hard_linked_mailbox_is_refused(
    mailbox_path: Path, outside: Path, config: Config, system_user: pwd.struct_passwd
) -> None:
    os.chown(outside, system_user.pw_uid, system_user.pw_gid)
    before = sha(outside)
    os.link(outside, mailbox_path)
    with pytest.raises(DeliveryError) as e:
        deliver(mailbox_path, b"Subject: x\n\ny\n", config, system_user)
    assert_deferred(e, "mailbox has 2 hard links")
    assert sha(outside) == before


def test_mailbox_owned_by_someone_else_is_refused(
    mailbox_path: Path,
    config: Config,
    system_user: pwd.struct_passwd,
    other_user: pwd.struct_passwd,
) -> None:
    mailbox_path.write_bytes(b"mallory's bait\n")
    os.chown(mailbox_path, other_user.pw_uid, other_user.pw_gid)
    before = sha(mailbox_path)
    with pytest.raises(DeliveryError) as e:
        deliver(mailbox_path, b"Subject: x\n\nsecret\n", config, system_user)
    assert_deferred(e, "mailbox not owned by recipient")
    assert sha(mailbox_path) == before
    # File deliveries (.forward "/path") may skip the owner check on purpose.
    deliver(mailbox_path, b"Subject: x\n\nok\n", config, system_user, check_owner=False)


@pytest.mark.parametrize("reader_open", [False, True])
def test_fifo_mailbox_is_refused_without_blocking(
    mailbox_path: Path, config: Config, system_user: pwd.struct_passwd, reader_open: bool
) -> None:
    os.mkfifo(mailbox_path, 0o660)
    os.chown(mailbox_path, system_user.pw_uid, system_user.pw_gid)
    rfd = os.open(mailbox_path, os.O_RDONLY | os.O_NONBLOCK) if reader_open else None
    try:
        result = run_in_child(
            lambda: deliver(mailbox_path, b"Subject: x\n\ny\n", config, system_user), timeout=10
        )
    finally:
        if rfd is not None:
            os.close(rfd)
    assert isinstance(result, tuple) and result[0] == "error"
    assert result[1].startswith("4.") and "not a regular file" in result[2]


def test_directory_mailbox_is_refused(
    mailbox_path: Path, config: Config, system_user: pwd.struct_passwd
) -> None:
    mailbox_path.mkdir()
    with pytest.raises(DeliveryError) as e:
        deliver(mailbox_path, b"Subject: x\n\ny\n", config, system_user)
    assert_deferred(e, "not a regular file")


def test_missing_mailbox_with_create_false(
    mailbox_path: Path, config: Config, system_user: pwd.struct_passwd
) -> None:
    with pytest.raises(DeliveryError) as e:
        deliver(mailbox_path, b"Subject: x\n\ny\n", config, system_user, create=False)
    assert_deferred(e, "does not exist")
    assert not mailbox_path.exists()


def test_control_characters_in_envelope_are_refused(
    mailbox_path: Path, config: Config, system_user: pwd.struct_passwd
) -> None:
    with pytest.raises(DeliveryError) as e:
        deliver(mailbox_path, b"x\n", config, system_user, sender="a@b\nX-Evil: 1")
    assert e.value.status == "5.1.7"
    assert not mailbox_path.exists()


# --- locks: fcntl and dotlock, interoperating with liblockfile and mail readers ---------------


def test_symlinked_dotlock_is_never_followed(
    mailbox_path: Path,
    outside: Path,
    config_values: dict[str, object],
    system_user: pwd.struct_passwd,
) -> None:
    config = small_config(config_values, deliver_lock_attempts=3)
    before = sha(outside)
    lock = Path(str(mailbox_path) + ".lock")
    lock.symlink_to(outside)
    with pytest.raises(DeliveryError) as e:
        deliver(mailbox_path, b"Subject: x\n\ny\n", config, system_user)
    assert_deferred(e, "mailbox busy")
    assert sha(outside) == before and lock.is_symlink()
    # Once stale, the link itself (not its target) is removed and delivery goes ahead.
    old = time.time() - 600
    os.utime(lock, (old, old), follow_symlinks=False)
    deliver(mailbox_path, b"Subject: x\n\ny\n", config, system_user)
    assert sha(outside) == before and outside.exists()
    assert not os.path.lexists(lock)
    assert len(messages(mailbox_path)) == 1


def test_stale_dotlock_is_broken(
    mailbox_path: Path, config_values: dict[str, object], system_user: pwd.struct_passwd
) -> None:
    config = small_config(config_values, deliver_lock_attempts=2)
    lock = Path(str(mailbox_path) + ".lock")
    lock.write_bytes(b"999999\n")
    old = time.time() - 600
    os.utime(lock, (old, old))
    deliver(mailbox_path, b"Subject: x\n\ny\n", config, system_user)
    assert not lock.exists()
    assert len(messages(mailbox_path)) == 1


def test_fresh_foreign_dotlock_makes_delivery_wait_then_defer(
    mailbox_path: Path, config_values: dict[str, object], system_user: pwd.struct_passwd
) -> None:
    config = small_config(config_values, deliver_lock_attempts=4)
    deliver(mailbox_path, b"Subject: first\n\ny\n", config, system_user)
    before = sha(mailbox_path)
    lock = Path(str(mailbox_path) + ".lock")
    lock.write_bytes(f"{os.getpid()}\n".encode())
    started = time.monotonic()
    with pytest.raises(DeliveryError) as e:
        deliver(mailbox_path, b"Subject: x\n\ny\n", config, system_user)
    assert time.monotonic() - started < 5
    assert_deferred(e, "mailbox busy")
    assert e.value.status == "4.2.0"
    assert sha(mailbox_path) == before
    assert lock.read_bytes() == f"{os.getpid()}\n".encode()


def test_fcntl_lock_of_python_mailbox_excludes_us_and_is_released_on_failure(
    mailbox_path: Path, config_values: dict[str, object], system_user: pwd.struct_passwd
) -> None:
    config = small_config(config_values, deliver_lock_attempts=3)
    deliver(mailbox_path, b"Subject: first\n\ny\n", config, system_user)
    locked, done = CTX.Event(), CTX.Event()

    def hold() -> None:
        box = mailbox.mbox(str(mailbox_path))
        box.lock()
        locked.set()
        done.wait(30)
        box.unlock()

    holder = CTX.Process(target=hold)
    holder.start()
    try:
        assert locked.wait(10)
        with pytest.raises(DeliveryError) as e:
            deliver(mailbox_path, b"Subject: x\n\ny\n", config, system_user)
        assert_deferred(e, "mailbox busy")
    finally:
        done.set()
        holder.join(10)
    deliver(mailbox_path, b"Subject: second\n\ny\n", config, system_user)
    assert len(messages(mailbox_path)) == 2


def test_busy_dotlock_releases_the_fcntl_lock(
    mailbox_path: Path, config_values: dict[str, object]
) -> None:
    """Policy 11.6 non-blocking variant: never sit on fcntl while the dotlock is someone's."""
    config = small_config(config_values, deliver_lock_attempts=2)
    mailbox_path.write_bytes(b"")
    Path(str(mailbox_path) + ".lock").write_bytes(b"")
    fd = os.open(mailbox_path, os.O_RDWR)
    try:
        with pytest.raises(MailboxBusy):
            MailboxLock(str(mailbox_path), fd, config).acquire()

        def probe() -> bool:
            pfd = os.open(mailbox_path, os.O_RDWR)
            try:
                fcntl.lockf(pfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError:
                return False

        assert run_in_child(probe) is True
    finally:
        os.close(fd)


def test_dotlockfile_interop(
    mailbox_path: Path, config_values: dict[str, object], system_user: pwd.struct_passwd
) -> None:
    """liblockfile's lock is respected (we wait it out), and ours is respected by it."""
    tool = need_tool("dotlockfile", "liblockfile-bin")
    lock = str(mailbox_path) + ".lock"
    config = small_config(config_values, deliver_lock_attempts=2000)
    subprocess.run([tool, "-l", "-r", "0", lock], check=True)
    releaser = subprocess.Popen(["sh", "-c", f'sleep 1; "{tool}" -u "{lock}"'])
    started = time.monotonic()
    deliver(mailbox_path, b"Subject: x\n\ny\n", config, system_user)
    assert time.monotonic() - started >= 0.5
    assert releaser.wait(10) == 0
    assert len(messages(mailbox_path)) == 1
    fd = os.open(mailbox_path, os.O_RDWR)
    try:
        with MailboxLock(str(mailbox_path), fd, config):
            assert subprocess.run([tool, "-l", "-r", "0", lock]).returncode != 0
        assert not os.path.exists(lock)
    finally:
        os.close(fd)


# --- all or nothing: a failed append leaves the mailbox as it was -----------------------------


class FailingMessage(io.RawIOBase):
    """A queued message whose storage fails after ``good`` bytes (a disk error mid-read)."""

    def __init__(self, good: int) -> None:
        self.data = b"Subject: doomed\n\n" + b"line of the body\n" * (good // 17 + 1)
        self.good = good
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos
        return pos

    def read(self, size: int = -1) -> bytes:
        if self.pos >= self.good:
            raise OSError(errno.EIO, "Input/output error")
        n = min(size if size >= 0 else len(self.data), self.good - self.pos)
        chunk = self.data[self.pos : self.pos + n]
        self.pos += len(chunk)
        return chunk


def test_read_error_midway_truncates_back(
    mailbox_path: Path, config: Config, system_user: pwd.struct_passwd
) -> None:
    for i in range(2):
        deliver(mailbox_path, b"Subject: %d\n\nbody\n" % i, config, system_user)
    before = sha(mailbox_path)
    # 3 MB: well past the write buffer, so part of it had reached the file when reading failed.
    with pytest.raises(DeliveryError) as e:
        deliver(mailbox_path, FailingMessage(3_000_000), config, system_user)
    assert e.value.status == "4.3.0"
    assert "cannot read queued message" in e.value.reason
    assert sha(mailbox_path) == before
    assert not os.path.exists(str(mailbox_path) + ".lock")
    assert len(messages(mailbox_path)) == 2


def test_file_size_limit_midway_truncates_back(
    mailbox_path: Path, config: Config, system_user: pwd.struct_passwd
) -> None:
    """A real write failure (EFBIG from RLIMIT_FSIZE) after part of the message was written."""
    deliver(mailbox_path, b"Subject: 0\n\nbody\n", config, system_user)
    before = sha(mailbox_path)
    limit = mailbox_path.stat().st_size + 1_500_000

    def limited() -> object:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        big = b"Subject: big\n\n" + b"0123456789abcdef\n" * 200_000
        deliver(mailbox_path, big, config, system_user)
        return "delivered"

    result = run_in_child(limited)
    assert isinstance(result, tuple) and result[0] == "error", result
    assert result[1].startswith("4.") and "File too large" in result[2]
    assert sha(mailbox_path) == before


def test_full_disk_truncates_back_with_4_2_2(
    tmp_path: Path, config: Config, system_user: pwd.struct_passwd
) -> None:
    """All or nothing on a real full file system: a 1 MB tmpfs."""
    with tmpfs(tmp_path, "1m") as mnt:
        path = mnt / system_user.pw_name
        deliver(path, b"Subject: 0\n\nbody\n", config, system_user)
        before = sha(path)
        with pytest.raises(DeliveryError) as e:
            deliver(path, b"Subject: big\n\n" + (b"y" * 80 + b"\n") * 30_000, config, system_user)
        assert e.value.status == "4.2.2"
        assert sha(path) == before
        deliver(path, b"Subject: 1\n\nfits\n", config, system_user)
        assert len(messages(path)) == 2


@pytest.mark.parametrize("tail", [b"\n", b""], ids=["no-blank-line", "no-newline"])
def test_torn_last_message_gets_its_separator_back(
    mailbox_path: Path, config: Config, system_user: pwd.struct_passwd, tail: bytes
) -> None:
    """After a crash mid-append the next delivery still starts a new message."""
    deliver(mailbox_path, b"Subject: 0\n\nintact\n", config, system_user)
    prefix = mailbox_path.read_bytes()
    with open(mailbox_path, "ab") as f:
        f.write(b"From a@b Mon Nov 23 14:33:59 2026\nSubject: torn\n\nhalf" + tail)
    deliver(mailbox_path, b"Subject: 2\n\nFrom here\nnew\n", config, system_user)
    got = raw_messages(mailbox_path)
    assert len(got) == 3
    assert mailbox_path.read_bytes().startswith(prefix)
    assert got[1].startswith(b"Subject: torn\n\nhalf\n")
    rcpt = f"{system_user.pw_name}@host.example.test"
    assert unquote(got[2]) == stored(b"Subject: 2\n\nFrom here\nnew\n", rcpt)


# --- concurrency: readers and other deliveries at the same time -------------------------------


def body_of(proc: int, i: int) -> bytes:
    return (
        f"Message-ID: <{proc}.{i}@test>\nSubject: {proc}/{i}\n\n"
        f"From process {proc}\n>From number {i}\n".encode()
        + (b"%d-%d " % (proc, i)) * (1 + i % 40)
        + b"\n"
    )


def message_ids(path: Path) -> list[str]:
    return [str(m["Message-ID"]) for m in messages(path)]


def test_ten_processes_and_a_locking_reader(
    mailbox_path: Path, config_values: dict[str, object], system_user: pwd.struct_passwd
) -> None:
    """The locking test: 10 x 200 concurrent appends while a reader takes fcntl+dotlock now
    and then; afterwards exactly 2,000 intact messages and no lock file."""
    config = small_config(config_values, deliver_lock_attempts=1_000_000)
    procs, per = 10, 200
    stop = CTX.Event()

    def writer(p: int) -> None:
        for i in range(per):
            deliver(mailbox_path, body_of(p, i), config, system_user)

    def reader() -> None:
        while not stop.is_set():
            try:
                fd = os.open(mailbox_path, os.O_RDWR | os.O_NOFOLLOW)
            except FileNotFoundError:
                time.sleep(0.01)
                continue
            try:
                with MailboxLock(str(mailbox_path), fd, config):
                    os.pread(fd, 4096, 0)
                    time.sleep(0.02)
            finally:
                os.close(fd)
            time.sleep(0.05)

    started = time.monotonic()
    rd = CTX.Process(target=reader)
    rd.start()
    workers = [CTX.Process(target=writer, args=(p,)) for p in range(procs)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    stop.set()
    rd.join(10)
    assert [w.exitcode for w in workers] == [0] * procs
    elapsed = time.monotonic() - started
    got = raw_messages(mailbox_path)
    assert len(got) == procs * per
    rcpt = f"{system_user.pw_name}@host.example.test"
    seen: dict[str, int] = {}
    for msg in got:
        mid = re.search(rb"^Message-ID: <(\d+)\.(\d+)@test>$", msg, re.M)
        assert mid, msg
        seen[mid[0].decode()] = seen.get(mid[0].decode(), 0) + 1
        assert unquote(msg) == stored(body_of(int(mid[1]), int(mid[2])), rcpt)
    assert len(seen) == procs * per and set(seen.values()) == {1}
    assert not os.path.lexists(str(mailbox_path) + ".lock")
    print(f"2000 concurrent deliveries in {elapsed:.1f} s")


def test_python_mailbox_rewriting_concurrently_loses_nothing(
    open_spool: Path, config_values: dict[str, object], system_user: pwd.struct_passwd
) -> None:
    """A reader running as the user (setgid-mail MUA style) repeatedly locks, removes the
    first message and flushes (rename: new inode) while 2 processes deliver 200 messages."""
    config = small_config(
        config_values, deliver_lock_attempts=1_000_000, mail_spool_directory=str(open_spool)
    )
    mailbox_path = open_spool / system_user.pw_name
    for i in range(5):
        deliver(mailbox_path, body_of(99, i), config, system_user)
    deleted = CTX.Queue()
    stop = CTX.Event()

    def writer(p: int) -> None:
        for i in range(100):
            deliver(mailbox_path, body_of(p, i), config, system_user)

    def rewriter() -> None:
        os.setgroups([grp.getgrnam("mail").gr_gid])
        os.setgid(system_user.pw_gid)
        os.setuid(system_user.pw_uid)
        rounds = 0
        while rounds < 5 or not stop.is_set():
            box = mailbox.mbox(str(mailbox_path), create=False)
            try:
                box.lock()
            except mailbox.ExternalClashError:
                box.close()
                time.sleep(0.005)
                continue
            try:
                keys = box.keys()
                if keys and rounds < 5:
                    deleted.put(str(box[keys[0]]["Message-ID"]))
                    box.remove(keys[0])
                    try:
                        box.flush()
                    except mailbox.ExternalClashError:
                        # CPython re-takes only the fcntl lock on the renamed file after the
                        # rewrite; a deliverer may hold it for the instant it needs to find our
                        # dotlock. The rewrite itself is done.
                        pass
                    rounds += 1
            finally:
                box.unlock()
                box.close()
            time.sleep(0.01)
        deleted.put(None)

    rw = CTX.Process(target=rewriter)
    rw.start()
    workers = [CTX.Process(target=writer, args=(p,)) for p in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    stop.set()
    rw.join(60)
    assert rw.exitcode == 0 and [w.exitcode for w in workers] == [0, 0]
    gone = set(iter(deleted.get, None))
    assert len(gone) == 5  # five rewrites happened (the file's inode number may come back)
    expected = {f"<99.{i}@test>" for i in range(5)}
    expected |= {f"<{p}.{i}@test>" for p in range(2) for i in range(100)}
    ids = message_ids(mailbox_path)
    assert len(ids) == len(set(ids))
    assert set(ids) == expected - gone
    assert os.stat(mailbox_path).st_uid == system_user.pw_uid


def test_symlink_swapped_in_during_deliveries_never_writes_outside(
    spool: Path,
    mailbox_path: Path,
    outside: Path,
    config_values: dict[str, object],
    system_user: pwd.struct_passwd,
) -> None:
    """Another process keeps replacing the mailbox by a symlink (and back) while we
    deliver; every delivery lands in a real mailbox or defers, never in the link's target."""
    config = small_config(config_values, deliver_lock_attempts=1_000)
    before = sha(outside)
    stop = CTX.Event()

    def swapper() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            link, real = spool / f".link{n}", spool / f".real{n}"
            link.symlink_to(outside)
            os.rename(link, mailbox_path)
            real.write_bytes(b"")
            os.chown(real, system_user.pw_uid, system_user.pw_gid)
            os.rename(real, mailbox_path)

    proc = CTX.Process(target=swapper)
    proc.start()
    outcomes: dict[str, int] = {}
    try:
        for i in range(500):
            try:
                deliver(mailbox_path, b"Subject: %d\n\nx\n" % i, config, system_user)
                outcomes["ok"] = outcomes.get("ok", 0) + 1
            except DeliveryError as e:
                assert e.status.startswith("4."), e.reason
                outcomes[e.reason] = outcomes.get(e.reason, 0) + 1
    finally:
        stop.set()
        proc.join(10)
    assert sha(outside) == before
    assert outcomes.get("ok", 0) > 0, outcomes


# --- interop ----------------------------------------------------------------------------------


@pytest.mark.interop
def test_s_nail_lists_every_message(
    tmp_path: Path, mailbox_path: Path, config: Config, system_user: pwd.struct_passwd
) -> None:
    snail = need_tool("s-nail", "s-nail")
    subjects = [f"subject number {i}" for i in range(5)]
    for i, s in enumerate(subjects):
        deliver(
            mailbox_path,
            f"From: a@b.test\nSubject: {s}\n\nFrom x {i}\n\n".encode(),
            config,
            system_user,
        )
    out = subprocess.run(
        [snail, "-N", "-H", "-f", str(mailbox_path)],
        env={"MAILRC": "/dev/null", "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
    )
    lines = [ln for ln in out.stdout.decode().splitlines() if ln.strip()]
    assert len(lines) == len(subjects), out
    for line, subject in zip(lines, subjects, strict=True):
        assert subject in line


@pytest.mark.interop
def test_mutt_reads_every_message(
    tmp_path: Path, mailbox_path: Path, config: Config, system_user: pwd.struct_passwd
) -> None:
    """mutt (on a pty from script(1)) copies all messages to a second mbox; the copy has them
    all with bodies intact, and mutt in read-only mode left our mailbox alone."""
    mutt = need_tool("mutt", "mutt")
    script = need_tool("script", "bsdutils")
    bodies = [f"Subject: m{i}\n\nFrom x\n>From y {i}\n".encode() for i in range(4)]
    for body in bodies:
        deliver(mailbox_path, body, config, system_user)
    before = sha(mailbox_path)
    copy = tmp_path / "copy"
    muttrc = tmp_path / "muttrc"
    muttrc.write_text(
        "set confirmcreate=no\nset confirmappend=no\nset mbox_type=mbox\n"
        "set auto_tag=yes\nset quit=yes\nset move=no\n"
        # Otherwise mutt first asks whether to create ~/Mail, eating the keys we push.
        f"set folder={tmp_path}\n"
    )
    keys = f"push '<tag-pattern>~A<enter><copy-message>{copy}<enter><quit>'"
    command = f'{mutt} -n -R -F {muttrc} -f {mailbox_path} -e "{keys}"'
    subprocess.run(
        [script, "-qec", command, "/dev/null"],
        env={"HOME": str(tmp_path), "TERM": "xterm", "PATH": "/usr/bin:/bin"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
    )
    assert sha(mailbox_path) == before
    got = raw_messages(copy)
    assert len(got) == len(bodies)
    rcpt = f"{system_user.pw_name}@host.example.test"
    for raw, body in zip(got, bodies, strict=True):
        # mutt adds Status, Lines and Content-Length to copies; the rest must be ours, exactly.
        kept = b"".join(
            ln
            for ln in raw.splitlines(keepends=True)
            if not ln.startswith((b"Status:", b"Lines:", b"Content-Length:"))
        )
        assert unquote(kept) == stored(body, rcpt)


def test_mailbox_being_created_by_another_delivery_is_waited_for(tmp_path: Path) -> None:
    """Two runners deliver the first message of a new mailbox at once: the loser must not
    defer because it looked between the winner's O_EXCL create and its fchown."""
    need_root()
    path = tmp_path / "box"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)  # root's, empty: mid-create

    def finish() -> None:
        time.sleep(0.02)
        os.fchown(fd, 4242, 4242)

    t = threading.Thread(target=finish)
    t.start()
    try:
        got = mbox._open(str(path), 4242, 4242, None, check_owner=True, create=True)
        assert os.fstat(got).st_uid == 4242
        os.close(got)
    finally:
        t.join()
        os.close(fd)
    with pytest.raises(DeliveryError, match="not owned by recipient"):  # and if it stays so
        mbox._open(str(path), 4343, 4343, None, check_owner=True, create=True)


# --- the framing mail's reader shares -------------------------------------------------------


def test_frame_quote_unquote_and_separator() -> None:
    """The pieces mail's `s` and quit use are the deliverer's: same From_ line and quoting."""
    msg = b"Subject: q\n\nFrom a\n>From b\n>>From c\nFromage\n From d\n"
    framed = mbox.frame(msg, "")
    line, body = framed.split(b"\n", 1)
    assert line.startswith(b"From MAILER-DAEMON ") and len(line) == 19 + len(time.asctime())
    assert body == b"Subject: q\n\n>From a\n>>From b\n>>>From c\nFromage\n From d\n\n"
    assert mbox.unquote(body) == msg + b"\n"
    assert mbox.frame(b"Subject: x\n\nno newline", "a@b").endswith(b"no newline\n\n")
    assert [mbox.separator(t) for t in (b"", b"x", b"x\n", b"\n\n")] == [b"", b"\n\n", b"\n", b""]


# --- the reader's rewrite -------------------------------------------------------------------


def rewrite(path: Path, content: bytes) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        mbox.rewrite(str(path), fd, os.fstat(fd), path.read_bytes(), content)
    finally:
        os.close(fd)


def test_rewrite_renames_a_new_file_over_keeping_the_mode(tmp_path: Path) -> None:
    path = tmp_path / "box"
    path.write_bytes(b"From a Thu Jan  1 00:00:00 1970\n\nold\n\n")
    os.chmod(path, 0o640)
    before = path.stat()
    rewrite(path, b"From b Thu Jan  1 00:00:00 1970\n\nnew\n\n")
    after = path.stat()
    assert path.read_bytes() == b"From b Thu Jan  1 00:00:00 1970\n\nnew\n\n"
    assert after.st_ino != before.st_ino and stat.S_IMODE(after.st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["box"]


@pytest.mark.parametrize("content", [b"From a x\n\nkept\n\n", b"From a x\n\nkept\n\nand more\n"],
                         ids=["shorter", "longer"])
def test_rewrite_in_place_when_no_new_file_can_be_made(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "box"
    path.write_bytes(b"From a x\n\nkept\n\nFrom b x\n\ndropped\n\n")
    blocker = tmp_path / f".box.{os.getpid()}.pmt"
    blocker.write_bytes(b"")
    ino = path.stat().st_ino
    rewrite(path, content)
    assert path.read_bytes() == content and path.stat().st_ino == ino
    assert blocker.read_bytes() == b""


def test_rewrite_in_place_failing_midway_names_the_backup(tmp_path: Path) -> None:
    with tmpfs(tmp_path, "1m") as mnt:
        path = mnt / "box"
        path.write_bytes(b"From a x\n\nsmall\n\n")
        (mnt / f".box.{os.getpid()}.pmt").write_bytes(b"")  # no room for a new file's name
        content = b"From a x\n\n" + b"y" * (2 << 20) + b"\n\n"
        with pytest.raises(OSError) as e:
            rewrite(path, content)
        assert e.value.errno == errno.ENOSPC
        reason = str(e.value.strerror)
        assert reason.startswith("rewriting failed (No space left on device); the intended")
        backup = Path(reason.rsplit(" ", 1)[1])
        try:
            assert backup.read_bytes() == content
        finally:
            backup.unlink()
