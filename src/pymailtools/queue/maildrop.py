"""The maildrop: reading and validating the files ordinary users submit (Submission writes them).

A maildrop file is the message, then its envelope, then a trailer line
``pymailtools-maildrop <message length> <envelope length>``, under its id once complete
(``ID.PID.tmp`` while being written). It is opened without following symlinks and without
blocking; anything that is not a regular, single-link, bounded file with a consistent trailer
and valid addresses is refused. The submitter is the file's owner, never what the file says.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from typing import NamedTuple

from pymailtools import address
from pymailtools.errors import AddressError
from pymailtools.fileio import fsync_dir
from pymailtools.queue import ids as queueid
from pymailtools.queue.envelope import CorruptEnvelope, Envelope, trailer
from pymailtools.queue.store import (
    CORRUPT,
    MAILDROP,
    MAILDROP_TRAILER,
    Queue,
    remove_file,
)

ENVELOPE_LIMIT = 64 * 1024 * 1024  # 10,000 recipients of 320 characters fit with room to spare
STALE_TEMP = 86400.0  # a submission still being written after a day died
_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class Dropped(NamedTuple):
    envelope: Envelope
    message_size: int
    owner: int


def names(queue: Queue) -> Iterator[str]:
    """Ids of the complete maildrop files, in directory order (none for ordinary users)."""
    return queue.names(MAILDROP)


def hidden(queue: Queue) -> bool:
    """Whether the maildrop exists but this user cannot list it (mode 1733: an ordinary
    user drops files in, only root sees them until its queue run takes them over), so a
    listing leaves those messages out; False when it can, or when there is no maildrop."""
    try:
        os.close(os.open(queue.path(MAILDROP), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
    except PermissionError:
        return True
    except OSError:
        return False  # no maildrop (a queue not set up): nothing left out
    return False


def open_file(queue: Queue, name: str) -> int:
    """Open a complete maildrop file for reading (OSError when refused or gone)."""
    return os.open(queue.path(MAILDROP, name), _O_READ)


def read(fd: int, max_message: int) -> Dropped:
    """Validate an open maildrop file; raise CorruptEnvelope saying why it is refused."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise CorruptEnvelope("not a regular file")
    if st.st_nlink != 1:
        raise CorruptEnvelope(f"file has {st.st_nlink} hard links")
    if st.st_size > max_message + ENVELOPE_LIMIT:
        raise CorruptEnvelope(f"file too large ({st.st_size} bytes)")
    msg_len, env_len = trailer(fd, st.st_size, MAILDROP_TRAILER)
    if msg_len > max_message > 0 or env_len > ENVELOPE_LIMIT:
        raise CorruptEnvelope("message too large")
    env = Envelope.from_bytes(os.pread(fd, env_len, msg_len))
    try:
        env.sender = address.check_envelope(env.sender, "sender") if env.sender else ""
        for r in env.recipients:
            address.check_envelope(r.address, "recipient")
    except AddressError as e:
        raise CorruptEnvelope(str(e)) from None
    return Dropped(env, msg_len, st.st_uid)


def load(queue: Queue, name: str, max_message: int) -> Envelope:
    """The validated envelope of a maildrop file, its id being the file's name (the
    provisional id Postfix shows too). OSError or CorruptEnvelope when it cannot be read."""
    fd = open_file(queue, name)
    try:
        env = read(fd, max_message).envelope
    finally:
        os.close(fd)
    env.id = name
    return env


def remove(queue: Queue, name: str) -> None:
    """Delete a maildrop file once its message is in the queue, durably."""
    os.unlink(queue.path(MAILDROP, name))
    fsync_dir(queue.path(MAILDROP))


def quarantine(queue: Queue, name: str) -> None:
    """Move a refused maildrop file to corrupt/ (kept, never deleted)."""
    os.rename(queue.path(MAILDROP, name), f"{queue.root}/{CORRUPT}/maildrop-{name}")
    fsync_dir(queue.path(CORRUPT))


def purge(queue: Queue, age: float = STALE_TEMP, now: float | None = None) -> list[str]:
    """Remove submissions that died while being written (not named by an id) older than
    ``age`` seconds; return their paths relative to the queue."""
    cutoff = (time.time() if now is None else now) - age
    removed = []
    for name in queue.names(MAILDROP, ids_only=False):
        if queueid.is_valid(name):
            continue
        path = f"{queue.root}/{MAILDROP}/{name}"
        try:
            if os.lstat(path).st_mtime < cutoff and remove_file(path):
                removed.append(f"{MAILDROP}/{name}")
        except OSError:
            pass
    return removed
