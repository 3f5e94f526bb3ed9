"""The edge every front end shares: sane fds 0-2, errors as one line plus an exit code, and
who may view or flush the queue."""

import os
import pwd
import sys

from pymailtools.config import ANYONE
from pymailtools.errors import (
    EX_IOERR,
    EX_NOPERM,
    EX_OK,
    EX_SOFTWARE,
    MailError,
    PermissionDenied,
    UsageError,
)

# On sendmail's hot path: no typing (~10 ms of start-up) and no `from __future__ import
# annotations` (importing __future__ costs more than evaluating these annotations); the
# names imported for the type checker alone are quoted where they annotate.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    # Takes the long option at args[i] and returns the index after it (its value included).
    LongOption = Callable[[list[str], int], int]

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


def run_launched(main: "Callable[[], int]") -> None:
    """The installed launcher's entry point (scripts/sendmail): ``main()``, then exit without
    the interpreter's tear-down (a third of a short run), unless threads or exit handlers
    exist. The launcher has disabled the garbage collector while the modules loaded."""
    import gc  # built in: nothing is read from disk

    gc.freeze()  # the modules' objects live until exit: no collection needs to walk them
    gc.enable()
    code = main()
    if "threading" in sys.modules or "atexit" in sys.modules:
        sys.exit(code)  # a queue run or a listener: let threads and exit handlers finish
    for stream in (sys.stdout, sys.stderr):  # None when the caller closed fd 1 or 2
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)  # whatever the command wrote is durable and closed by now


def complete_site() -> None:
    """The launcher starts Python without ``site`` and puts only this package's directories
    on sys.path: enough to queue a message or read a mailbox. Everything else may need the
    rest of the installation (dependencies in the system's site-packages, .pth import
    hooks), so it gets the standard set-up, as Python would have made it."""
    if sys.flags.no_site and "site" not in sys.modules:
        import site  # not on the hot paths: only the other modes set up site

        site.main()


def run_main(prog: str, body: "Callable[[], int]", *,
             prefix: "Callable[[MailError], str] | str" = "",
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


def authorize(cfg: "Config", action: str) -> None:
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


def getopt(args: list[str], optstring: str, *, long: "LongOption | None" = None,
           takes: "Callable[[str, str], bool] | None" = None, usage: str = "",
           ) -> tuple[list[tuple[str, str | None]], int]:
    """POSIX getopt as Postfix's commands parse: bundled flags, an option's argument attached
    (``-dID``) or next (``-d ID``), no permutation: ``--``, ``-`` or the first operand ends the
    options. Returns the options in order and the index of the first operand.

    ``optstring`` is getopt(3)'s; ``x::`` marks an option whose argument is only ever attached
    (sendmail's ``-q``, ``-q1h``). ``long`` takes ``--name ...`` options where they stand (the
    queue selectors) and refuses unknown ones; without it ``--x`` is the bundle ``-``, ``x``.
    ``takes(c, next)`` says whether option ``c`` takes the next word as its argument; when it
    declines, the value is None (postsuper's ``-d --from X``: the selectors choose the ids).
    ``usage`` follows the message of a bad option, as Postfix's postsuper prints its usage."""
    optional = {optstring[k - 1] for k in range(1, len(optstring) - 1)
                if optstring[k:k + 2] == "::"}
    with_arg = {optstring[k - 1] for k in range(1, len(optstring))
                if optstring[k] == ":" and optstring[k - 1] != ":"} - optional
    known = {c for c in optstring if c != ":"}
    opts: list[tuple[str, str | None]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return opts, i + 1
        if long is not None and arg.startswith("--"):
            i = long(args, i)
            continue
        if not arg.startswith("-") or arg == "-":
            break
        j = 1
        while j < len(arg):
            c = arg[j]
            if c not in known:
                raise UsageError(f"invalid option -- '{c}'{usage}")
            if c in optional:
                opts.append((c, arg[j + 1:]))
                break
            if c not in with_arg:
                opts.append((c, ""))
                j += 1
                continue
            value: str | None
            if j + 1 < len(arg):
                value = arg[j + 1:]
            elif i + 1 < len(args) and (takes is None or takes(c, args[i + 1])):
                i += 1
                value = args[i]
            elif takes is not None and i + 1 < len(args):
                value = None
            else:
                raise UsageError(f"option requires an argument -- '{c}'{usage}")
            opts.append((c, value))
            break
        i += 1
    return opts, i
