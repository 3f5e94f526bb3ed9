"""Postfix's "active" queue: which entries some process holds locked (is delivering) now."""

from __future__ import annotations

import fcntl
import os

from pymailtools.queue import ids as queueid
from pymailtools.queue.store import EntryBusy, EntryNotFound, Queue


def _proc_locks() -> list[tuple[int, int, int]] | None:
    """(major, minor, inode) of every flock held on the system, or None without /proc."""
    try:
        with open("/proc/locks", "rb") as f:
            text = f.read()
    except OSError:
        return None
    out = []
    for line in text.splitlines():
        p = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF"; waiters ("->") hold nothing.
        if len(p) >= 6 and p[1] == b"FLOCK":
            try:
                major, minor, ino = p[5].split(b":")
                out.append((int(major, 16), int(minor, 16), int(ino)))
            except ValueError:
                continue
    return out


def active_ids(queue: Queue) -> set[str] | None:
    """Ids of the entries some process holds locked (being delivered), in one pass.

    Probing every entry's lock costs three system calls per entry; instead read /proc/locks
    once and map the locked inodes back to names with one scan of messages/. A lock we take
    ourselves on messages/ proves that /proc/locks reports this file system's inodes as
    stat() does (overlay file systems may not); otherwise return None (probe per entry).
    """
    msgdir = queue.path("messages")
    try:
        dfd = os.open(msgdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except PermissionError:
        return set()  # an ordinary user's listing: messages/ is private, nothing shows active
    except OSError:
        return None
    try:
        try:
            fcntl.flock(dfd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return None
        st = os.fstat(dfd)
        locks = _proc_locks()
    finally:
        os.close(dfd)
    dev = (os.major(st.st_dev), os.minor(st.st_dev))
    if locks is None or (*dev, st.st_ino) not in locks:
        return None
    inodes = {ino for major, minor, ino in locks if (major, minor) == dev and ino != st.st_ino}
    if not inodes:
        return set()
    out = set()
    is_valid = queueid.is_valid
    with os.scandir(msgdir) as it:
        for e in it:
            if e.inode() in inodes and is_valid(e.name):
                out.add(e.name)
    return out


def probe_active(queue: Queue, qid: str) -> bool:
    """Is the entry locked by someone else? (One entry: a lock probe.)"""
    try:
        fd = queue.lock(qid)
    except EntryBusy:
        return True
    except (EntryNotFound, OSError):
        return False
    os.close(fd)
    return False


def is_active(queue: Queue, qid: str, locked: set[str] | None) -> bool:
    """Is the entry being delivered: looked up in ``active_ids``' answer, or probed when
    that answer is None."""
    if locked is None:
        return probe_active(queue, qid)
    return qid in locked
