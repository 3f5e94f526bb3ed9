"""The mbox format's one writer: the delivery agent's append (safe open, fcntl+dotlock, mboxrd
framing, all-or-nothing), and the framing, locked append and rewrite that mail's reader uses."""

import errno
import grp
import os
import re
import stat
import time
from collections.abc import Callable
from typing import BinaryIO

from pymailtools.config import Config
from pymailtools.errors import DeliveryError
from pymailtools.fileio import fsync_dir, write_all
from pymailtools.local.lock import MailboxBusy, MailboxLock
from pymailtools.queue.store import crash_point

# Bound on one line fragment we inspect (headers, quoting); longer lines pass through in pieces.
LINE_LIMIT = 1 << 16
# Body read size, and write buffer size: few large write()s keep a 100 MB append fast.
BLOCK = 1 << 20
# A long append refreshes its dotlock this often so nobody breaks it as stale (liblockfile: 60 s).
REFRESH_INTERVAL = 60.0
# How often to reopen when a mail reader replaces the mailbox by rename while we wait for locks.
REOPEN_ATTEMPTS = 10

# Dovecot/UW-IMAP metadata a sender must not be able to forge, and Content-Length, which some
# readers trust for message boundaries.
DROP_HEADERS = frozenset(
    {
        b"status",
        b"x-status",
        b"x-uid",
        b"x-imapbase",
        b"x-imap",
        b"x-keywords",
        b"content-length",
    }
)

_FROM = re.compile(rb"^(?=>*From )", re.MULTILINE)
_QUOTED_FROM = re.compile(rb"^>(>*From )", re.MULTILINE)
_OPEN = os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


def append(
    path: str,
    message: BinaryIO,
    *,
    sender: str,
    recipient: str,
    uid: int,
    gid: int,
    config: Config,
    check_owner: bool = True,
    create: bool = True,
    busy: dict[str, str] | None = None,
) -> None:
    """Append ``message`` (headers + body, LF line ends) to the mbox file ``path``.

    Either the whole message lands, followed by one blank line and fsynced, or the file is
    truncated back to its old size and DeliveryError (4.x.x, so the message stays queued) is
    raised. ``uid``/``gid`` own a newly created mailbox; with ``check_owner`` an existing one
    must belong to ``uid``.

    ``busy`` remembers, for one queue run, the mailboxes whose locks were held through all
    attempts and why: a mailbox found there is deferred at once with the same reason, so one
    busy mailbox costs the run a single wait rather than one per message.
    """
    check_envelope(sender, recipient)
    fd, lock = open_locked(path, uid=uid, gid=gid, config=config, check_owner=check_owner,
                            create=create, busy=busy)
    try:
        _write(fd, lock, message, sender, recipient, path)
    finally:
        lock.release()
        os.close(fd)


def open_locked(path: str, *, uid: int, gid: int, config: Config, check_owner: bool,
                 create: bool, busy: dict[str, str] | None) -> tuple[int, MailboxLock]:
    """Open the mailbox ``path`` safely and take both its locks; the caller releases the lock
    and closes the descriptor. DeliveryError (4.x.x) when it cannot (see ``append``)."""
    if busy is not None and path in busy:
        raise DeliveryError(busy[path], "4.2.0")
    mail_gid = _mail_gid()
    for _ in range(REOPEN_ATTEMPTS):
        fd = _open(path, uid, gid, mail_gid, check_owner=check_owner, create=create)
        try:
            lock = MailboxLock(path, fd, config, owner=(uid, gid))
            try:
                lock.acquire()
            except MailboxBusy as e:
                if busy is not None:
                    busy[path] = str(e)
                raise DeliveryError(str(e), "4.2.0") from None
            except OSError as e:
                raise os_error(f"cannot lock mailbox {path}", e) from None
            # Python's mailbox, mutt and mail(1) rewrite by rename: the inode we opened and
            # locked may no longer be the mailbox, and appending to it would lose the mail.
            try:
                current = _still_current(path, fd)
            except BaseException:
                lock.release()
                raise
            if current:
                return fd, lock
            lock.release()
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise DeliveryError(f"mailbox {path} kept being replaced while locking it", "4.2.0")


