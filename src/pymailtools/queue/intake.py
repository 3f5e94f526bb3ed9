"""A queue's tree (layout, set-up, access, runner lock) and a new entry written into it durably.

The part of the queue a submission needs, split from store.py (every other operation on
entries, built on ``QueueDir``), so that sendmail's hot path loads only this: os-level calls,
the envelope and the summary index's appender. The layout is described in store.py.
"""

import errno
import fcntl
import os
import stat

from pymailtools.errors import EX_CANTCREAT, EX_CONFIG, MailError, QueueWriteError
from pymailtools.fileio import fsync_dir, write_all
from pymailtools.queue import ids as queueid
from pymailtools.queue import summaries
from pymailtools.queue.envelope import ENTRY_TRAILER

# On sendmail's hot path: no typing (~10 ms of start-up) and no `from __future__ import
# annotations` (importing __future__ costs more than evaluating these annotations); the
# names imported for the type checker alone are quoted where they annotate.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from pymailtools.queue.envelope import Envelope

INCOMING = "incoming"
DEFERRED = "deferred"
HOLD = "hold"
CORRUPT = "corrupt"
STATES = (INCOMING, DEFERRED, HOLD)
MAILDROP = "maildrop"
MAILDROP_TRAILER = b"pymailtools-maildrop "
HISTORY = "history"
RUN_LOCK = "run.lock"
_DIR_MODES = {"tmp": 0o700, "messages": 0o700, HISTORY: 0o700, INCOMING: 0o700, DEFERRED: 0o700,
              HOLD: 0o700,
              CORRUPT: 0o700, MAILDROP: 0o1733}
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
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


def _set_dir_mode(path: str, mode: int) -> None:
    """chmod a directory (never through a symlink) when its mode differs."""
    try:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) != mode:
            os.chmod(path, mode)
    except OSError:
        pass


class Submission:
    """A message being written into the queue; ``commit`` publishes it durably.

    Direct submissions (the caller can write the queue) are written as ``messages/ID``, locked
    while they are written, and published by a second name, ``incoming/ID``, for the same file:
    the message, its envelope and an ``ENTRY_TRAILER`` line. One file and one file fsync per
    message (the runner writes a plain envelope when the entry changes state). Others go to
    ``maildrop/ID`` as message + envelope + ``MAILDROP_TRAILER``.
    """

    def __init__(self, queue: "QueueDir", maildrop: bool) -> None:
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

    def commit(self, env: "Envelope") -> str:
        """Append the envelope, fsync, publish by a new name, fsync the directories; only then
        is the message queued."""
        try:
            self.seal(env)
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
                summaries.append(self.queue.root, env, os.fstat(self.fd).st_ino)
                self.publish()
                fsync_dir(self.queue.path(INCOMING))
                os.close(self.fd)
                self.fd = -1
            crash_point("after_commit")
        except OSError as e:
            self.abort()
            raise QueueWriteError(f"cannot queue message: {e.strerror}") from None
        return self.id

    def seal(self, env: "Envelope") -> None:
        """Append the envelope and the trailer and fsync the file: the first step of a commit."""
        env.id = self.id
        env.size = self.size
        body = env.to_bytes()
        mark = MAILDROP_TRAILER if self.maildrop else ENTRY_TRAILER
        write_all(self.fd, body + mark + f"{self.size} {len(body)}\n".encode())
        crash_point("before_fsync")
        os.fsync(self.fd)
        crash_point("before_rename")

    def publish(self) -> None:
        """Give a sealed direct submission, whose name in messages/ is durable and whose index
        line is written, its name in incoming/ (durable once incoming/ is fsynced)."""
        # Unlocked before it is published: a runner that found a new entry locked would pass
        # it by until its next run. A purge of orphaned message files cannot take it
        # meanwhile: the seal's write made it the newest file there.
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        published = self.queue.path(INCOMING, self.id)
        os.link(self.path, published)
        self.published = published


def commit_group(queue: "QueueDir", group: "list[tuple[Submission, Envelope]]") \
        -> "list[Exception | None]":
    """Commit direct submissions into ``queue`` together, as ``Submission.commit`` does each,
    in the same order of steps: every file sealed (fsynced), then one fsync of messages/ for
    all of them, their index lines, their names in incoming/, and one fsync of incoming/.
    Returns, in ``group``'s order, None for each message now queued and the error for each
    that is not (aborted, nothing of it left: a QueueWriteError for a failing system call); a
    failing directory fsync fails every message that was waiting for it."""
    errors: list[Exception | None] = [None] * len(group)
    live: list[int] = []
    for i, (sub, env) in enumerate(group):
        try:
            sub.seal(env)
            live.append(i)
        except OSError as e:
            sub.abort()
            errors[i] = QueueWriteError(f"cannot queue message: {e.strerror}")
        except Exception as e:  # (an envelope that cannot be written): this message only
            sub.abort()
            errors[i] = e
    try:
        if live:
            # the messages' own names are durable before a state file names them
            fsync_dir(queue.path("messages"))
            crash_point("before_envelope")
            # the index lines go first: once an entry is published, it must describe it
            summaries.append_all(queue.root, [(group[i][1], os.fstat(group[i][0].fd).st_ino)
                                              for i in live])
            published = []
            for i in live:
                try:
                    group[i][0].publish()
                    published.append(i)
                except OSError as e:
                    group[i][0].abort()
                    errors[i] = QueueWriteError(f"cannot queue message: {e.strerror}")
            live = published
            crash_point("before_dir_fsync")
            if live:
                fsync_dir(queue.path(INCOMING))
    except OSError as e:
        for i in live:
            group[i][0].abort()
            errors[i] = QueueWriteError(f"cannot queue message: {e.strerror}")
        return errors
    for i in live:
        os.close(group[i][0].fd)
        group[i][0].fd = -1
    crash_point("after_commit")
    return errors


class QueueDir:
    """A queue directory tree: its paths, its set-up, and new entries (``Queue`` in store.py
    adds everything else done to entries)."""

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
            summaries.set_mode(self.root, public)

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

    def try_run_lock(self) -> int | None:
        """Take the runner lock (``run.lock``) without waiting: its descriptor, which holds
        the lock until every copy of it is closed, or None while another process holds it.
        Here rather than in qmgr: a submission that wakes the runner loads no module more."""
        fd = self.open_lock_file(RUN_LOCK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError:  # ENOLCK and the like: the caller decides, the descriptor is not theirs
            os.close(fd)
            raise
        return fd

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
