"""The on-disk queue: its layout, and every operation on an entry and its files.

Layout under ``queue_directory``::

    tmp/        envelopes being written (never entries)
    messages/ID message bytes, written once, never rewritten; flock'ed by whoever works on ID.
                A new entry's file also holds the envelope it was queued with, after the
                message, and an ENTRY_TRAILER line: the message is its first env.size bytes
    incoming/ID envelope of a new entry (due now): for a submission, a second name (hard link)
                of messages/ID; a plain envelope file once the entry was rewritten
    deferred/ID envelope waiting for a retry; its mtime is the next try time
    hold/ID     envelope kept until released
    corrupt/    entries and maildrop files that failed validation (kept, never deleted)
    maildrop/   mode 1733: submissions by ordinary users, untrusted input for the root runner
                (written by Submission, read and validated by maildrop.py)
    summaries   the listing's index: one line appended per envelope write (index.py)
    trash/      state directories swapped out by postsuper -d ALL, settled later (bulk.py)

When every user may list the queue (authorized_mailq_users), incoming/, deferred/, hold/ are
0755 and summaries 0644: mailq works for ordinary users, who still cannot open an envelope
(0600) or anything in messages/ and history/ (0700).

An entry exists once its envelope is in a state directory (published last, after the message
file and its directory are synced), so a crash leaves either no entry or a complete one. A
submission costs one new file and one file fsync: Postfix's count, plus the directories'.
The tree, its set-up and the writing of a new entry are in intake.py (sendmail's hot path
loads only that); its names are this module's too.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import time

from pymailtools.errors import MailError
from pymailtools.fileio import fsync_dir, write_all
from pymailtools.queue import ids as queueid
from pymailtools.queue import index as qindex
from pymailtools.queue.envelope import (
    ENTRY_TRAILER,
    CorruptEnvelope,
    Envelope,
    quote,
    read_envelope,
    trailer,
    unquote,
)
from pymailtools.queue.intake import _O_CLOEXEC, QueueDir

# re-exported: callers have always imported these from here
from pymailtools.queue.intake import CORRUPT as CORRUPT
from pymailtools.queue.intake import DEFERRED as DEFERRED
from pymailtools.queue.intake import HISTORY as HISTORY
from pymailtools.queue.intake import HOLD as HOLD
from pymailtools.queue.intake import INCOMING as INCOMING
from pymailtools.queue.intake import MAILDROP as MAILDROP
from pymailtools.queue.intake import MAILDROP_TRAILER as MAILDROP_TRAILER
from pymailtools.queue.intake import STATES as STATES
from pymailtools.queue.intake import QueueNotSetUp as QueueNotSetUp
from pymailtools.queue.intake import Submission as Submission
from pymailtools.queue.intake import crash_point as crash_point

TYPE_CHECKING = False  # typing stays unloaded: these names only annotate
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from typing import BinaryIO

    from _typeshed import WriteableBuffer

# Reading a file of the queue: never through a symlink, never hanging on a planted FIFO.
_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _O_CLOEXEC


class EntryBusy(MailError):
    """Another process holds the entry's lock (a runner delivering it, or postsuper)."""


class EntryNotFound(MailError):
    """No entry with that id exists in the queue."""


