"""Deliver to ``|command`` and ``/file`` destinations with the target's privileges, no shell."""

import errno
import os
import pwd
import sys
import time
from collections.abc import Callable
from typing import BinaryIO

from pymailtools.config import Config
from pymailtools.errors import DeliveryError
from pymailtools.local import mbox
from pymailtools.local.targets import Command, File
from pymailtools.log import escape

TYPE_CHECKING = False
if TYPE_CHECKING:
    # json, re, selectors, shutil, signal, subprocess and threading load where a command
    # runs or a child replies: a queue run delivering into mailboxes (call_as in this
    # process) does without them
    import re
    import subprocess

PATH = "/usr/bin:/bin"
SHELL = "/bin/sh"
OUTPUT_LIMIT = 1024  # bytes of command output kept for the bounce reason
CHUNK = 65536
CHILD_REPLY_LIMIT = 16 << 20  # what call_as accepts back from its child

# Exit status -> (DSN status, text), as Postfix's sys_exits.c maps sysexits.h codes.
SYS_EXITS: dict[int, tuple[str, str]] = {
    64: ("5.3.0", "command line usage error"),
    65: ("5.6.0", "data format error"),
    66: ("5.3.0", "cannot open input"),
    67: ("5.1.1", "user unknown"),
    68: ("5.1.2", "host name unknown"),
    69: ("5.3.0", "service unavailable"),
    70: ("5.3.0", "internal software error"),
    71: ("4.3.0", "system resource problem"),
    72: ("5.3.0", "critical OS file missing"),
    73: ("5.2.0", "can't create user output file"),
    74: ("5.3.0", "input/output error"),
    75: ("4.3.0", "temporary failure"),
    76: ("5.5.0", "remote error in protocol"),
    77: ("5.7.0", "permission denied"),
    78: ("5.3.5", "local configuration error"),
}

_DSN_AT_START: "re.Pattern[str] | None" = None


def exit_error(code: int, output: str = "", prog: str = "command") -> DeliveryError | None:
    """The DeliveryError for a command's exit status (None for 0). Like Postfix, an enhanced
    status code at the start of the output replaces ours when its class (4 or 5) agrees."""
    if code == 0:
        return None
    global _DSN_AT_START
    status, text = SYS_EXITS.get(code, ("5.3.0", f"unknown mail system error {code}"))
    if _DSN_AT_START is None:
        import re  # see TYPE_CHECKING above

        _DSN_AT_START = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?:\s|$)")
    m = _DSN_AT_START.match(output)
    if m and m.group(1) == status[0]:
        status = ".".join(m.groups())
    reason = f"{text}: {prog} exited with status {code}"
    if output:
        reason += f": {output}"
    return DeliveryError(reason, status)


def _one_line(raw: bytes) -> str:
    return escape(" ".join(raw.decode("utf-8", "replace").split()))


def _clean(value: str) -> str:
    return value.replace("\x00", "")


def environment(uid: int, home: str, sender: str, recipient: str) -> dict[str, str]:
    """Exactly what a delivery command sees: nothing inherited from us."""
    try:
        pw = pwd.getpwuid(uid)
        user, shell = pw.pw_name, pw.pw_shell or "/bin/sh"
    except KeyError:
        user, shell = str(uid), "/bin/sh"
    return {
        "HOME": _clean(home),
        "USER": _clean(user),
        "LOGNAME": _clean(user),
        "SHELL": _clean(shell),
        "PATH": PATH,
        "SENDER": _clean(sender),
        "RECIPIENT": _clean(recipient),
    }