def check_envelope(sender: str, recipient: str) -> None:
    """Refuse addresses that would break the From_ line or inject headers (5.1.7 / 5.1.3)."""
    # The queue validates envelopes already; this guards the lines we write regardless.
    for address, what, status in ((sender, "sender", "5.1.7"), (recipient, "recipient", "5.1.3")):
        if address.isprintable():  # the usual case, in C: no control character at all
            continue
        if any(ord(c) < 32 or ord(c) == 127 for c in address):
            raise DeliveryError(f"{what} address contains control characters", status)


def os_error(action: str, e: OSError) -> DeliveryError:
    """A temporary DeliveryError for a failed system call: 4.2.2 when out of space or quota."""
    status = "4.2.2" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "4.3.0"
    return DeliveryError(f"{action}: {e.strerror or e}", status)


_mail_group: tuple[float, int | None] = (-1e9, None)


def _mail_gid() -> int | None:
    """The mail group's id, looked up again after 2 s (not for every message:
    getgrnam reads /etc/group each time)."""
    global _mail_group
    now = time.monotonic()
    if now - _mail_group[0] >= 2.0:
        try:
            gid: int | None = grp.getgrnam("mail").gr_gid
        except KeyError:
            gid = None
        _mail_group = (now, gid)
    return _mail_group[1]


def _refuse_unsafe(st: os.stat_result, uid: int, check_owner: bool) -> None:
    """Postfix safe_open() rules; all temporary so the mail waits while a human looks."""
    if stat.S_ISLNK(st.st_mode):
        raise DeliveryError("mailbox is a symbolic link", "4.2.0")
    if not stat.S_ISREG(st.st_mode):
        raise DeliveryError("mailbox is not a regular file", "4.2.0")
    if st.st_nlink != 1:
        raise DeliveryError(f"mailbox has {st.st_nlink} hard links", "4.2.0")
    if check_owner and st.st_uid != uid:
        raise DeliveryError("mailbox not owned by recipient", "4.2.0")


def _open(
    path: str, uid: int, gid: int, mail_gid: int | None, *, check_owner: bool, create: bool
) -> int:
    """Open (or create) the mailbox for appending, refusing anything but our own regular file."""
    for attempt in range(REOPEN_ATTEMPTS):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if not create:
                raise DeliveryError(f"mailbox {path} does not exist", "4.2.0") from None
            fd = _create(path, uid, gid, mail_gid)
            if fd is None:
                continue
            return fd
        except OSError as e:
            raise os_error(f"cannot open mailbox {path}", e) from None
        if (check_owner and st.st_uid != uid and st.st_uid == os.geteuid() and not st.st_size
                and attempt < REOPEN_ATTEMPTS - 1):
            # Empty and ours: another delivery has just created it (O_EXCL) and its fchown to
            # the recipient follows at once. Look again rather than defer the message.
            time.sleep(0.005 * (attempt + 1))
            continue
        # Checking before open() means a FIFO or device is never even opened.
        _refuse_unsafe(st, uid, check_owner)
        try:
            fd = _open_existing(path)
        except FileNotFoundError:
            continue
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise DeliveryError("mailbox is a symbolic link", "4.2.0") from None
            if e.errno in (errno.ENXIO, errno.EISDIR):
                raise DeliveryError("mailbox is not a regular file", "4.2.0") from None
            raise os_error(f"cannot open mailbox {path}", e) from None
        try:
            fst = os.fstat(fd)
            # Replaced between lstat() and open(): look again rather than trust either.
            replaced = fst.st_nlink == 0 or (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino)
            if not replaced:
                _refuse_unsafe(fst, uid, check_owner)
        except BaseException:
            os.close(fd)
            raise
        if replaced:
            os.close(fd)
            continue
        return fd
    raise DeliveryError(f"mailbox {path} kept changing while it was being opened", "4.2.0")


def _open_existing(path: str) -> int:
    # Read access lets us look at the file's last bytes through the same descriptor; a second
    # descriptor would be no good, as closing it would drop our fcntl lock.
    try:
        return os.open(path, os.O_RDWR | _OPEN)
    except PermissionError:
        return os.open(path, os.O_WRONLY | _OPEN)