def remove_file(path: str, dir_fd: int | None = None) -> bool:
    """Unlink a file of the queue; False when it was gone already."""
    try:
        os.unlink(path, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


def envelope_bytes(path: str, dir_fd: int | None = None) -> bytes:
    """The envelope bytes of a state file (``read_envelope``); ``path`` may be relative to
    ``dir_fd``, an open state directory (a listing's walk)."""
    fd = os.open(path, _O_READ, dir_fd=dir_fd)
    try:
        return read_envelope(fd)
    finally:
        os.close(fd)


class _Part(io.RawIOBase):
    """The first ``size`` bytes of an open file, read with pread (its own position)."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        b = memoryview(buffer).cast("B")  # its bytes (io.BufferedReader passes a memoryview)
        want = min(len(b), self.size - self.pos)
        if want <= 0:
            return 0  # the end of the part: no system call to learn it
        data = os.pread(self.fd, want, self.pos)
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def seek(self, pos: int, whence: int = 0) -> int:
        base = (0, self.pos, self.size)[whence]
        if base + pos < 0:
            raise OSError(errno.EINVAL, "negative seek position")
        self.pos = base + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def close(self) -> None:
        if not self.closed:
            os.close(self.fd)
        super().close()


class Attempt:
    """One delivery attempt of one recipient, as kept in the entry's history file."""

    __slots__ = ("when", "recipient", "relay", "status", "dsn", "reason")

    def __init__(self, when: float, recipient: str, relay: str, status: str, dsn: str,
                 reason: str) -> None:
        self.when = when
        self.recipient = recipient
        self.relay = relay
        self.status = status  # sent, deferred, bounced, expired
        self.dsn = dsn
        self.reason = reason

    def to_line(self) -> bytes:
        fields = [repr(float(self.when)), quote(self.recipient), quote(self.relay),
                  quote(self.status), quote(self.dsn), quote(self.reason)]
        return (" ".join(fields) + "\n").encode("utf-8", "surrogateescape")

    @classmethod
    def from_line(cls, line: bytes) -> Attempt:
        p = line.decode("utf-8", "surrogateescape").split(" ")
        if len(p) != 6:
            raise CorruptEnvelope("bad history line")
        return cls(float(p[0]), *(unquote(x) for x in p[1:]))

    def __repr__(self) -> str:
        return f"Attempt({self.recipient!r}, {self.status!r}, {self.reason!r})"


def entry_envelope(qid: str, data: bytes) -> Envelope:
    """The envelope in ``data``, read from entry ``qid``'s file: CorruptEnvelope when it
    names another id (a file renamed or copied under a name not its own)."""
    env = Envelope.from_bytes(data)
    if env.id != qid:
        raise CorruptEnvelope(f"envelope names id {env.id!r}, file is {qid!r}")
    return env


class Queue(QueueDir):
    """A queue directory tree and every operation on its entries."""

    # -- envelopes ------------------------------------------------------------------------

    def write_envelope(self, env: Envelope, state: str, *, mtime: float | None = None) -> None:
        """Write ``env`` into ``state`` atomically: temp, fsync, rename, fsync dir."""
        tmp = os.path.join(self.root, "tmp", f"{env.id}.env.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | _O_CLOEXEC,
                     0o600)
        try:
            os.fchmod(fd, 0o600)
            write_all(fd, env.to_bytes())
            os.fsync(fd)
            # the index line goes first: once the envelope is published, it must describe it
            qindex.append(self.root, env, os.fstat(fd).st_ino)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        if mtime is not None:
            os.utime(tmp, (mtime, mtime))
        os.rename(tmp, self.path(state, env.id))
        fsync_dir(self.path(state))

    def move(self, qid: str, src: str, dst: str, *, sync: bool = True) -> None:
        """Move an entry's envelope to another state (rename keeps its mtime, i.e. its retry
        schedule); ``sync=False`` leaves the directories to ``sync`` (a batch: one fsync per
        directory). FileNotFoundError when it is not in ``src``."""
        if src != dst:
            os.rename(self.path(src, qid), self.path(dst, qid))
            if sync:
                fsync_dir(self.path(dst))
                fsync_dir(self.path(src))

    def sync(self, *directories: str) -> None:
        """Make the renames and unlinks in these directories of the queue durable."""
        for d in directories:
            fsync_dir(self.path(d))

    def save(self, env: Envelope, src: str, dst: str) -> None:
        """Record a new state for an entry: move it (atomic), then rewrite it (atomic)."""
        try:
            self.move(env.id, src, dst)
        except FileNotFoundError:
            pass  # a bulk postsuper swapped the directory away; the lock holder's state counts
        nt = env.next_try if dst == DEFERRED else None
        self.write_envelope(env, dst, mtime=nt)

    def find(self, qid: str, states: Iterable[str] = STATES) -> str:
        """The state an entry is in: the first of ``states`` whose directory names it (every
        state by default); EntryNotFound when none does. The one answer to "where is it?"."""
        for state in states:
            try:
                os.lstat(self.path(state, qid))
            except (FileNotFoundError, NotADirectoryError):
                continue
            return state  # PermissionError goes up: this user may not look, not "no entry"
        raise EntryNotFound(f"{qid}: no such queue entry")

    def load(self, qid: str, state: str | None = None) -> tuple[str, Envelope]:
        """(state, envelope) of an entry; without ``state``, wherever it is (looked for again
        when a runner moved it meanwhile). CorruptEnvelope when the file names another id."""
        for _ in range(3):
            where = state or self.find(qid)
            try:
                data = envelope_bytes(self.path(where, qid))
                break
            except FileNotFoundError:
                if state:
                    raise
        else:
            raise EntryNotFound(f"{qid}: no such queue entry")
        return where, entry_envelope(qid, data)

    def envelope_file(self, qid: str, state: str) -> tuple[bytes, int]:
        """The envelope bytes of an entry in ``state`` (unparsed: see envelope.peek) and the
        inode of the file they were read from (EntryNotFound when it is not there)."""
        try:
            fd = os.open(self.path(state, qid), _O_READ)
        except FileNotFoundError:
            raise EntryNotFound(f"{qid}: no such queue entry") from None
        try:
            return read_envelope(fd), os.fstat(fd).st_ino
        finally:
            os.close(fd)

    def names(self, directory: str, *, ids_only: bool = True) -> Iterator[str]:
        """Names in a directory of the queue, in directory order (Postfix does not sort
        either), streamed; only valid ids unless ``ids_only=False`` (temp files, debris).
        Nothing when it is missing or unreadable (the maildrop, 1733, for ordinary users)."""
        try:
            it = os.scandir(f"{self.root}/{directory}")
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return
        is_valid = queueid.is_valid
        with it:
            for e in it:
                if not ids_only or is_valid(e.name):
                    yield e.name

    def ids(self, state: str) -> list[str]:
        """Entry ids in a state directory, from the directory alone (no file is read)."""
        try:
            with os.scandir(os.path.join(self.root, state)) as it:
                return sorted(e.name for e in it if queueid.is_valid(e.name))
        except FileNotFoundError:
            return []

    def scan(self, state: str) -> Iterator[tuple[str, os.stat_result]]:
        """(id, lstat) for each entry of a state; cheap: directory entries and inodes only."""
        try:
            it = os.scandir(os.path.join(self.root, state))
        except FileNotFoundError:
            return
        with it:
            for e in it:
                if queueid.is_valid(e.name):
                    try:
                        yield e.name, e.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue

    def due(self, now: float | None = None) -> list[tuple[str, str]]:
        """(state, id) of every entry due now: all of incoming, deferred whose mtime passed."""
        now = time.time() if now is None else now
        out = [(INCOMING, qid) for qid in self.ids(INCOMING)]
        out += sorted((DEFERRED, qid) for qid, st in self.scan(DEFERRED) if st.st_mtime <= now)
        return out

    # -- locking and removal --------------------------------------------------------------

    def lock(self, qid: str, blocking: bool = False) -> int:
        """Lock an entry (flock on its message file) and return the open fd.

        Raises EntryBusy when another process holds it, EntryNotFound when it is gone.
        """
        try:
            # O_NONBLOCK: a FIFO planted in messages/ must not hang the runner or mailq.
            fd = os.open(self.path("messages", qid),
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _O_CLOEXEC)
        except FileNotFoundError:
            raise EntryNotFound(f"{qid}: no such queue entry") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise EntryBusy(f"{qid}: entry is locked by another process") from None
            raise
        return fd

    def message(self, fd: int, env: Envelope) -> BinaryIO:
        """A reader of the message of a locked entry (``fd`` from ``lock``, left open): the
        whole file, or its first part when the file also holds the envelope it was queued
        with. CorruptEnvelope when the file does not match ``env``."""
        size = os.fstat(fd).st_size
        if size != env.size and trailer(fd, size, ENTRY_TRAILER)[0] != env.size:
            raise CorruptEnvelope("message file size does not match the envelope")
        if size == env.size:
            return os.fdopen(os.dup(fd), "rb")
        return io.BufferedReader(_Part(os.dup(fd), env.size))

    def read_message(self, qid: str) -> bytes:
        """The message of an entry, whole (for tests and tools; the runner streams it)."""
        _, env = self.load(qid)
        fd = os.open(self.path("messages", qid), os.O_RDONLY | os.O_NOFOLLOW | _O_CLOEXEC)
        try:
            with self.message(fd, env) as f:
                return f.read()
        finally:
            os.close(fd)

    def remove(self, qid: str, state: str) -> None:
        """Delete an entry (caller holds its lock): envelope first, so no half entry is seen.

        Not synced, as in Postfix: after a crash a delivered entry may come back and be
        delivered again (a duplicate), which is the safe direction; never a loss.
        """
        for kind in (state, "messages", HISTORY):
            remove_file(self.path(kind, qid))

    def discard(self, state: str, qid: str) -> bool:
        """Unlink an entry's envelope, not synced (the caller holds the entry's lock and syncs
        the directory; without its envelope the entry no longer exists). False if it is not
        in ``state``."""
        return remove_file(self.path(state, qid))

    def remove_files(self, qids: list[str]) -> None:
        """Unlink the message and history files of entries whose envelopes are gone (their
        removal synced first: a crash in between leaves orphaned files, never a half entry).
        One directory open for the lot."""
        for kind in ("messages", HISTORY):
            dfd = os.open(self.path(kind), os.O_RDONLY | os.O_DIRECTORY | _O_CLOEXEC)
            try:
                for qid in qids:
                    remove_file(queueid.check(qid), dfd)
            finally:
                os.close(dfd)

    def remove_orphan(self, state: str, qid: str) -> bool:
        """Delete an envelope whose message file is gone (nothing to lock), durably, and its
        history; False when the envelope was gone too."""
        if not self.discard(state, qid):
            return False
        fsync_dir(self.path(state))
        remove_file(self.path(HISTORY, qid))
        return True

    # -- attempt history (for mailq --explain) -------------------------------------------

    def add_history(self, qid: str, attempt: Attempt) -> None:
        """Append one delivery attempt to the entry's history (best effort, not synced:
        losing the last history line in a crash loses no mail)."""
        fd = os.open(self.path(HISTORY, qid),
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | _O_CLOEXEC, 0o600)
        try:
            write_all(fd, attempt.to_line())
        finally:
            os.close(fd)

    def history(self, qid: str) -> list[Attempt]:
        """The entry's recorded attempts, oldest first; malformed lines are skipped."""
        try:
            fd = os.open(self.path(HISTORY, qid), os.O_RDONLY | os.O_NOFOLLOW | _O_CLOEXEC)
        except FileNotFoundError:
            return []
        with os.fdopen(fd, "rb") as f:
            lines = f.read(64 * 1024 * 1024).split(b"\n")
        out = []
        for line in lines:
            try:
                out.append(Attempt.from_line(line))
            except (CorruptEnvelope, ValueError):
                continue
        return out

    def quarantine(self, qid: str, state: str) -> None:
        """Move a broken entry's files to corrupt/ (never delete them)."""
        for src, dst in ((self.path(state, qid), self.path(CORRUPT, qid)),
                         (self.path("messages", qid), self.path(CORRUPT, qid + ".msg")),
                         (self.path(HISTORY, qid), self.path(CORRUPT, qid + ".history"))):
            try:
                os.rename(src, dst)
            except FileNotFoundError:
                pass
        fsync_dir(self.path(CORRUPT))

    def quarantine_stray(self, state: str, name: str) -> bool:
        """Move a file of a state directory whose name is not an id to corrupt/, under a safe
        name (it never becomes a path of ours); False when it is gone."""
        safe = "".join(c if c.isascii() and c.isalnum() else "_" for c in name)[:64]
        try:
            os.rename(f"{self.root}/{state}/{name}",
                      f"{self.root}/{CORRUPT}/stray-{state}-{safe}-{time.time_ns()}")
        except FileNotFoundError:
            return False
        fsync_dir(self.path(CORRUPT))
        return True

    def purge(self, grace: float = 3600.0, now: float | None = None) -> list[str]:
        """Remove temp files, and message and history files no entry names, older than
        ``grace`` seconds (left by crashes); return their paths relative to the queue. An
        orphaned message file is removed under its lock: a submission in progress holds it."""
        now = time.time() if now is None else now
        cutoff = now - grace
        removed = []
        for name in self.names("tmp", ids_only=False):
            path = f"{self.root}/tmp/{name}"
            if _older(path, cutoff) and remove_file(path):
                removed.append(f"tmp/{name}")
        # The state directories read once (a listing per few hundred names) rather than an
        # lstat per message file: an entry listed there is no debris. One missing from it is
        # looked for again, under its lock, as before.
        listed = {qid for state in STATES for qid in self.names(state)}
        for kind in ("messages", HISTORY):
            for qid in self.names(kind):
                if qid in listed or self._listed(qid) or not _older(self.path(kind, qid),
                                                                    cutoff):
                    continue
                try:
                    fd = self.lock(qid) if kind == "messages" else -1
                except (EntryBusy, EntryNotFound):
                    continue
                try:
                    if not self._listed(qid) and remove_file(self.path(kind, qid)):
                        removed.append(f"{kind}/{qid}")
                finally:
                    if fd >= 0:
                        os.close(fd)
        return removed

    def _listed(self, qid: str) -> bool:
        try:
            self.find(qid)
        except EntryNotFound:
            return False
        return True


def _older(path: str, cutoff: float) -> bool:
    try:
        return os.lstat(path).st_mtime < cutoff
    except FileNotFoundError:
        return False
