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
Cheap to import (sendmail's hot path): os-level calls only.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import stat
import time

from pymailtools.errors import EX_CANTCREAT, EX_CONFIG, MailError, QueueWriteError
from pymailtools.fileio import fsync_dir, write_all
from pymailtools.queue import ids as queueid
from pymailtools.queue import index as qindex
from pymailtools.queue.envelope import (
    ENTRY_TRAILER,
    Attempt,
    CorruptEnvelope,
    Envelope,
    read_envelope,
    trailer,
)

TYPE_CHECKING = False  # typing costs ~10 ms of start-up on sendmail's hot path
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from typing import BinaryIO

    from _typeshed import WriteableBuffer

INCOMING = "incoming"
DEFERRED = "deferred"
HOLD = "hold"
CORRUPT = "corrupt"
STATES = (INCOMING, DEFERRED, HOLD)
MAILDROP = "maildrop"
MAILDROP_TRAILER = b"pymailtools-maildrop "
HISTORY = "history"
_DIR_MODES = {"tmp": 0o700, "messages": 0o700, HISTORY: 0o700, INCOMING: 0o700, DEFERRED: 0o700,
              HOLD: 0o700,
              CORRUPT: 0o700, MAILDROP: 0o1733}
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# Reading a file of the queue: never through a symlink, never hanging on a planted FIFO.
_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _O_CLOEXEC
_TEST_CRASH_AT = os.environ.get("PYMAILTOOLS_TEST_CRASH_AT", "")


def crash_point(name: str) -> None:
    """Test hook: die by SIGKILL at a named step when PYMAILTOOLS_TEST_CRASH_AT names it."""
    if _TEST_CRASH_AT == name:
        os.kill(os.getpid(), 9)


class QueueNotSetUp(MailError):
    """The queue (or its maildrop) does not exist yet and this user cannot create it: root
    must set it up once. 73, as for any queue file that cannot be created: never 75, which
    PHP's mail() takes for "queued" although nothing was."""

    exit_code = EX_CANTCREAT

    def __init__(self, root: str) -> None:
        super().__init__(f'queue {root} is not set up: run "sendmail -q" once as root')


class EntryBusy(MailError):
    """Another process holds the entry's lock (a runner delivering it, or postsuper)."""


class EntryNotFound(MailError):
    """No entry with that id exists in the queue."""


def _set_dir_mode(path: str, mode: int) -> None:
    """chmod a directory (never through a symlink) when its mode differs."""
    try:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) != mode:
            os.chmod(path, mode)
    except OSError:
        pass


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