def _create(path: str, uid: int, gid: int, mail_gid: int | None) -> int | None:
    """New mailbox: O_EXCL so nothing planted is followed; owner and mode set on the fd only."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPEN, 0o600)
    except FileExistsError:
        return None
    except OSError as e:
        raise os_error(f"cannot create mailbox {path}", e) from None
    try:
        if os.geteuid() == 0:
            group = mail_gid if mail_gid is not None else gid
            os.fchown(fd, uid, group)
        else:
            # An unprivileged creator gets the directory's group (setgid mail spool) or its own.
            group = os.fstat(fd).st_gid
        # Debian Policy 11.6: user:mail 0660, or 0600 when there is no mail group to share with.
        os.fchmod(fd, 0o660 if mail_gid is not None and group == mail_gid else 0o600)
    except OSError as e:
        st = os.fstat(fd)
        os.close(fd)
        _unlink_if_same(path, st)
        raise os_error(f"cannot create mailbox {path}", e) from None
    return fd


def _unlink_if_same(path: str, st: os.stat_result) -> None:
    try:
        now = os.lstat(path)
        if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            os.unlink(path)
    except OSError:
        pass


def _still_current(path: str, fd: int) -> bool:
    """After locking: is ``fd`` still the file at ``path``, with exactly one link?"""
    fst = os.fstat(fd)
    if fst.st_nlink == 0:
        return False
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if (st.st_dev, st.st_ino) != (fst.st_dev, fst.st_ino):
        return False
    if fst.st_nlink != 1:
        raise DeliveryError(f"mailbox has {fst.st_nlink} hard links", "4.2.0")
    return True


class _MessageReadError(Exception):
    """Reading the queued message failed; kept apart from mailbox write errors for the log."""


class _Writer:
    """Large buffered appends through the descriptor, refreshing the dotlock on long runs."""

    def __init__(self, fd: int, lock: MailboxLock) -> None:
        self.fd = fd
        self.lock = lock
        self.buf = bytearray()
        self.last = b""
        self.total = 0  # bytes written so far
        self.refreshed = time.monotonic()

    def write(self, data: bytes) -> None:
        if data:
            self.buf += data
            self.last = data[-1:]
            if len(self.buf) >= BLOCK:
                self.flush()

    def flush(self) -> None:
        write_all(self.fd, self.buf)
        self.total += len(self.buf)
        self.buf.clear()
        # Test hook (PYMAILTOOLS_TEST_CRASH_AT): die with part of the message in the mailbox.
        crash_point("mbox_mid_append")
        if time.monotonic() - self.refreshed > REFRESH_INTERVAL:
            self.lock.refresh()
            self.refreshed = time.monotonic()


def _append_at(fd: int, size: int, lock: MailboxLock, body: Callable[[_Writer], None], *,
               sync: bool = True) -> int:
    """With the locks held, add the separator the file needs and what ``body`` writes, then
    fsync (unless ``sync`` is false: a group's fsync comes later). The caller truncates back
    to ``size`` if this raises."""
    out = _Writer(fd, lock)
    out.write(_separator(fd, size))
    body(out)
    out.flush()
    if sync:
        os.fsync(fd)
    return out.total


def append_framed(fd: int, lock: MailboxLock, data: bytes) -> None:
    """Append already framed messages (``frame``) to the locked mbox open as ``fd``: the whole
    of ``data`` lands and is fsynced, or the file is truncated back and the error re-raised."""
    size = os.fstat(fd).st_size
    try:
        _append_at(fd, size, lock, lambda out: out.write(data))
    except BaseException:
        truncate(fd, size)
        raise


def _write(
    fd: int, lock: MailboxLock, message: BinaryIO, sender: str, recipient: str, path: str,
    *, sync: bool = True,
) -> int:
    """Append one message (all or nothing) and return how many bytes the file grew by."""
    size = os.fstat(fd).st_size

    def body(out: _Writer) -> None:
        out.write(envelope(sender, recipient))
        out.last = b""
        _copy(message, out)
        if out.last != b"\n":
            out.write(b"\n")
        out.write(b"\n")

    try:
        return _append_at(fd, size, lock, body, sync=sync)
    except BaseException as e:
        truncated = truncate(fd, size)
        if not isinstance(e, Exception):
            raise
        if isinstance(e, DeliveryError):
            raise
        note = "" if truncated else " (and truncating it back failed)"
        if isinstance(e, _MessageReadError):
            cause = e.__cause__
            raise DeliveryError(f"cannot read queued message: {cause}{note}", "4.3.0") from e
        if isinstance(e, OSError):
            err = os_error(f"cannot write mailbox {path}", e)
            raise DeliveryError(err.reason + note, err.status) from e
        raise DeliveryError(f"cannot write mailbox {path}: {e!r}{note}", "4.3.0") from e


def append_unsynced(fd: int, lock: MailboxLock, message: BinaryIO, *, sender: str,
                    recipient: str, path: str) -> int:
    """``append``'s write into a mailbox already open and locked (``open_locked``), without
    the fsync, which the caller does later; returns the bytes added. A failure truncates back
    to the size before this message only, and raises DeliveryError."""
    check_envelope(sender, recipient)
    return _write(fd, lock, message, sender, recipient, path, sync=False)


def truncate(fd: int, size: int) -> bool:
    """Cut the locked mailbox open as ``fd`` back to ``size`` bytes, fsynced; False when that
    failed."""
    # Before unlocking (the caller's finally): a reader must never see half a message.
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError:
        return False
    return True


def separator(content: bytes) -> bytes:
    """Newlines to add after mbox text ending in ``content`` (its last two bytes are enough)
    so that it ends in a blank line: a torn last message can't swallow the next From_ line."""
    if not content or content.endswith(b"\n\n"):
        return b""
    return b"\n" if content.endswith(b"\n") else b"\n\n"


def _separator(fd: int, size: int) -> bytes:
    if size == 0:
        return b""
    try:
        tail = os.pread(fd, 2, max(0, size - 2))
    except OSError:
        return b""  # write-only descriptor: cannot look, leave the file as it is
    return separator(tail)


def from_line(sender: str) -> bytes:
    """The From_ line that starts a message; asctime in local time, as Postfix, mail.local and
    mail readers write and expect it."""
    line = f"From {sender or 'MAILER-DAEMON'} {time.asctime()}\n"
    return line.encode("utf-8", "surrogateescape")


def envelope(sender: str, recipient: str) -> bytes:
    """The From_ line, Return-Path: and Delivered-To: that start a delivered message."""
    head = f"Return-Path: <{sender}>\nDelivered-To: {recipient}\n"
    return from_line(sender) + head.encode("utf-8", "surrogateescape")


def frame(message: bytes, sender: str) -> bytes:
    """An RFC 5322 ``message`` as one mbox entry: From_ line, mboxrd quoting, blank line."""
    return end_entry(from_line(sender) + quote(message))


def end_entry(entry: bytes) -> bytes:
    """``entry`` (From_ line included) ending in the blank line that closes an mbox entry."""
    if not entry.endswith(b"\n"):
        entry += b"\n"
    if not entry.endswith(b"\n\n"):
        entry += b"\n"
    return entry


def unquote(body: bytes) -> bytes:
    """Undo ``quote``: one '>' less on every line matching ^>+From."""
    return _QUOTED_FROM.sub(rb"\1", body)


def _read(message: BinaryIO, size: int) -> bytes:
    try:
        return message.read(size)
    except Exception as e:
        raise _MessageReadError() from e


def quote(chunk: bytes, at_line_start: bool = True) -> bytes:
    """mboxrd: one more '>' on every line matching ^>*From, counting only real line starts."""
    if b"From " not in chunk:
        return chunk
    if at_line_start:
        return _FROM.sub(b">", chunk)
    nl = chunk.find(b"\n") + 1
    if nl == 0:
        return chunk
    return chunk[:nl] + _FROM.sub(b">", chunk[nl:])


def _copy(message: BinaryIO, out: _Writer) -> None:
    """Stream the stored message into ``out``: headers line by line (to drop metadata headers),
    the body in large blocks cut at line ends, never more than ~2 MB in memory."""
    try:
        message.seek(0)
    except Exception as e:
        raise _MessageReadError() from e
    buf = b""
    pos = 0
    eof = False
    at_start = True
    dropping = False
    # Header block, one line (or LINE_LIMIT fragment) at a time.
    while True:
        nl = buf.find(b"\n", pos)
        if nl < 0 or nl - pos >= LINE_LIMIT:
            if not eof and len(buf) - pos < LINE_LIMIT:
                data = _read(message, LINE_LIMIT)
                buf = buf[pos:] + data
                pos = 0
                eof = not data
                continue
            end = min(len(buf), pos + LINE_LIMIT)
        else:
            end = nl + 1
        piece = buf[pos:end]
        pos = end
        if not piece:
            return
        if at_start:
            if piece in (b"\n", b"\r\n"):
                out.write(piece)
                break
            if piece[:1] not in (b" ", b"\t"):
                name, colon, _ = piece.partition(b":")
                dropping = bool(colon) and name.strip().lower() in DROP_HEADERS
        if not dropping:
            out.write(quote(piece, at_start))
        at_start = piece.endswith(b"\n")
    # Body, in blocks that end at a line end so quoting sees every line start.
    pending = buf[pos:]
    at_start = True
    while True:
        data = b"" if eof else _read(message, BLOCK)
        if not data:
            out.write(quote(pending, at_start))
            return
        pending += data
        cut = pending.rfind(b"\n") + 1
        if cut:
            out.write(quote(pending[:cut], at_start))
            pending = pending[cut:]
            at_start = True
        elif len(pending) >= LINE_LIMIT:
            out.write(quote(pending, at_start))
            pending = b""
            at_start = False


def rewrite(path: str, fd: int, st: os.stat_result, old: bytes, content: bytes) -> None:
    """Replace the content ``old`` of the mbox ``path`` (open read-write as ``fd``, ``st`` its
    fstat) by ``content``; the caller holds the locks. See ``rewrite_with``."""
    same = 0
    limit = min(len(old), len(content))
    # First differing byte, found in blocks (a bytes comparison per block is C speed).
    block = 1 << 16
    while same < limit and old[same : same + block] == content[same : same + block]:
        same += block
    while same < limit and old[same] == content[same]:
        same += 1

    def fill(out: int) -> int:
        write_all(out, content, 0)
        return same

    rewrite_with(path, fd, st, fill)


def rewrite_with(path: str, fd: int, st: os.stat_result, fill: Callable[[int], int],
                 ready: Callable[[], None] | None = None) -> None:
    """Replace the content of the mbox ``path`` (open read-write as ``fd``, ``st`` its fstat)
    by what ``fill`` writes; the caller holds the locks.

    ``fill(out)`` writes the whole new content into the empty file ``out`` from offset 0 and
    returns the offset of its first byte that differs from the mailbox's; it may be called a
    second time (a new file failed, then in place). ``ready()`` runs once, when the new content
    is complete and before the mailbox changes; what it raises abandons the rewrite.

    Preferably a new file renamed over the old one (atomic; deliverers re-check the inode after
    locking, so they follow). Where the directory is not ours to write (an ordinary user in
    /var/mail), in place: the new content goes to a temporary file first, then the mailbox is
    overwritten from the first changed byte and truncated only after that.
    Raises OSError if the mailbox cannot be rewritten; once it may be half rewritten, the
    error's text names the file holding the intended content.
    """
    done = False

    def ready_once() -> None:
        nonlocal done
        if not done and ready is not None:
            ready()
        done = True

    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.pmt")
    try:
        tfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600)
    except OSError:
        tfd = -1
    if tfd >= 0:
        written = False
        try:
            try:
                if os.geteuid() == 0:
                    os.fchown(tfd, st.st_uid, st.st_gid)
                elif st.st_uid != os.geteuid():
                    raise PermissionError(errno.EPERM, "not the owner")
                else:
                    try:
                        os.fchown(tfd, -1, st.st_gid)
                    except OSError:
                        pass
                os.fchmod(tfd, stat.S_IMODE(st.st_mode))
                fill(tfd)
                os.fsync(tfd)
            finally:
                os.close(tfd)
            written = True
            ready_once()
            os.rename(tmp, path)
            try:
                fsync_dir(directory)
            except OSError:
                pass  # renamed already: the new content is in place either way
            return
        except OSError:
            _unlink_quietly(tmp)
            if written and not done:
                raise  # ready() failed: nothing changed
        except BaseException:
            _unlink_quietly(tmp)
            raise
    _rewrite_in_place(fd, fill, ready_once)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _rewrite_in_place(fd: int, fill: Callable[[int], int], ready: Callable[[], None]) -> None:
    import tempfile  # rarely needed: kept off the delivery agent's start-up

    bfd, backup = tempfile.mkstemp(prefix="mail-backup-")
    try:
        try:
            same = fill(bfd)
            os.fsync(bfd)
            size = os.fstat(bfd).st_size
            ready()
        except BaseException:
            _unlink_quietly(backup)
            raise
        try:
            pos = same
            while pos < size:
                data = os.pread(bfd, min(BLOCK, size - pos), pos)
                if not data:
                    break
                write_all(fd, data, pos)
                pos += len(data)
            os.ftruncate(fd, size)
            os.fsync(fd)
        except OSError as e:
            raise OSError(e.errno, f"rewriting failed ({e.strerror}); the intended content is "
                          f"in {backup}") from None
    finally:
        os.close(bfd)
    os.unlink(backup)
