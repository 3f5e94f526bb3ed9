"""Helpers for the mail(1) tests: run the installed script, drive it through a pseudo-terminal,
read an mbox back."""

import mailbox
import os
import re
import select
import subprocess
import time
from pathlib import Path

from tests.conftest import script
from tests.support.net import TIMEOUT

_ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


def mail_env(config_file: Path, home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, PYMAILTOOLS_CONFIG=str(config_file), HOME=str(home),
               PYMAILTOOLS_DELIVERY_MODE="queue", COLUMNS="80", NO_COLOR="1", PAGER="cat")
    env.pop("MAIL", None)
    env.pop("MBOX", None)
    env.update(extra)
    return env


def run_mail(env: dict[str, str], *args: str, input: bytes = b"",
             timeout: float = TIMEOUT) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([script("mail"), *args], input=input, capture_output=True, env=env,
                          timeout=timeout)


class Pty:
    """A command on a pseudo-terminal: ``expect`` text, ``send`` lines, ``wait`` for exit."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: str | None = None) -> None:
        master, slave = os.openpty()
        os.set_blocking(master, False)
        self.master = master
        env = dict(env, TERM="dumb", LINES="200")
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     cwd=cwd, start_new_session=True)
        os.close(slave)
        self.buffer = b""

    def expect(self, text: str | bytes, timeout: float = TIMEOUT) -> bytes:
        """Wait until ``text`` has appeared; return everything up to and including it."""
        want = text.encode() if isinstance(text, str) else text
        deadline = time.monotonic() + timeout
        while True:
            plain = _ANSI.sub(b"", self.buffer).replace(b"\r\n", b"\n")
            at = plain.find(want)
            if at >= 0:
                self.buffer = plain[at + len(want) :]
                return plain[: at + len(want)]
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {want!r}; got {plain!r}")
            ready, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                if not chunk and self.proc.poll() is not None:
                    raise AssertionError(f"exited before {want!r}; got {plain!r}")
                self.buffer += chunk

    def send(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\n")

    def eof(self) -> None:
        os.write(self.master, b"\x04")

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            code = self.proc.wait(timeout)
        finally:
            self.drain()
            os.close(self.master)
        return code

    def drain(self) -> None:
        while True:
            try:
                ready, _, _ = select.select([self.master], [], [], 0.2)
                if not ready:
                    return
                chunk = os.read(self.master, 65536)
            except OSError:
                return
            if not chunk:
                return
            self.buffer += chunk

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def mbox_messages(path: Path) -> list[mailbox.mboxMessage]:
    """The messages of the mbox at ``path``, as Python's mailbox module reads them."""
    box = mailbox.mbox(str(path), create=False)
    try:
        return list(box)
    finally:
        box.close()