# What Postfix lets through to a command untouched (its command_expansion_filter default):
# everything else in an environment value becomes "_", and a command line made only of these
# (and blanks) needs no shell.
SAFE_CHARS = frozenset("1234567890!@%-_=+:,./abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def censor(value: str) -> str:
    """``value`` with every character outside SAFE_CHARS replaced by "_", as Postfix exports
    message context to a command."""
    return "".join(c if c in SAFE_CHARS else "_" for c in value)


def command_argv(command: str) -> list[str]:
    """The argv for a command line, as Postfix's local(8) runs one: split on blanks and executed
    directly when it holds nothing but SAFE_CHARS (a bare name is looked up in PATH), else
    ``/bin/sh -c command`` (quotes, ``$VARIABLE``, redirections, pipes...). A bare name not in
    PATH goes to the shell too: it may be a built-in."""
    words = command.split()
    if words and all(c in SAFE_CHARS or c in " \t" for c in command):
        if "/" not in words[0]:
            import shutil  # see TYPE_CHECKING above

            found = shutil.which(words[0], path=PATH)
            if found is None:
                return [SHELL, "-c", command]
            words[0] = found
        return words
    return [SHELL, "-c", command]


def _require_identity(uid: int, what: str) -> None:
    """Without root we can only act as ourselves; a root-run queue runner will do the rest."""
    euid = os.geteuid()
    if euid != 0 and uid != euid:
        raise DeliveryError(f"cannot {what} as uid {uid} without root privileges", "4.3.0")


def run_command(target: Command, message: BinaryIO, *, sender: str, recipient: str,
                config: Config) -> None:
    """Run ``target.argv`` with the message on stdin as ``target.uid``/``gid`` in its home.

    Raises DeliveryError mapped from the exit status (sysexits), 4.3.0 on a signal or when
    ``command_time_limit`` expires (the whole process group is killed)."""
    _require_identity(target.uid, "run a command")
    prog = target.argv[0] if target.argv else ""
    if not prog.startswith("/"):
        raise DeliveryError(f"command must be an absolute path: {prog!r}", "5.3.5")
    # As root: only the target's primary group, as Postfix's set_ugid() does, no inherited
    # groups. Otherwise we run as we are.
    run(list(target.argv), message, uid=target.uid, gid=target.gid, groups=[], cwd=target.home,
        env=environment(target.uid, target.home, sender, recipient), config=config)


def run(argv: list[str], message: BinaryIO, *, uid: int, gid: int, groups: list[int],
        cwd: str, env: dict[str, str], config: Config, head: bytes = b"",
        unusable: str = "5.3.0", name: str = "") -> None:
    """Run ``argv`` with ``head`` and then the message on stdin, as ``uid``/``gid`` with the
    supplementary ``groups`` when we are root (as we are otherwise), in ``cwd``.

    Raises DeliveryError mapped from the exit status (sysexits), 4.3.0 on a signal or when
    ``command_time_limit`` expires (the whole process group is killed); a program that cannot
    be executed at all gets the status ``unusable``. Messages call the command ``name``
    (default: the program run)."""
    import signal  # see TYPE_CHECKING above
    import subprocess

    _require_identity(uid, "run a command")
    prog = name or argv[0]
    root = os.geteuid() == 0
    message.seek(0)
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            close_fds=True,
            start_new_session=True,  # its own process group, so a timeout kills all of it
            user=uid if root else None,
            group=gid if root else None,
            extra_groups=groups if root else None,  # never root's own groups
        )
    except OSError as e:
        if e.filename == cwd:
            raise DeliveryError(f"cannot change to directory {cwd}: {e.strerror}",
                                "4.3.0") from None
        if e.errno in (errno.ENOENT, errno.EACCES, errno.ENOEXEC, errno.ENOTDIR):
            raise DeliveryError(f"cannot execute {argv[0]}: {e.strerror}", unusable) from None
        raise DeliveryError(f"cannot run {argv[0]}: {e.strerror}", "4.3.0") from None
    timed_out = True
    try:
        output, timed_out = _pump(proc, message, time.monotonic() + config.command_time_limit,
                                  head)
    finally:
        if timed_out:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()
    text = _one_line(output)
    if timed_out:
        raise DeliveryError(f"command time limit ({config.command_time_limit}s) exceeded: "
                            f"{prog} killed", "4.3.0")
    if proc.returncode < 0:
        raise DeliveryError(f"{prog} died with signal {-proc.returncode}"
                            + (f": {text}" if text else ""), "4.3.0")
    if argv[:2] == [SHELL, "-c"] and proc.returncode in (126, 127):
        # The shell's own "cannot execute" and "not found": a mistake of the configuration
        # or a program not installed yet, not a verdict on the message.
        what = "not found" if proc.returncode == 127 else "not executable"
        raise DeliveryError(f"command {what}: {prog} ({SHELL} exited with status "
                            f"{proc.returncode})" + (f": {text}" if text else ""), unusable)
    err = exit_error(proc.returncode, text, prog)
    if err is not None:
        raise err


