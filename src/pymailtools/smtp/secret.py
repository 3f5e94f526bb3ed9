"""Secrets printed by a command the user names: a password (``pass show …``) or an OAuth2 token.

The command runs without a shell (its text is split as a shell would split it; write
``sh -c '…'`` for pipes), with /dev/null as input, in its own process group that is killed
when the time limit passes. Nothing secret goes on any command line, and no error message
carries what the command printed on its standard output: only its exit status and the first
line of its standard error.

OAuth2 access tokens are kept in this process for the ``expires_in`` the command printed
(less a margin), so a queue run with many sessions asks once; without ``expires_in`` every
session asks again.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import threading
import time
from typing import NamedTuple

from pymailtools.errors import EX_TEMPFAIL, MailError

DEFAULT_TIMEOUT = 30.0
EXPIRY_MARGIN = 60.0  # a token is not used in its last minute: the session would outlive it
MAX_REASON = 200  # characters of the command's standard error kept in a reason


class SecretError(MailError):
    """The command could not give the secret; the message is one line without the secret."""

    exit_code = EX_TEMPFAIL


class SecretTimeout(SecretError):
    """The command did not finish in time (it was killed)."""


class Token(NamedTuple):
    """An OAuth2 access token; ``expires`` is a time.monotonic() value, None: unknown."""

    value: str
    expires: float | None


def split(command: str, what: str = "command") -> list[str]:
    """The command's argv as a POSIX shell would split it; SecretError when it is empty or
    its quotes do not balance."""
    try:
        argv = shlex.split(command)
    except ValueError as e:
        # not the command's text: a password_maps entry holds it, as secret as a password
        raise SecretError(f"{what}: cannot split the command: {e}") from None
    if not argv:
        raise SecretError(f"{what} is empty")
    return argv


def run(command: str, timeout: float = DEFAULT_TIMEOUT, what: str = "command") -> str:
    """What ``command`` printed on standard output (UTF-8). Raises SecretError naming ``what``
    (e.g. "smtp_sasl_password_command") when it cannot start, exits non-zero or is killed, or
    does not finish within ``timeout`` seconds (its whole process group is killed then)."""
    argv = split(command, what)
    name = os.path.basename(argv[0])
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, close_fds=True, start_new_session=True)
    except OSError as e:
        raise SecretError(f"{what}: cannot run {argv[0]}: {e.strerror or e}") from None
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        proc.communicate()
        raise SecretTimeout(f"{what} ({name}) timed out after {timeout:g}s") from None
    except BaseException:
        _kill_group(proc.pid)
        proc.wait()
        raise
    if proc.returncode != 0:
        if proc.returncode < 0:
            how = f"was killed by signal {-proc.returncode}"
        else:
            how = f"failed with exit status {proc.returncode}"
        first = err.decode("utf-8", "replace").strip().split("\n", 1)[0].strip()
        detail = f": {first[:MAX_REASON]}" if first else ""
        raise SecretError(f"{what} ({name}) {how}{detail}")
    return out.decode("utf-8", "surrogateescape")


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass  # gone already


def password(command: str, timeout: float = DEFAULT_TIMEOUT,
             what: str = "password command") -> str:
    """The first line ``command`` prints (without its line end). Raises SecretError, also when
    that line is empty."""
    text = run(command, timeout, what)
    first = text.split("\n", 1)[0].rstrip("\r")
    if not first:
        name = os.path.basename(split(command, what)[0])
        raise SecretError(f"{what} ({name}) printed no password")
    return first


def parse_token(text: str, what: str = "token command",
                now: float | None = None) -> Token:
    """A token from a command's output: one line (the token) or a JSON object with
    ``access_token`` and optionally ``expires_in`` (seconds). Raises SecretError."""
    body = text.strip()
    if not body:
        raise SecretError(f"{what} printed no token")
    if body.startswith("{"):
        try:
            obj = json.loads(body)
        except ValueError:
            raise SecretError(f"{what} printed something that is not a JSON object") from None
        token = obj.get("access_token") if isinstance(obj, dict) else None
        if not isinstance(token, str) or not token.strip():
            raise SecretError(f"{what} printed JSON without an access_token")
        expires_in = obj.get("expires_in")
        expires: float | None = None
        if isinstance(expires_in, str) and expires_in.strip().isdigit():
            expires_in = int(expires_in)
        if isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
            expires = (time.monotonic() if now is None else now) + expires_in - EXPIRY_MARGIN
        return Token(token.strip(), expires)
    lines = [line for line in body.splitlines() if line.strip()]
    if len(lines) > 1:
        raise SecretError(f"{what} printed {len(lines)} lines; expected one line (the token) "
                          "or a JSON object with access_token")
    if any(c.isspace() or ord(c) < 0x20 for c in lines[0].strip()):
        raise SecretError(f"{what} printed a token with white space or control characters")
    return Token(lines[0].strip(), None)


_tokens: dict[str, Token] = {}
_lock = threading.Lock()


def token(command: str, timeout: float = DEFAULT_TIMEOUT, what: str = "token command") -> str:
    """An OAuth2 access token from ``command``: the one kept from an earlier run while it has
    not expired, else the command's fresh output. Raises SecretError."""
    now = time.monotonic()
    with _lock:
        kept = _tokens.get(command)
        if kept is not None and kept.expires is not None and kept.expires > now:
            return kept.value
    got = parse_token(run(command, timeout, what), what, now)
    with _lock:
        if got.expires is not None and got.expires > now:
            _tokens[command] = got
        else:
            _tokens.pop(command, None)
    return got.value


def forget_token(command: str) -> None:
    """Drop the token kept for ``command`` (the server refused it: ask again next time)."""
    with _lock:
        _tokens.pop(command, None)
