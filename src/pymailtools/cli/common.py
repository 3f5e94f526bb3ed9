"""The edge every front end shares: sane fds 0-2, errors as one line plus an exit code, and
who may view or flush the queue."""

from __future__ import annotations

import os
import pwd
import sys

from pymailtools.config import ANYONE
from pymailtools.errors import EX_IOERR, EX_NOPERM, EX_OK, EX_SOFTWARE, MailError, PermissionDenied

TYPE_CHECKING = False  # typing costs ~10 ms of start-up on sendmail's hot path
if TYPE_CHECKING:
    from collections.abc import Callable

    from pymailtools.config import Config


def reopen_std_fds() -> None:
    """Make sure fds 0-2 exist, so no file opened later becomes someone's stdout (and no
    diagnostic ever lands in a queue file or mailbox)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def run_main(prog: str, body: Callable[[], int], *,
             prefix: Callable[[MailError], str] | str = "",
             interrupted: tuple[int, str] = (130, "interrupted")) -> int:
    """Run a command's ``body``: never a traceback, always one stderr line and a sysexits code."""
    reopen_std_fds()
    try:
        return body()
    except MailError as e:
        head = prefix(e) if callable(prefix) else prefix
        print(f"{prog}: {head}{e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # `mailq | head`: the reader has all it wanted
        return EX_OK
    except KeyboardInterrupt:
        code, text = interrupted
        print(f"{prog}: {text}", file=sys.stderr)
        return code
    except OSError as e:  # a file or directory we cannot use: name it, no "internal error"
        head = "" if callable(prefix) else prefix
        where = f"{e.filename}: " if e.filename else ""
        print(f"{prog}: {head}{where}{e.strerror or e}", file=sys.stderr)
        return EX_NOPERM if isinstance(e, PermissionError) else EX_IOERR
    except Exception as e:  # a bug: say what broke, in one line
        head = "" if callable(prefix) else prefix
        print(f"{prog}: {head}internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return EX_SOFTWARE


def user_label() -> str:
    """``name(uid)`` as Postfix prints the caller in its permission errors."""
    uid = os.getuid()
    try:
        return f"{pwd.getpwuid(uid).pw_name}({uid})"
    except KeyError:
        return f"unknown({uid})"


def authorize(cfg: Config, action: str) -> None:
    """May the caller ``view`` (mailq, sendmail -bp, postqueue -p/-j) or ``flush`` (sendmail
    -q, postqueue -f/-i/-s) the queue? Postfix's rule: root and the queue's owner always;
    others when authorized_mailq_users / authorized_flush_users holds static:anyone or
    their name. PermissionDenied (77) in Postfix's words otherwise.

    The caller's own configuration can widen these lists: what keeps an ordinary user from
    a root queue's contents is the file modes (Queue.ensure), not this check."""
    uid = os.getuid()
    if uid == 0:
        return
    try:
        if os.stat(cfg.queue_directory).st_uid == uid:
            return
    except OSError:
        pass
    users = cfg.authorized_mailq_users if action == "view" else cfg.authorized_flush_users
    if ANYONE in users:
        return

    try:
        if pwd.getpwuid(uid).pw_name in users:
            return
    except KeyError:
        pass
    raise PermissionDenied(f"User {user_label()} is not allowed to {action} the mail queue")