class Submission:
    """A message being written into the queue; ``commit`` publishes it durably.

    Direct submissions (the caller can write the queue) are written as ``messages/ID``, locked
    while they are written, and published by a second name, ``incoming/ID``, for the same file:
    the message, its envelope and an ``ENTRY_TRAILER`` line. One file and one file fsync per
    message (the runner writes a plain envelope when the entry changes state). Others go to
    ``maildrop/ID`` as message + envelope + ``MAILDROP_TRAILER``.
    """

    def __init__(self, queue: Queue, maildrop: bool) -> None:
        self.queue = queue
        self.maildrop = maildrop
        self.id = queueid.new_id()
        self.size = 0
        self.published = ""
        if maildrop:
            self.path = os.path.join(queue.path(MAILDROP), f"{self.id}.{os.getpid()}.tmp")
        else:
            # Under its final name at once: with no state file naming it, it is not an entry
            # yet, and its lock keeps purges of orphaned message files away until commit.
            self.path = queue.path("messages", self.id)
        try:
            self.fd = os.open(self.path,
                              os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _O_CLOEXEC,
                              0o600)
        except OSError as e:
            raise QueueWriteError(f"cannot create queue file: {e.strerror}", EX_CANTCREAT) from None
        try:
            os.fchmod(self.fd, 0o600)  # umask-proof; the root pickup reads it anyway
            if not maildrop:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self.abort()
            raise QueueWriteError(f"cannot create queue file: {e.strerror}", EX_CANTCREAT) from None
        crash_point("after_open")

    def write(self, data: bytes) -> None:
        try:
            write_all(self.fd, data)
        except OSError as e:
            self.abort()
            raise QueueWriteError(f"cannot write queue file: {e.strerror}") from None
        self.size += len(data)

    def abort(self) -> None:
        """Remove what was written (a published name first), then let go of the file."""
        for p in (self.published, self.path):
            if p:
                try:
                    os.unlink(p)
                except OSError:
                    pass
        self.published = ""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def commit(self, env: Envelope) -> str:
        """Append the envelope, fsync, publish by a new name, fsync the directories; only then
        is the message queued."""
        env.id = self.id
        env.size = self.size
        try:
            body = env.to_bytes()
            mark = MAILDROP_TRAILER if self.maildrop else ENTRY_TRAILER
            write_all(self.fd, body + mark + f"{self.size} {len(body)}\n".encode())
            crash_point("before_fsync")
            os.fsync(self.fd)
            crash_point("before_rename")
            if self.maildrop:
                os.close(self.fd)
                self.fd = -1
                final = self.queue.path(MAILDROP, self.id)
                os.rename(self.path, final)
                self.path = final
                crash_point("before_dir_fsync")
                fsync_dir(self.queue.path(MAILDROP))
            else:
                # the message's own name is durable before a state file names it
                fsync_dir(self.queue.path("messages"))
                crash_point("before_envelope")
                # the index line goes first: once the entry is published, it must describe it
                qindex.append(self.queue.root, env, os.fstat(self.fd).st_ino)
                # Unlocked before it is published: a runner that found a new entry locked
                # would pass it by until its next run. A purge of orphaned message files
                # cannot take it meanwhile: the write above made it the newest file there.
                fcntl.flock(self.fd, fcntl.LOCK_UN)
                published = self.queue.path(INCOMING, self.id)
                os.link(self.path, published)
                self.published = published
                fsync_dir(self.queue.path(INCOMING))
                os.close(self.fd)
                self.fd = -1
            crash_point("after_commit")
        except OSError as e:
            self.abort()
            raise QueueWriteError(f"cannot queue message: {e.strerror}") from None
        return self.id


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
        data = os.pread(self.fd, min(len(b), max(self.size - self.pos, 0)), self.pos)
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


