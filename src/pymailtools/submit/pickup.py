"""Maildrop pickup: move ordinary users' submissions into the queue, treating them as hostile.

A maildrop file is the message, then its envelope, then a trailer line
``pymailtools-maildrop <message length> <envelope length>``. It is opened without following
symlinks and without blocking; anything that is not a regular, single-link, bounded file with a
consistent trailer goes to corrupt/. The submitter's identity is the file's owner, never what the
file says.
"""

import os
import pwd
import stat
import time
from typing import NamedTuple

from pymailtools import address
from pymailtools import log as logline
from pymailtools.config import Config
from pymailtools.log import Logger
from pymailtools.queue import ids as queueid
from pymailtools.queue.envelope import CorruptEnvelope, Envelope, trailer
from pymailtools.queue.store import (
    CORRUPT,
    MAILDROP,
    MAILDROP_TRAILER,
    Queue,
    Submission,
    fsync_dir,
)

ENVELOPE_LIMIT = 64 * 1024 * 1024  # 10,000 recipients of 320 characters fit with room to spare
STALE_TEMP = 86400.0


class Dropped(NamedTuple):
    envelope: Envelope
    message_size: int
    owner: int


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
    except address.AddressError as e:
        raise CorruptEnvelope(str(e)) from None
    return Dropped(env, msg_len, st.st_uid)


def _quarantine(queue: Queue, name: str) -> None:
    os.rename(os.path.join(queue.root, MAILDROP, name),
              os.path.join(queue.root, CORRUPT, f"maildrop-{name}"))
    fsync_dir(os.path.join(queue.root, CORRUPT))


def pickup(queue: Queue, cfg: Config, log: Logger) -> int:
    """Move every complete maildrop file into the queue; return how many were taken."""
    drop = os.path.join(queue.root, MAILDROP)
    try:
        names = os.listdir(drop)
    except OSError:
        return 0
    taken = 0
    now = time.time()
    for name in names:
        path = os.path.join(drop, name)
        if not queueid.is_valid(name):
            # A submission still being written (ID.PID.tmp), or debris from one that died.
            try:
                if now - os.lstat(path).st_mtime > STALE_TEMP:
                    os.unlink(path)
            except OSError:
                pass
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        except OSError as e:
            log.warning(f"maildrop/{name}: refused ({e.strerror}); moved to corrupt/")
            _quarantine(queue, name)
            continue
        try:
            try:
                dropped = read(fd, cfg.message_size_limit)
            except (CorruptEnvelope, OSError, UnicodeError) as e:
                log.warning(f"maildrop/{name}: refused ({e}); moved to corrupt/")
                _quarantine(queue, name)
                continue
            qid = _requeue(queue, fd, dropped)
        finally:
            os.close(fd)
        os.unlink(path)
        fsync_dir(drop)
        log.info(logline.pickup(qid, dropped.owner, dropped.envelope.sender))
        taken += 1
    return taken


def _requeue(queue: Queue, fd: int, dropped: Dropped) -> str:
    env = dropped.envelope
    env.uid = dropped.owner
    try:
        env.user = pwd.getpwuid(dropped.owner).pw_name
    except KeyError:
        env.user = str(dropped.owner)
    env.origin = MAILDROP
    sub = Submission(queue, maildrop=False)
    offset = 0
    try:
        while offset < dropped.message_size:
            chunk = os.pread(fd, min(1 << 20, dropped.message_size - offset), offset)
            if not chunk:
                raise CorruptEnvelope("file shrank while being read")
            sub.write(chunk)
            offset += len(chunk)
    except BaseException:
        sub.abort()
        raise
    return sub.commit(env)