def _pump(proc: "subprocess.Popen[bytes]", message: BinaryIO, deadline: float,
          head: bytes = b"") -> tuple[bytes, bool]:
    """Stream ``head`` and the message in and keep the first OUTPUT_LIMIT bytes of output, both
    at once so that neither side blocks the other. Returns (output, timed out)."""
    import selectors  # see TYPE_CHECKING above
    import subprocess

    assert proc.stdin is not None and proc.stdout is not None
    out = bytearray()
    stdin_fd, stdout_fd = proc.stdin.fileno(), proc.stdout.fileno()
    os.set_blocking(stdin_fd, False)
    pending = head
    with selectors.DefaultSelector() as sel:
        sel.register(stdin_fd, selectors.EVENT_WRITE)
        sel.register(stdout_fd, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return bytes(out), True
            events = sel.select(min(left, 1.0))
            if not events and proc.poll() is not None:
                break  # it has exited; a background child holding the pipes is not waited for
            for key, _ in events:
                if key.fd == stdout_fd:
                    data = os.read(stdout_fd, CHUNK)
                    if not data:
                        sel.unregister(stdout_fd)
                    elif len(out) < OUTPUT_LIMIT:
                        out += data[: OUTPUT_LIMIT - len(out)]
                    continue  # past the limit we keep reading so the command never blocks
                if not pending:
                    pending = message.read(CHUNK)
                    if not pending:  # end of message: the command sees EOF
                        sel.unregister(stdin_fd)
                        proc.stdin.close()
                        continue
                try:
                    pending = pending[os.write(stdin_fd, pending):]
                except BlockingIOError:
                    pass
                except BrokenPipeError:
                    # Reading all of its input is the command's choice; its exit status counts.
                    pending = b""
                    sel.unregister(stdin_fd)
                    proc.stdin.close()
    try:
        proc.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return bytes(out), True
    return bytes(out), False


def runs_here(uid: int, *, effective_only: bool = False) -> bool:
    """Whether ``call_as(uid, ..., effective_only=...)`` runs its function in this process
    (rather than in a forked child)."""
    # threading not loaded: no thread was started through it (our code starts none otherwise)
    threading = sys.modules.get("threading")
    return (os.geteuid() != 0 or uid == 0
            or (effective_only and (threading is None or threading.active_count() == 1)))


def call_as(uid: int, gid: int, func: Callable[[], bytes], *,
            effective_only: bool = False) -> bytes:
    """``func()`` with the privileges of ``uid``/``gid``: in a forked child that has dropped to
    them when we are root (so the kernel checks every open), else in this process.

    ``effective_only``: ``func`` depends on the effective ids alone (no access(), no real
    uid): in a process with one thread it then runs here between seteuid() calls, as
    Postfix's local(8) delivers, instead of in a child (a fork of the runner costs some 4 ms
    of CPU per delivery). The kernel judges every open, mkdir and link on those ids all the
    same, and the real and saved ids stay root's, so the user can neither signal nor trace
    this process meanwhile.

    DeliveryError and OSError raised by ``func`` are raised here again; the child's reply is
    data, never code (a user-owned process must not make us unpickle anything)."""
    if os.geteuid() != 0 or uid == 0:
        _require_identity(uid, "act")
        return func()
    if runs_here(uid, effective_only=effective_only):
        return _as_effective(uid, gid, func)
    import json  # see TYPE_CHECKING above

    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into the caller's code
        try:
            os.close(rfd)
            try:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
                reply = b"D" + func()
            except DeliveryError as e:
                reply = b"E" + json.dumps({"status": e.status, "reason": e.reason}).encode()
            except OSError as e:
                reply = b"O" + json.dumps({"errno": e.errno, "strerror": e.strerror,
                                           "filename": os.fsdecode(e.filename)
                                           if e.filename is not None else None}).encode()
            except BaseException as e:  # noqa: B036 - the child must report, then _exit
                reply = b"X" + f"{type(e).__name__}: {e}".encode("utf-8", "replace")
            view = memoryview(reply)
            while view:
                view = view[os.write(wfd, view):]
        finally:
            os._exit(0)
    os.close(wfd)
    chunks, size = [], 0
    with os.fdopen(rfd, "rb") as r:
        while size <= CHILD_REPLY_LIMIT:
            data = r.read(CHUNK)
            if not data:
                break
            chunks.append(data)
            size += len(data)
    _, wstatus = os.waitpid(pid, 0)
    reply = b"".join(chunks)
    if size > CHILD_REPLY_LIMIT or not reply:
        raise DeliveryError(f"helper process as uid {uid} failed (wait status {wstatus})",
                            "4.3.0")
    tag, body = reply[:1], reply[1:]
    if tag == b"D":
        return body
    if tag == b"E":
        failure = json.loads(body)
        raise DeliveryError(str(failure["reason"]), str(failure["status"]))
    if tag == b"O":
        failure = json.loads(body)
        raise OSError(failure["errno"], failure["strerror"], failure["filename"])
    raise DeliveryError(f"internal error as uid {uid}: {body.decode('utf-8', 'replace')}",
                        "4.3.0")


def _as_effective(uid: int, gid: int, func: Callable[[], bytes]) -> bytes:
    """``func()`` with effective ids ``uid``/``gid`` and no supplementary groups; root's ids
    and groups come back however ``func`` ends (the saved uid is root's: seteuid(0) works)."""
    groups, egid = os.getgroups(), os.getegid()
    # Each switch is inside its try: an exception raised by a signal handler just after one
    # (KeyboardInterrupt) must not leave this process with the user's ids.
    try:
        os.setgroups([])
        try:
            os.setegid(gid)
            try:
                os.seteuid(uid)
                return func()
            finally:
                os.seteuid(0)
        finally:
            os.setegid(egid)
    finally:
        os.setgroups(groups)


def _check_writable(path: str) -> None:
    """Turn "this user may not write there" into a permanent error before mbox.append tries:
    after setuid() the real ids are the target's, so access() asks the kernel the right thing."""
    if os.path.lexists(path):
        if not os.access(path, os.W_OK):
            raise DeliveryError(f"cannot open file {path}: Permission denied", "5.2.0")
        return
    parent = os.path.dirname(path) or "/"
    if not os.path.isdir(parent):
        raise DeliveryError(f"cannot create file {path}: no such directory", "5.2.0")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DeliveryError(f"cannot create file {path}: Permission denied", "5.2.0")


def deliver_file(target: File, message: BinaryIO, *, sender: str, recipient: str,
                 config: Config) -> None:
    """Append the message in mbox format to ``target.path`` as ``target.uid``/``gid``; a file
    that user may not write bounces (5.2.0) and is left unchanged."""
    if target.path == "/dev/null":
        return  # the classic "discard" alias: nothing to lock or append
    if target.path.endswith("/"):
        raise DeliveryError(f"maildir destinations are not supported: {target.path}", "5.3.5")

    def append() -> bytes:
        _check_writable(target.path)
        message.seek(0)
        mbox.append(target.path, message, sender=sender, recipient=recipient, uid=target.uid,
                    gid=target.gid, config=config, check_owner=False, create=True)
        return b""

    try:
        call_as(target.uid, target.gid, append)
    except OSError as e:
        status = "5.2.0" if e.errno in (errno.EACCES, errno.EPERM, errno.EISDIR) else "4.3.0"
        raise DeliveryError(f"cannot open file {target.path}: {e.strerror}", status) from None
