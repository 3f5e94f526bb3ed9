"""Mail folders as a reader sees them (mbox file or Maildir): load, index, save changes safely."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32

from pymailtools.config import Config
from pymailtools.errors import EX_NOINPUT, EX_NOPERM, EX_TEMPFAIL, MailError
from pymailtools.local import mbox
from pymailtools.local.lock import MailboxLock

_FROM_LINE = re.compile(rb"^From ", re.MULTILINE)
_STATUS = re.compile(rb"^Status:[^\n]*\n", re.MULTILINE | re.IGNORECASE)


class FolderError(MailError):
    """A folder cannot be opened (66, 77) or safely rewritten (75)."""

    exit_code = EX_TEMPFAIL


def open_error(path: str, e: OSError) -> FolderError:
    code = EX_NOPERM if e.errno in (errno.EACCES, errno.EPERM) else EX_NOINPUT
    return FolderError(f"{path}: {e.strerror}", code)


@dataclass
class Entry:
    """One message of a folder: where it is, what its stored flags say, what this session did."""

    raw: bytes  # the whole message as stored (mbox: From_ line included)
    key: str = ""  # Maildir: file name under new/ or cur/
    subdir: str = ""  # Maildir: "new" or "cur"
    seen: bool = False  # stored as read (Status R / Maildir S)
    old: bool = False  # stored as no longer new (Status O / in cur/)
    read: bool = False  # displayed in this session
    deleted: bool = False
    saved: bool = False
    preserved: bool = False
    to_mbox: bool = False
    _headers: Message | None = None

    @property
    def header_bytes(self) -> bytes:
        start = self.raw.find(b"\n") + 1 if self.raw.startswith(b"From ") else 0
        end = self.raw.find(b"\n\n", start)
        return self.raw[start : len(self.raw) if end < 0 else end + 1]

    @property
    def message_bytes(self) -> bytes:
        """The RFC 5322 message: without the From_ line, mboxrd quoting undone."""
        if not self.raw.startswith(b"From "):
            return self.raw
        return mbox.unquote(self.raw[self.raw.find(b"\n") + 1 :])

    @property
    def headers(self) -> Message:
        if self._headers is None:
            self._headers = BytesHeaderParser(policy=compat32).parsebytes(self.header_bytes)
        return self._headers

    @property
    def from_line(self) -> str:
        if not self.raw.startswith(b"From "):
            return ""
        return self.raw[5 : self.raw.find(b"\n")].decode("utf-8", "replace")

    @property
    def is_new(self) -> bool:
        return not self.old and not self.seen and not self.read

    def letter(self) -> str:
        if self.deleted:
            return "D"
        if self.saved:
            return "*"
        if self.preserved:
            return "P"
        if self.to_mbox:
            return "M"
        if self.read:
            return "R"
        if self.seen:
            return "O"
        return "U" if self.old else "N"

    def status_value(self) -> str:
        """The Status: letters to store: R when read, O once a session has seen it."""
        return ("R" if self.seen or self.read else "") + "O"


def _status_flags(header: bytes) -> tuple[bool, bool]:
    m = re.search(rb"(?mi)^Status:[ \t]*([A-Za-z]*)", header)
    letters = m.group(1).upper() if m else b""
    return b"R" in letters, b"O" in letters


class Folder:
    """The interface read mode uses; ``MboxFolder`` and ``MaildirFolder`` implement it."""

    path: str
    entries: list[Entry]

    def changed(self) -> bool:
        """Whether quitting would change anything stored."""
        raise NotImplementedError

    def save(self, config: Config, keep: list[Entry],
             before_write: Callable[[], None] | None = None) -> int:
        """Store the session's changes: only ``keep`` stays. Returns messages that arrived.
        ``before_write`` runs before anything stored changes (an mbox file's with it locked
        and verified): read mode copies messages to ~/mbox there."""
        raise NotImplementedError


class MboxFolder(Folder):
    """An mbox file, read whole under a shared lock; rewritten under the delivery locks."""

    def __init__(self, path: str, data: bytes, st: os.stat_result) -> None:
        self.path = path
        self.data = data
        self.ino = (st.st_dev, st.st_ino)
        starts = [m.start() for m in _FROM_LINE.finditer(data)]
        self.prefix = data[: starts[0]] if starts else data
        ends = [*starts[1:], len(data)] if starts else []
        self.entries = [Entry(data[a:b]) for a, b in zip(starts, ends, strict=True)]
        for e in self.entries:
            e.seen, e.old = _status_flags(e.header_bytes)

    @classmethod
    def load(cls, path: str, config: Config) -> MboxFolder:
        fd, st = _open_file(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            # Shared fcntl lock while reading, so we never index half an appended message.
            lock = MailboxLock(path, fd, config)
            locked = True
            try:
                lock.acquire()
            except OSError:
                locked = False  # read-only media, NFS without locks: read anyway
            try:
                data = _read_all(fd)
            finally:
                if locked:
                    lock.release()
        finally:
            os.close(fd)
        return cls(path, data, st)

    def _new_content(self, keep: list[Entry]) -> bytes:
        out = [self.prefix]
        kept = {id(e) for e in keep}
        for e in self.entries:
            if id(e) in kept:
                out.append(_with_status(e))
        return b"".join(out)

    def changed(self) -> bool:
        return any(e.deleted or e.to_mbox or _with_status(e) is not e.raw for e in self.entries)

    def save(self, config: Config, keep: list[Entry],
             before_write: Callable[[], None] | None = None) -> int:
        new = self._new_content(keep)
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise FolderError(f"{self.path}: is a symbolic link; not rewritten") from None
                raise open_error(self.path, e) from None
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                    raise FolderError(f"{self.path}: not a regular file with one link; "
                                      "not rewritten")
                with MailboxLock(self.path, fd, config):
                    # Renamed over by another reader while we waited: start again on the new one.
                    if _current_inode(self.path) != (st.st_dev, st.st_ino):
                        continue
                    data = _read_all(fd)
                    old = self.data
                    if len(data) < len(old) or hashlib.sha256(data[: len(old)]).digest() != \
                            hashlib.sha256(old).digest():
                        raise FolderError(f"{self.path}: changed by another program while open;"
                                          " your changes were not saved")
                    arrived = data[len(old) :]
                    content = _join(new, arrived)
                    if before_write is not None:
                        before_write()
                    try:
                        mbox.rewrite(self.path, fd, st, data, content)
                    except OSError as e:
                        raise FolderError(f"{self.path}: {e.strerror}") from None
                    return len(_FROM_LINE.findall(arrived))
            finally:
                os.close(fd)
        raise FolderError(f"{self.path}: kept being replaced; not rewritten")


def _open_file(path: str, flags: int) -> tuple[int, os.stat_result]:
    """Open an mbox folder file (a new one mode 0600): FolderError when that fails or it is
    not a regular file."""
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        raise open_error(path, e) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise FolderError(f"{path}: not a regular file", EX_NOINPUT)
    return fd, st


def _join(new: bytes, arrived: bytes) -> bytes:
    if not arrived:
        return new
    return new + mbox.separator(new[-2:]) + arrived


def _with_status(e: Entry) -> bytes:
    """The message with its Status: header set for what this session did (same object when
    nothing changes, so unchanged messages are copied byte for byte)."""
    seen, old = _status_flags(e.header_bytes)
    want_seen = e.seen or e.read
    if seen == want_seen and old:
        return e.raw
    head = e.header_bytes
    start = e.raw.find(head)
    new_head = _STATUS.sub(b"", head)
    line = f"Status: {e.status_value()}\n".encode()
    return e.raw[:start] + new_head + line + e.raw[start + len(head) :]


def _current_inode(path: str) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    offset = 0
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


class MaildirFolder(Folder):
    """A Maildir: new/ and cur/ files; flags live in the ``:2,`` suffix of the name."""

    def __init__(self, path: str) -> None:
        self.path = path.rstrip("/")
        self.entries = []
        found = []
        for sub in ("new", "cur"):
            d = os.path.join(self.path, sub)
            try:
                names = os.listdir(d)
            except OSError as e:
                raise open_error(d, e) from None
            for name in names:
                if name.startswith("."):
                    continue
                try:
                    with open(os.path.join(d, name), "rb") as f:
                        st = os.fstat(f.fileno())
                        data = f.read()
                except OSError:
                    continue  # moved or removed by another reader meanwhile
                found.append((st.st_mtime, name, sub, data))
        found.sort()
        for _, name, sub, data in found:
            flags = name.rpartition(":2,")[2] if ":2," in name else ""
            self.entries.append(Entry(data, key=name, subdir=sub, seen="S" in flags,
                                      old=sub == "cur"))

    def changed(self) -> bool:
        return any(e.deleted or e.to_mbox or e.subdir == "new" or (e.read and not e.seen)
                   for e in self.entries)

    def save(self, config: Config, keep: list[Entry],
             before_write: Callable[[], None] | None = None) -> int:
        if before_write is not None:
            before_write()
        kept = {id(e) for e in keep}
        for e in self.entries:
            src = os.path.join(self.path, e.subdir, e.key)
            try:
                if id(e) not in kept:
                    os.unlink(src)
                    continue
                base, _, flags = e.key.partition(":2,")
                flagset = set(flags)
                if e.read:
                    flagset.add("S")
                name = f"{base}:2,{''.join(sorted(flagset))}"
                dst = os.path.join(self.path, "cur", name)
                if dst != src:
                    os.rename(src, dst)
            except FileNotFoundError:
                continue  # another reader already moved it
        return 0


def load(path: str, config: Config) -> Folder:
    """The folder at ``path``: a Maildir when it is a directory with cur/ and new/."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise open_error(path, e) from None
    if stat.S_ISDIR(st.st_mode):
        if os.path.isdir(os.path.join(path, "cur")) and os.path.isdir(os.path.join(path, "new")):
            return MaildirFolder(path)
        raise FolderError(f"{path}: is a directory, not a mailbox", EX_NOINPUT)
    return MboxFolder.load(path, config)


def mbox_bytes(e: Entry, status: bool = True) -> bytes:
    """The message framed for appending to an mbox file (From_ line, quoting, blank line)."""
    if e.raw.startswith(b"From "):
        return mbox.end_entry(_with_status(e) if status else e.raw)
    sender = "MAILER-DAEMON"
    rp = e.headers.get("Return-Path", "")
    if rp:
        sender = str(rp).strip().strip("<>") or sender
    return mbox.frame(e.raw, sender)


def append_mbox(path: str, messages: list[bytes], config: Config) -> bool:
    """Append framed messages to the mbox ``path`` under the delivery locks; True if created."""
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
    created = not os.path.lexists(path)
    fd, _ = _open_file(path, flags)
    try:
        with MailboxLock(path, fd, config) as lock:
            mbox.append_framed(fd, lock, b"".join(messages))
    finally:
        os.close(fd)
    return created