class Queue:
    """A queue directory tree."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._direct = False

    def path(self, *parts: str) -> str:
        """A path under the queue; every name after the directory must be a valid id."""
        for name in parts[1:]:
            queueid.check(name.removesuffix(".msg").removesuffix(".history"))
        # A plain join: the parts are fixed directory names and validated ids, never absolute,
        # and os.path.join showed up in the runner's per-message profile.
        return "/".join((self.root, *parts))

    # -- set-up ---------------------------------------------------------------------------

    def ensure(self, public: bool = True, *, repair: bool = False) -> None:
        """Create the tree with explicit modes (umask-proof); refuse a symlinked queue root.

        ``public``: every user may list the queue (authorized_mailq_users = static:anyone):
        the state directories are 0755 and the summary index 0644, so a listing shows ids,
        senders and recipients; messages, envelopes (0600) and histories stay private.
        ``repair``: also bring existing state directories and the index to those modes (the
        queue's owner, in queue runs; not on the submission path).
        Raises QueueNotSetUp when the queue is missing and its place belongs to someone else.
        """
        try:
            st = os.lstat(self.root)
        except FileNotFoundError:
            st = self._create_root()
        except OSError as e:
            raise QueueWriteError(f"{self.root}: {e.strerror}", EX_CANTCREAT) from None
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise MailError(f"queue directory {self.root} is not a directory (symlink?)",
                            EX_CONFIG)
        mine = st.st_uid == os.geteuid()
        for name, mode in _DIR_MODES.items():
            if public and name in STATES:
                mode = 0o755
            p = os.path.join(self.root, name)
            try:
                os.mkdir(p, mode)
            except FileExistsError:
                if repair and mine and name in STATES:
                    _set_dir_mode(p, mode)
                continue
            except PermissionError as e:
                if mine:
                    raise QueueWriteError(f"cannot create {p}: {e.strerror}",
                                          EX_CANTCREAT) from None
                continue
            except OSError as e:
                raise QueueWriteError(f"cannot create {p}: {e.strerror}", EX_CANTCREAT) from None
            os.chmod(p, mode)
        if repair and mine:
            qindex.set_mode(self.root, public)

    def _create_root(self) -> os.stat_result:
        """Create a missing queue root (and its parents). In a place owned by someone else
        (root's queue, not set up yet, and an ordinary user): QueueNotSetUp, nothing made."""
        try:
            self._make_parents(os.path.dirname(os.path.abspath(self.root)))
            try:
                os.mkdir(self.root, 0o755)
                os.chmod(self.root, 0o755)
            except FileExistsError:
                pass
            return os.lstat(self.root)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM) and not self._place_is_mine():
                raise QueueNotSetUp(self.root) from None
            raise QueueWriteError(f"cannot create the queue directory {self.root}: "
                                  f"{e.strerror}", EX_CANTCREAT) from None

    @staticmethod
    def _make_parents(path: str) -> None:
        """Create the missing directories above the queue root 0755 whatever the umask: a
        root with umask 077 must not leave users unable to reach the maildrop below."""
        missing = []
        while not os.path.isdir(path):
            missing.append(path)
            parent = os.path.dirname(path)
            if parent == path:
                break
            path = parent
        for p in reversed(missing):
            try:
                os.mkdir(p, 0o755)
            except FileExistsError:
                if os.path.isdir(p):
                    continue  # made meanwhile
                raise  # a file or a dangling link is in the way
            os.chmod(p, 0o755)

    def _place_is_mine(self) -> bool:
        """Is the nearest existing ancestor of the queue root ours (or are we root)?"""
        if os.geteuid() == 0:
            return True
        p = os.path.dirname(os.path.abspath(self.root))
        while True:
            try:
                return os.stat(p).st_uid == os.geteuid()
            except FileNotFoundError:
                if p == os.path.dirname(p):
                    return False
                p = os.path.dirname(p)
            except OSError:
                return False

    def prepare(self, public: bool = True) -> bool:
        """Before working on entries (a queue run, a flush, postsuper, the listener): set the
        tree up where this process may and bring the listing's modes to ``public``; then
        say whether this process can work on entries itself (``direct_access``)."""
        self.ensure(public, repair=True)
        return self.direct_access()

    def open_lock_file(self, name: str) -> int:
        """Open (creating it 0600) the lock file ``name`` at the queue's top: ``run.lock`` (one
        queue runner at a time), ``postsuper.lock`` (one bulk change at a time)."""
        return os.open(self.path(name), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | _O_CLOEXEC,
                       0o600)

    def direct_access(self) -> bool:
        """Can this process write entries itself (root or the queue's owner)? A yes is
        remembered (a long-running listener submits through one Queue); a no is asked again,
        as the tree may be created meanwhile."""
        if not self._direct:
            self._direct = os.access(self.path("messages"), os.W_OK | os.X_OK) and os.access(
                self.path(INCOMING), os.W_OK | os.X_OK)
        return self._direct

    def submission(self) -> Submission:
        if self.direct_access():
            return Submission(self, maildrop=False)
        if os.access(self.path(MAILDROP), os.W_OK | os.X_OK):
            return Submission(self, maildrop=True)
        try:
            os.lstat(self.path(MAILDROP))
        except FileNotFoundError:
            raise QueueNotSetUp(self.root) from None
        except OSError:
            pass
        raise QueueWriteError(f"cannot create queue file: no write access to {self.root}",
                              EX_CANTCREAT)

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
        env = Envelope.from_bytes(data)
        if env.id != qid:
            raise CorruptEnvelope(f"envelope names id {env.id!r}, file is {qid!r}")
        return where, env

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
        for kind in ("messages", HISTORY):
            for qid in self.names(kind):
                if self._listed(qid) or not _older(self.path(kind, qid), cutoff):
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
