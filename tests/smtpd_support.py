"""Our listener under test: `sendmail -bD` on loopback, a raw socket client and swaks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import need_tool, script, write_toml
from tests.smtp_support import free_port

TIMEOUT = 60  # generous: two shared cores, other suites running


def write_config(path: Path, values: dict[str, object]) -> None:
    write_toml(path, values)


def wait_for_port(host: str, port: int, proc: subprocess.Popen[bytes] | None = None,
                  log: Path | None = None) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"listener exited {proc.returncode}: "
                                 + (log.read_text() if log else ""))
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                s.recv(1024)  # the greeting; then close (a clean 'lost connection')
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on {host}:{port}")


class Listener:
    """`sendmail -bD -v` with a configuration of its own; stderr (its log) in a file."""

    def __init__(self, directory: Path, values: dict[str, object], extra_args: tuple[str, ...] = (),
                 hosts: tuple[str, ...] = ("127.0.0.1",)) -> None:
        self.port = free_port(hosts)
        self.values = dict(values)
        self.values.setdefault("smtpd_listen", [f"{h}:{self.port}" for h in hosts])
        self.config = directory / "listener.toml"
        write_config(self.config, self.values)
        self.log_path = directory / "listener.log"
        self.env = dict(os.environ, PYMAILTOOLS_CONFIG=str(self.config))
        self.env.pop("PYMAILTOOLS_DELIVERY_MODE", None)
        with open(self.log_path, "wb") as err:
            self.proc = subprocess.Popen([script("sendmail"), "-bD", "-v", *extra_args],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=err, env=self.env)
        wait_for_port(hosts[0], self.port, self.proc, self.log_path)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(TIMEOUT)


@contextmanager
def listener(directory: Path, values: dict[str, object], extra_args: tuple[str, ...] = (),
             hosts: tuple[str, ...] = ("127.0.0.1",)) -> Iterator[Listener]:
    lst = Listener(directory, values, extra_args, hosts)
    try:
        yield lst
    finally:
        if lst.proc.poll() is None:
            lst.proc.kill()
            lst.proc.wait(TIMEOUT)


class Client:
    """A raw SMTP client: bytes exactly as given, replies read line by line."""

    def __init__(self, port: int, host: str = "127.0.0.1", source: str | None = None) -> None:
        self.sock = socket.create_connection((host, port), timeout=TIMEOUT,
                                             source_address=(source, 0) if source else None)
        self.buf = b""
        self.greeting = self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(self.buf)
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def reply(self) -> str:
        """One whole (possibly multi-line) reply as text, lines joined with newlines."""
        lines = [self.line()]
        while lines[-1][3:4] == b"-":
            lines.append(self.line())
        return b"\n".join(lines).decode("utf-8", "replace")

    def cmd(self, data: bytes | str) -> str:
        self.send(data.encode() + b"\r\n" if isinstance(data, str) else data)
        return self.reply()

    def rest(self) -> bytes:
        """Everything until the server closes (or the timeout)."""
        out = self.buf
        self.buf = b""
        try:
            while data := self.sock.recv(65536):
                out += data
        except (TimeoutError, ConnectionResetError):
            pass
        return out

    def close(self) -> None:
        self.sock.close()


def swaks(port: int, *args: str, source: str | None = None,
          timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    binary = need_tool("swaks", "swaks")
    argv = [binary, "--server", f"127.0.0.1:{port}", "--timeout", "30", *args]
    if source:
        argv += ["--local-interface", source]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def server_lines(transcript: str) -> list[str]:
    """The server's lines in a swaks transcript ("<-  250 ..." / "<** 554 ...")."""
    out = []
    for line in transcript.splitlines():
        s = line.strip()
        if s.startswith(("<-", "<**", "<~", "<~*")):
            out.append(s.split(None, 1)[1] if " " in s else "")
    return out
