"""Deliver one message into a Maildir: write in tmp/, fsync, link into new/, never overwrite."""

import errno
import itertools
import os
import stat
import time
from typing import TYPE_CHECKING, BinaryIO

from pymailtools.config import Config
from pymailtools.errors import DeliveryError
from pymailtools.fileio import write_all
from pymailtools.local.mbox import BLOCK, check_envelope, os_error

if TYPE_CHECKING:
    from pymailtools.local.group import Group

SUBDIRS = ("tmp", "new", "cur")
NAME_ATTEMPTS = 5

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_counter = itertools.count(1)


def deliver(
    directory: str,
    message: BinaryIO,
    *,
    sender: str,
    recipient: str,
    uid: int,
    gid: int,
    config: Config,
    group: "Group | None" = None,
) -> None:
    """Deliver ``message`` to the Maildir ``directory`` (created with tmp/new/cur if missing).

    Every directory is opened once without following symlinks and used through its descriptor,
    so swapping ``new/`` for a symlink after the checks changes nothing. Raises DeliveryError
    (4.x.x) on any refusal or failure, leaving no file behind in tmp/ or new/. With ``group``
    the directories stay open in it for the group's next messages to the same Maildir, and the
    fsync of new/ is left to it (one for all of them).
    """
    check_envelope(sender, recipient)
    top = directory.rstrip("/") or "/"
    held = group.maildir(top, uid) if group is not None else None
    if held is not None:
        _deliver(held[1], held[2], message, sender, recipient, uid, gid, config, top)
        return
    fds: list[int] = []
    try:
        top_fd = _open_dir(top, None, uid, gid, "maildir")
        fds.append(top_fd)
        for sub in SUBDIRS:
            fds.append(_open_dir(sub, top_fd, uid, gid, f"maildir {sub}/"))
        if group is not None:
            group.keep_maildir(top, uid, fds)  # the group closes them from now on
            fds = []
            held = group.maildir(top, uid)
            assert held is not None
            _deliver(held[1], held[2], message, sender, recipient, uid, gid, config, top)
            return
        _deliver(fds[1], fds[2], message, sender, recipient, uid, gid, config, top)
        try:
            os.fsync(fds[2])
        except OSError:
            pass  # delivered: the message is in new/ either way
    finally:
        for fd in fds:
            os.close(fd)


def _open_dir(name: str, dir_fd: int | None, uid: int, gid: int, what: str) -> int:
    """Open (creating: owner ``uid``, 0700) a directory that must be ``uid``'s and no symlink."""
    created = False
    try:
        os.mkdir(name, 0o700, dir_fd=dir_fd)
        created = True
    except FileExistsError:
        pass
    except OSError as e:
        raise os_error(f"cannot create {what}", e) from None
    try:
        st = os.lstat(name, dir_fd=dir_fd)
        if stat.S_ISLNK(st.st_mode):
            raise DeliveryError(f"{what} is a symbolic link", "4.2.0")
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except DeliveryError:
        raise
    except NotADirectoryError:
        raise DeliveryError(f"{what} is not a directory", "4.2.0") from None
    except OSError as e:
        if e.errno == errno.ELOOP:  # replaced by a symlink between lstat and open
            raise DeliveryError(f"{what} is a symbolic link", "4.2.0") from None
        raise os_error(f"cannot open {what}", e) from None
    try:
        if created:
            # On the descriptor, never the path: the name may be a symlink by now.
            if os.geteuid() == 0:
                os.fchown(fd, uid, gid)
            os.fchmod(fd, 0o700)
        if os.fstat(fd).st_uid != uid:
            raise DeliveryError(f"{what} not owned by recipient", "4.2.0")
    except OSError as e:
        os.close(fd)
        raise os_error(f"cannot set up {what}", e) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def unique_name(hostname: str) -> str:
    """``time.M<usec>P<pid>Q<counter>.<host>``, with / and : in the host escaped (Maildir spec)."""
    now = time.time()
    host = hostname.replace("/", "\\057").replace(":", "\\072")
    usec = int((now % 1) * 1_000_000)
    return f"{int(now)}.M{usec}P{os.getpid()}Q{next(_counter)}.{host}"


def _deliver(
    tmp_fd: int,
    new_fd: int,
    message: BinaryIO,
    sender: str,
    recipient: str,
    uid: int,
    gid: int,
    config: Config,
    top: str,
) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(NAME_ATTEMPTS):
        name = unique_name(config.myhostname)
        try:
            fd = os.open(name, flags, 0o600, dir_fd=tmp_fd)
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise os_error(f"cannot create file in {top}/tmp", e) from None
    else:
        raise DeliveryError(f"cannot find a unique file name in {top}/tmp", "4.3.0")
    try:
        try:
            if os.geteuid() == 0:
                os.fchown(fd, uid, gid)
            os.fchmod(fd, 0o600)
            head = f"Return-Path: <{sender}>\nDelivered-To: {recipient}\n"
            _rewind(message)
            block = _read(message)
            # One write for the head lines and the first block (all of a small message).
            write_all(fd, head.encode("utf-8", "surrogateescape") + block)
            while block and (block := _read(message)):
                write_all(fd, block)
            os.fsync(fd)
        finally:
            os.close(fd)
        # link() fails rather than replace an existing file, unlike rename().
        os.link(name, name, src_dir_fd=tmp_fd, dst_dir_fd=new_fd, follow_symlinks=False)
    except BaseException as e:
        try:
            os.unlink(name, dir_fd=tmp_fd)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise os_error(f"cannot write to {top}", e) from e
        if isinstance(e, Exception) and not isinstance(e, DeliveryError):
            raise DeliveryError(f"cannot write to {top}: {e!r}", "4.3.0") from e
        raise
    # Delivered from here on: a failure now must not make the runner deliver it a second time.
    try:
        os.unlink(name, dir_fd=tmp_fd)
    except OSError:
        pass


def _rewind(message: BinaryIO) -> None:
    try:
        message.seek(0)
    except Exception as e:
        raise DeliveryError(f"cannot read queued message: {e}", "4.3.0") from e


def _read(message: BinaryIO) -> bytes:
    # Reported as a queue-file problem, not as the Maildir's.
    try:
        return message.read(BLOCK)
    except Exception as e:
        raise DeliveryError(f"cannot read queued message: {e}", "4.3.0") from e
