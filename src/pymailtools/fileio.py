"""Durable file writes: write a whole buffer to a descriptor, fsync a directory."""

# On sendmail's submission path (the queue writes through it): os-level imports only.
import errno
import os

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def write_all(fd: int, data: bytes | bytearray | memoryview, offset: int | None = None) -> None:
    """Write all of ``data`` to ``fd``: at the file position (``os.write``), or from ``offset``
    on (``os.pwrite``). A short write is continued; a write that takes nothing raises ENOSPC
    rather than loop for ever."""
    with memoryview(data) as view:
        done = 0
        while done < len(view):
            if offset is None:
                n = os.write(fd, view[done:])
            else:
                n = os.pwrite(fd, view[done:], offset + done)
            if n <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            done += n


def fsync_dir(path: str) -> None:
    """Make the renames, links and unlinks done in directory ``path`` durable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _O_CLOEXEC)
    except PermissionError:
        # An ordinary user cannot open the maildrop (mode 1733) to fsync it; sync(2) is the
        # only way left to make the rename durable before we report success.
        os.sync()
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
