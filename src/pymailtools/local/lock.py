"""Mailbox locking the Debian way: fcntl on the open mailbox first, then the dotlock PATH.lock."""

import errno
import fcntl
import os
import stat
import time

from pymailtools.config import Config
from pymailtools.errors import EX_TEMPFAIL, MailError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import TracebackType


class MailboxBusy(MailError):
    """Another program held the fcntl lock or the dotlock through every attempt (75)."""

    exit_code = EX_TEMPFAIL

    def __init__(self, path: str, holder: str) -> None:
        super().__init__(f"mailbox busy: {path}: {holder} held through all attempts")
        self.path = path
        self.holder = holder


class MailboxLock:
    """Hold an fcntl lock on ``fd`` and the dotlock ``path + ".lock"`` together.

    Both are taken without blocking and retried ``config.deliver_lock_attempts`` times; when the
    dotlock is busy the fcntl lock is dropped before sleeping, so a program that locks in the
    other order (Postfix: dotlock, then fcntl) can never deadlock with us (Debian Policy 11.6).
    ``owner`` is the (uid, gid) a root-created dotlock is given, so the mailbox owner's own mail
    reader may remove it. Note that fcntl locks belong to the process and vanish when *any*
    descriptor of the file is closed in it: keep ``fd`` as the only open descriptor.
    """

    def __init__(
        self, path: str, fd: int, config: Config, *, owner: tuple[int, int] | None = None
    ) -> None:
        self.path = path
        self.lock_path = path + ".lock"
        self.fd = fd
        self.attempts = max(1, config.deliver_lock_attempts)
        self.delay = config.deliver_lock_delay
        self.stale_after = config.stale_lock_time
        self.owner = owner
        self.dotlocked = False
        self.fcntl_locked = False
        # Set when an unprivileged caller could not create a dotlock and relies on fcntl alone.
        self.dotlock_skipped = False
        self._lock_fd: int | None = None
        self._lock_ino: tuple[int, int] | None = None

    def __enter__(self) -> "MailboxLock":
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: "TracebackType | None",
    ) -> None:
        self.release()

    def acquire(self) -> None:
        """Take both locks or raise MailboxBusy (OSError for real failures such as EROFS)."""
        holder = "fcntl lock"
        for attempt in range(self.attempts):
            if attempt:
                self._sleep()
            if not self._try_fcntl():
                holder = "fcntl lock"
                continue
            try:
                got = self._try_dotlock()
            except BaseException:
                self._unlock_fcntl()
                raise
            if got:
                return
            holder = f"dotlock {self.lock_path}"
            self._unlock_fcntl()
        raise MailboxBusy(self.path, holder)

    def release(self) -> None:
        """Drop the dotlock (only if it is still ours), then the fcntl lock. Idempotent.

        Never raises: it runs after the message is safely written, and an exception here would
        make the caller retry a delivery that already happened. A lock we fail to remove goes
        stale and is broken by the next deliverer.
        """
        if self.dotlocked:
            self.dotlocked = False
            try:
                st = os.lstat(self.lock_path)
                # Somebody may have judged our lock stale and replaced it: never remove theirs.
                if (st.st_dev, st.st_ino) == self._lock_ino:
                    os.unlink(self.lock_path)
            except OSError:
                pass
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
        self._unlock_fcntl()

    def refresh(self) -> None:
        """Touch the dotlock so a long delivery's lock is not taken for stale by others."""
        if self._lock_fd is not None:
            try:
                os.utime(self._lock_fd)
            except OSError:
                pass

    def _sleep(self) -> None:
        # Jitter keeps competing deliverers from retrying in lock step; with a delay of 0
        # (tests, busy servers) still yield a few milliseconds so the holder can finish.
        import random  # only when the lock is busy: mail opening a folder does without it

        if self.delay:
            time.sleep(self.delay * random.uniform(1.0, 1.2))
        else:
            time.sleep(random.uniform(0.001, 0.005))

    def _try_fcntl(self) -> bool:
        # A read-only descriptor can only hold a shared lock; writers always open for writing.
        writable = fcntl.fcntl(self.fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY
        kind = fcntl.LOCK_EX if writable else fcntl.LOCK_SH
        try:
            fcntl.lockf(self.fd, kind | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        self.fcntl_locked = True
        return True

    def _unlock_fcntl(self) -> None:
        if self.fcntl_locked:
            self.fcntl_locked = False
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_UN)
            except OSError:
                pass  # closing the descriptor releases it anyway

    def _try_dotlock(self) -> bool:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            try:
                fd = os.open(self.lock_path, flags, 0o600)
            except FileExistsError:
                if not self._remove_if_stale():
                    return False
                fd = os.open(self.lock_path, flags, 0o600)
        except FileExistsError:
            return False
        except PermissionError:
            # Like Python's mailbox and non-setgid MUAs: an ordinary user cannot create locks in
            # the 2775 root:mail spool, so fcntl alone must do. Root never silently skips.
            if os.geteuid() == 0:
                raise
            self.dotlock_skipped = True
            return True
        try:
            if self.owner is not None and os.geteuid() == 0:
                os.fchown(fd, *self.owner)
            # liblockfile convention: the holder's PID, so people can see who holds it.
            os.write(fd, f"{os.getpid()}\n".encode())
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            os.unlink(self.lock_path)
            raise
        self._lock_fd = fd
        self._lock_ino = (st.st_dev, st.st_ino)
        self.dotlocked = True
        return True

    def _remove_if_stale(self) -> bool:
        """Break a dotlock whose holder is gone: its mtime is older than stale_lock_time, or
        it names (liblockfile's L_PID convention) a process that no longer exists here.

        Never followed: a symlink (or anything else odd) is only ever unlinked itself, and only
        once it is old, so a planted link to /etc/passwd achieves nothing. mtime rather than
        ctime because holders refresh it with utime (liblockfile touchlock). A lock without a
        readable PID (Postfix, mutt and s-nail leave theirs empty) waits for the age rule, and
        so does one whose PID is alive, even if that PID was reused by an unrelated process.
        """
        try:
            st = os.lstat(self.lock_path)
        except FileNotFoundError:
            return True
        if stat.S_ISDIR(st.st_mode):
            return False
        if time.time() - st.st_mtime <= self.stale_after:
            pid = _lock_pid(self.lock_path, st)
            if pid is None or not _process_gone(pid):
                return False
        try:
            # Remove only the very lock we judged: another breaker may have replaced it by a
            # live one meanwhile (a new file differs in inode or change time, even if the inode
            # number is reused). Our own deliverers hold the mailbox's fcntl lock while they
            # look, so the race left is with programs that take the dotlock first.
            again = os.lstat(self.lock_path)
            if _identity(again) != _identity(st):
                return False
            os.unlink(self.lock_path)
        except FileNotFoundError:
            pass
        return True


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


# No PID is larger on Linux (PID_MAX_LIMIT, 2**22); a bigger number is not a PID lock.
_PID_MAX = 1 << 22


def _lock_pid(path: str, st: os.stat_result) -> int | None:
    """The PID a dotlock holds, read as liblockfile does: leading blanks, then decimal digits,
    whatever follows ignored. None for anything else: empty (a lock just created and not yet
    written, or one of the many programs that write nothing), not a regular file, unreadable,
    replaced since ``st``, or no number from 1 to the largest possible PID."""
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
        return None
    try:
        # O_NONBLOCK: a FIFO planted in its place must never make us hang.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
                     | os.O_NOCTTY)
    except OSError:
        return None
    try:
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(fst.st_mode):
            return None
        data = os.read(fd, 32)
    except OSError:
        return None
    finally:
        os.close(fd)
    text = data.lstrip(b" \t\n")
    digits = len(text) - len(text.lstrip(b"0123456789"))
    if not digits or digits > 8:
        return None
    pid = int(text[:digits])
    return pid if 0 < pid < _PID_MAX else None


def _process_gone(pid: int) -> bool:
    """True only when no process ``pid`` exists on this host (kill(pid, 0) gives ESRCH); a
    process of another user (EPERM) is alive, and so is a zombie not yet reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False
