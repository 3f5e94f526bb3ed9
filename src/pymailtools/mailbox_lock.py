"""Mailbox locking the Debian way: fcntl on the open mailbox first, then the dotlock PATH.lock."""

import errno
import fcntl
import os
import random
import stat
import time
from types import TracebackType

from pymailtools.config import Config
from pymailtools.errors import EX_TEMPFAIL, MailError


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
        tb: TracebackType | None,
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
        """Break a dotlock whose mtime is older than stale_lock_time.

        Never opened or followed: a symlink (or anything else odd) is only ever unlinked
        itself, and only once it is stale, so a planted link to /etc/passwd achieves nothing.
        mtime rather than ctime because holders refresh it with utime (liblockfile touchlock).
        """
        try:
            st = os.lstat(self.lock_path)
        except FileNotFoundError:
            return True
        if stat.S_ISDIR(st.st_mode) or time.time() - st.st_mtime <= self.stale_after:
            return False
        try:
            # Narrow the race with another breaker: remove only the lock we judged stale.
            again = os.lstat(self.lock_path)
            if (again.st_ino, again.st_mtime_ns) != (st.st_ino, st.st_mtime_ns):
                return False
            os.unlink(self.lock_path)
        except FileNotFoundError:
            pass
        return True
