"""Appending to the queue's summary index: the line each envelope write adds (index.py).

Split from index.py, which reads, trusts and rebuilds the index: a submission needs only this
part. Cheap to import (sendmail's hot path): os and fcntl only.
"""

import errno
import fcntl
import os

from pymailtools.queue.envelope import quote
from pymailtools.queue.format import json_tail, mailq_tail

# On sendmail's hot path: no `from __future__ import annotations` (see intake.py)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from pymailtools.queue.envelope import Envelope

NAME = "summaries"
MAGIC = "pymailtools-summaries 2"
_US, _RS = "\x1f", "\x1e"  # unit separator (between the parts), record separator (newline)
STATES = ("incoming", "deferred", "hold")  # the entry states, in their index code order
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def path(root: str) -> str:
    return root + "/" + NAME


def file_mode(root: str) -> int:
    """The index's mode: readable by every user when the state directories are listable by
    every user (Queue.ensure makes them so when anyone may run mailq), else private."""
    try:
        public = os.stat(root + "/" + STATES[0]).st_mode & 0o004
    except OSError:
        public = 0
    return 0o644 if public else 0o600


def set_mode(root: str, public: bool) -> None:
    """Bring an existing index to the listing's mode (the queue's owner; best effort)."""
    try:
        fd = os.open(path(root), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _O_CLOEXEC)
    except OSError:
        return
    try:
        mode = 0o644 if public else 0o600
        if os.fstat(fd).st_mode & 0o7777 != mode:
            os.fchmod(fd, mode)
    except OSError:
        pass
    finally:
        os.close(fd)


def record(env: "Envelope", ino: int) -> bytes:
    """The index line for ``env`` stored in the file with inode ``ino``: the fields, then
    (after US) the entry's mailq text after its date, with RS for newline (printable() left
    no control character in it), then (after US) its postqueue -j object after queue_name."""
    parts = [str(ino), quote(env.id), repr(float(env.arrival)), str(int(env.size)),
             quote(env.sender), str(len(env.recipients))]
    for r in env.recipients:
        parts += (r.state, quote(r.address), quote(r.reason))
    pending = [(r.address, r.reason) for r in env.recipients if not r.done]
    return "".join((
        " ".join(parts), _US,
        mailq_tail(env.sender, pending).replace("\n", _RS), _US,
        json_tail(env.id, env.arrival, int(env.size), env.sender, pending), "\n",
    )).encode("utf-8", "surrogateescape")


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return f.read(64).strip().decode("ascii", "replace") or "-"
    except OSError:
        return "-"  # never matches: without a boot id a crash cannot be told apart


def header(root: str) -> bytes:
    st = os.stat(root)
    return f"{MAGIC} {_boot_id()} {st.st_dev} {st.st_ino}\n".encode()


def append(root: str, env: "Envelope", ino: int) -> None:
    """Add the line for an envelope file about to be published. Never raises: on any
    failure the index is removed, since a lost line could leave an older one looking current."""
    append_all(root, [(env, ino)])


def append_all(root: str, entries: "list[tuple[Envelope, int]]") -> None:
    """``append`` for several envelope files at once (the listener's group commit): one
    write of all their lines."""
    try:
        _append(root, b"".join([record(env, ino) for env, ino in entries]))
    except (OSError, UnicodeError):
        try:
            os.unlink(path(root))
        except OSError:
            pass


def _append(root: str, line: bytes) -> None:
    p = path(root)
    for _ in range(8):
        fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | _O_CLOEXEC,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            st = os.fstat(fd)
            try:
                current = os.stat(p).st_ino
            except FileNotFoundError:
                current = -1
            if st.st_ino != current:
                continue  # rebuilt or removed while we waited: append to the current one
            if st.st_size == 0:  # a new index: its mode follows the state directories'
                os.fchmod(fd, file_mode(root))
                data = header(root) + line
            else:
                data = line
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, "short write")
            return
        finally:
            os.close(fd)
    raise OSError(errno.EAGAIN, "index keeps changing")
