"""Group commit for a queue run: consecutive deliveries into one mbox share its locks and one
fsync, and consecutive deliveries into one Maildir its open directories and one fsync of new/.

The queue runner removes (or rewrites) the queue entries of a group only after ``sync``: a
crash before it delivers the group's messages again at the next run (a duplicate, as after any
crash between a delivery and its queue update), never loses one. Each message is still all or
nothing: a failed append truncates the mailbox back to the end of the message before it.
"""

import os
import time
from collections.abc import Callable
from typing import BinaryIO

from pymailtools.config import Config
from pymailtools.errors import DeliveryError
from pymailtools.local import mbox
from pymailtools.local.lock import MailboxLock
from pymailtools.queue.store import crash_point

# Bounds on one mbox group. A mail reader wanting the mailbox (Dovecot, mutt, mail) waits for
# our dotlock; Postfix's local(8) and liblockfile retry about once a second, so the lock is
# held at most about half a second, or 32 messages, or 4 MB of writing, whichever comes first
# (a 1 KB message costs well under a millisecond without its fsync). The message count also
# bounds what one failed fsync sends back to the queue.
GROUP_MESSAGES = 32
GROUP_BYTES = 4 << 20
GROUP_SECONDS = 0.5
# Maildirs kept open (four descriptors each) and waiting for the fsync of new/.
GROUP_DIRECTORIES = 64

# Runs a function with the ids the held mailbox was opened with (pipe.call_as): its dotlock is
# removed as that user, as it was created.
Wrap = Callable[[Callable[[], bytes]], bytes]


class _Held:
    """The one mbox a group keeps open and locked."""

    def __init__(self, path: str, fd: int, lock: MailboxLock, uid: int,
                 wrap: Wrap | None) -> None:
        self.path = path
        self.fd = fd
        self.lock = lock
        self.uid = uid
        self.wrap = wrap
        self.start = os.fstat(fd).st_size  # where a failed group fsync truncates back to
        self.count = 0
        self.bytes = 0
        self.since = time.monotonic()


class Group:
    """The mailbox locks and fsyncs shared by consecutive local deliveries of a queue run.

    ``failure`` is set when an fsync of a held mailbox failed (its group was truncated away):
    the caller then treats every delivery since its last ``sync`` as not done.
    """

    def __init__(self) -> None:
        self._held: _Held | None = None
        self._maildirs: dict[tuple[str, int], list[int]] = {}
        self.failure: DeliveryError | None = None

    @property
    def pending(self) -> bool:
        """Writes (or a held lock) waiting for ``sync``."""
        return self._held is not None or bool(self._maildirs)

    def full(self) -> bool:
        """The held mailbox's group has reached a bound: sync it before the next delivery."""
        h = self._held
        return h is not None and (h.count >= GROUP_MESSAGES or h.bytes >= GROUP_BYTES
                                  or time.monotonic() - h.since >= GROUP_SECONDS)

    def prepare(self, path: str | None, uid: int) -> None:
        """Before a delivery into ``path`` as ``uid`` (None: anything but a held mbox, such as
        a command that may lock it itself): sync and release the held mailbox unless it is
        that one and its group has room. Call it with root's ids, outside pipe.call_as."""
        h = self._held
        if h is not None and (h.path != path or h.uid != uid or self.full()):
            self._sync_held()

    def append(self, path: str, message: BinaryIO, *, sender: str, recipient: str, uid: int,
               gid: int, config: Config, busy: dict[str, str] | None,
               wrap: Wrap | None = None) -> None:
        """mbox.append into ``path``, keeping it locked for the next messages and leaving the
        fsync to ``sync``. With ``wrap`` (we run as the user, inside ``wrap``) the caller has
        called ``prepare`` already."""
        if wrap is None:
            self.prepare(path, uid)
        h = self._held
        if h is not None and (h.path != path or h.uid != uid):
            raise AssertionError(f"group holds {h.path}, asked for {path}")
        if h is None:
            mbox.check_envelope(sender, recipient)
            fd, lock = mbox.open_locked(path, uid=uid, gid=gid, config=config,
                                        check_owner=True, create=True, busy=busy)
            try:
                h = _Held(path, fd, lock, uid, wrap)
            except BaseException:
                lock.release()
                os.close(fd)
                raise
            self._held = h
        added = mbox.append_unsynced(h.fd, h.lock, message, sender=sender,
                                     recipient=recipient, path=path)
        h.count += 1
        h.bytes += added

    def maildir(self, top: str, uid: int) -> list[int] | None:
        """The open directories (top, tmp, new, cur) of the Maildir ``top`` as ``uid`` opened
        them earlier in the group, or None."""
        return self._maildirs.get((top, uid))

    def keep_maildir(self, top: str, uid: int, fds: list[int]) -> None:
        """Keep a Maildir's open directories (top, tmp, new, cur) for the group's next
        messages to it; they are closed, new/ fsynced first, at ``sync``."""
        if len(self._maildirs) >= GROUP_DIRECTORIES:
            self._sync_dirs()
        self._maildirs[(top, uid)] = fds

    def sync(self) -> None:
        """Make every write of the group durable and release the held mailbox."""
        if self.pending:
            # Test hook (PYMAILTOOLS_TEST_CRASH_AT): die with the group written, not synced.
            crash_point("group_before_sync")
        if self._held is not None:
            self._sync_held()
        self._sync_dirs()

    def _sync_dirs(self) -> None:
        maildirs, self._maildirs = self._maildirs, {}
        for fds in maildirs.values():
            try:
                # Ignored as a single Maildir delivery ignores it: the messages are in new/.
                os.fsync(fds[2])
            except OSError:
                pass
            finally:
                for fd in fds:
                    os.close(fd)

    def _sync_held(self) -> None:
        h, self._held = self._held, None
        if h is None:
            return
        try:
            if h.count:
                try:
                    os.fsync(h.fd)
                except OSError as e:
                    # Written but maybe not stored: take the group back out (as a failed
                    # append would), and let the caller retry its messages.
                    mbox.truncate(h.fd, h.start)
                    self.failure = mbox.os_error(f"cannot write mailbox {h.path}", e)
        finally:
            if h.wrap is not None:
                try:
                    h.wrap(_releaser(h.lock))
                except (OSError, DeliveryError):
                    pass
            h.lock.release()  # idempotent; the fcntl lock and descriptors in any case
            os.close(h.fd)


def _releaser(lock: MailboxLock) -> Callable[[], bytes]:
    def release() -> bytes:
        lock.release()
        return b""

    return release
