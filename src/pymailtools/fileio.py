"""File primitives: write a whole buffer, fsync a directory, replace a file, read a secret."""

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


def replace_file(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` by a file holding ``data``, all or nothing and durable: written to a
    temporary name beside it, fsynced, renamed over it, the directory fsynced."""
    directory = os.path.dirname(path) or "."
    tmp = f"{path}.tmp{os.getpid()}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC
    try:
        fd = os.open(tmp, flags, mode)
    except FileExistsError:
        # left by a dead process of the same pid: reused, it would keep its own mode
        os.unlink(tmp)
        fd = os.open(tmp, flags, mode)
    try:
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(directory)


def not_private(st: os.stat_result) -> str:
    """Why a file with this status may not hold a secret, in a few words ("" when it may):
    it must be a regular file owned by root or by us that neither group nor others may use."""
    if st.st_mode & 0o170000 != 0o100000:  # S_ISREG without importing stat
        return "not a regular file"
    if st.st_uid not in (0, os.geteuid()):
        owners = "root" if os.geteuid() == 0 else f"root or uid {os.geteuid()}"
        return f"owned by uid {st.st_uid}, not by {owners}"
    if st.st_mode & 0o077:
        return f"mode {st.st_mode & 0o7777:04o} gives group or others access (chmod 600)"
    return ""


def read_private(path: str, limit: int) -> bytes:
    """The content of a file holding a secret (a key, a token store), at most ``limit`` bytes:
    ValueError says what ``not_private`` finds wrong with it; OSError when unreadable."""
    # O_NONBLOCK: a FIFO put in the key's place must not hang the caller
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _O_CLOEXEC)
    try:
        why = not_private(os.fstat(fd))
        if why:
            raise ValueError(why)
        data = b""
        while len(data) <= limit:
            chunk = os.read(fd, limit + 1 - len(data))
            if not chunk:
                return data
            data += chunk
        raise ValueError(f"larger than {limit} bytes")
    finally:
        os.close(fd)
