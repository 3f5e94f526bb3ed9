"""smtpchat under test: run the installed console script, or drive it on a pseudo-terminal."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import time

from tests.conftest import script
from tests.support.net import TIMEOUT


def smtpchat(*args: str, input: bytes | None = b"", env: dict[str, str] | None = None,
             timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run the installed console script (stdin a pipe, so never a terminal)."""
    e = dict(os.environ, NO_COLOR="1", LOGNAME="tester")
    e.pop("SMTPCHAT_AUTH_PASSWORD", None)
    e.update(env or {})
    return _run_text([script("smtpchat"), *args], input, e, timeout)


def _run_text(argv: list[str], input: bytes | None, env: dict[str, str],
              timeout: float) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(argv, input=input, capture_output=True, timeout=timeout, env=env,
                       check=False)
    return subprocess.CompletedProcess(argv, p.returncode, p.stdout.decode("utf-8", "replace"),
                                       p.stderr.decode("utf-8", "replace"))


# --- a pseudo-terminal -------------------------------------------------------------------------

class Terminal:
    """Runs a command on a pseudo-terminal; ``expect`` waits for a regex in the output."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        import pty

        e = dict(os.environ, LOGNAME="tester", TERM="xterm")
        e.pop("NO_COLOR", None)
        e.update(env or {})
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child: pty.fork gave it the terminal as its controlling tty
            os.execve(argv[0], argv, e)  # noqa: S606  (argv is ours, no shell involved)
        self.output = b""
        self.mark = 0

    def read_some(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        if not data:
            return False
        self.output += data
        return True

    def expect(self, pattern: str | bytes, timeout: float = TIMEOUT) -> re.Match[bytes]:
        """Wait for ``pattern`` in the output after the previous match."""
        rx = re.compile(pattern.encode() if isinstance(pattern, str) else pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.output, self.mark)
            if m:
                self.mark = m.end()
                return m
            if time.monotonic() > deadline or not self.read_some(0.2):
                m = rx.search(self.output, self.mark)
                if m:
                    self.mark = m.end()
                    return m
                raise AssertionError(f"{rx.pattern!r} not seen; output:\n"
                                     + self.output.decode("utf-8", "replace"))

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode() + b"\r")

    def send_raw(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait(self, timeout: float = TIMEOUT) -> int:
        """Exit status of the child, reading its output until it ends."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.read_some(0.1)
            pid, st = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                while self.read_some(0.05) and select.select([self.fd], [], [], 0)[0]:
                    pass
                os.close(self.fd)
                return os.waitstatus_to_exitcode(st)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        raise AssertionError("smtpchat did not exit; output:\n"
                             + self.output.decode("utf-8", "replace"))

    @property
    def text(self) -> str:
        return re.sub(r"\x1b\[[0-9;]*m", "", self.output.decode("utf-8", "replace"))
