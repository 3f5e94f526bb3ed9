"""Loopback plumbing for tests: free ports, waiting for a listener, polling for a condition."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

TIMEOUT = 60  # generous: two shared cores, other suites running


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(hosts: tuple[str, ...] = ("127.0.0.1",), *, udp: bool = False) -> int:
    """A TCP port free on every one of ``hosts`` (all MX hosts of a test share smtp_port); with
    ``udp``, free for UDP as well (a DNS server wants both). Servers such as aiosmtpd's
    Controller cannot be given port 0 and report the port they got, so a test picks one first."""
    kinds = (socket.SOCK_DGRAM, socket.SOCK_STREAM) if udp else (socket.SOCK_STREAM,)
    for _ in range(100):
        with socket.socket(_family(hosts[0]), kinds[0]) as s:
            s.bind((hosts[0], 0))
            port = int(s.getsockname()[1])
        if all(_bindable(h, port, kind) for h in hosts for kind in kinds):
            return port
    raise RuntimeError("no free port")


def _bindable(host: str, port: int, kind: int) -> bool:
    with socket.socket(_family(host), kind) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def wait_for_port(host: str, port: int, proc: subprocess.Popen[bytes] | None = None,
                  log: Path | None = None, timeout: float = TIMEOUT) -> None:
    """Wait until an SMTP server answers on ``host``:``port``; fail at once if ``proc`` (the
    server, when we started it) has exited, showing its ``log``."""
    deadline = time.monotonic() + timeout
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


def wait_for(what: str, check: Callable[[], object], timeout: float = TIMEOUT) -> None:
    """Poll ``check`` until it is true; ``what`` names it in the failure."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
