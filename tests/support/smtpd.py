"""Our listener under test: `sendmail -bD` on loopback, a raw socket client and swaks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from tests.conftest import missing, need_tool, script, write_toml
from tests.support.net import TIMEOUT, free_port, wait_for_port


def write_config(path: Path, values: dict[str, object]) -> None:
    write_toml(path, values)


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


    def drain(self, busy: Client, idle: Client) -> None:
        """SIGTERM with ``busy`` in the middle of DATA ("first half" sent) and ``idle`` between
        transactions: the idle one gets 421 at once, the busy one's message is queued and then
        421 follows unasked (not at its next command, which may never come: the listener would
        wait out its 60 s grace), and the listener exits 0."""
        time.sleep(0.3)
        self.proc.send_signal(signal.SIGTERM)
        assert idle.reply().startswith("421 4.3.2")
        busy.send(b"second half\r\n.\r\n")
        assert busy.reply().startswith("250 2.0.0 Ok: queued as ")
        start = time.monotonic()
        assert busy.reply().startswith("421 4.3.2")
        assert busy.rest() == b""
        assert self.proc.wait(TIMEOUT) == 0
        assert time.monotonic() - start < 30

    def workers(self, count: int | None = None) -> list[int]:
        """The pids of its listener processes (with smtpd_workers above 1); with ``count``,
        waits until that many run."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            pids = worker_pids(self.proc.pid)
            if count is None or len(pids) == count or time.monotonic() > deadline:
                return pids
            time.sleep(0.05)


@contextmanager
def listener(directory: Path, values: dict[str, object], extra_args: tuple[str, ...] = (),
             hosts: tuple[str, ...] = ("127.0.0.1",)) -> Iterator[Listener]:
    lst = Listener(directory, values, extra_args, hosts)
    try:
        yield lst
    finally:
        for pid in worker_pids(lst.proc.pid):  # a failed test may have left them stopped
            for sig in (signal.SIGCONT, signal.SIGKILL):
                with suppress(ProcessLookupError):
                    os.kill(pid, sig)
        if lst.proc.poll() is None:
            lst.proc.kill()
            lst.proc.wait(TIMEOUT)


# --- the processes of a listener with several workers (Linux /proc) ----------------------------

def _stat(pid: str) -> tuple[int, str]:
    """(parent pid, state letter) of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return int(fields[1]), fields[0]


def worker_pids(parent: int) -> list[int]:
    """Children of ``parent`` running its own program (forked workers, not helpers that a
    queue run starts)."""
    try:
        with open(f"/proc/{parent}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return []
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            ppid, state = _stat(name)
            if ppid != parent or state == "Z":
                continue
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if f.read() == cmdline:
                    pids.append(int(name))
        except OSError:
            continue
    return sorted(pids)


def alive(pid: int) -> bool:
    try:
        return _stat(str(pid))[1] != "Z"
    except OSError:
        return False


def owner(client: Client, pids: list[int]) -> int | None:
    """Which of ``pids`` holds the server side of ``client``'s TCP connection (IPv4)."""
    ip, port = client.sock.getsockname()[:2]
    peer = f"{socket.inet_aton(ip)[::-1].hex().upper()}:{port:04X}"
    inode = None
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[2] == peer and fields[9] != "0":
                # (a TIME_WAIT socket of an earlier connection from the same client port
                # has no inode: it belongs to no process)
                inode = fields[9]
    if inode is None:
        return None
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                        return pid
        except OSError:
            continue
    return None


def _holds_posix_lock(pid: int) -> bool:
    with open("/proc/locks") as f:
        return any(line.split()[1:2] == ["POSIX"] and line.split()[4:5] == [str(pid)]
                   for line in f)


@contextmanager
def only(pids: list[int], keep: int) -> Iterator[None]:
    """Stop (SIGSTOP) every worker but ``keep``: a connection made meanwhile is accepted by
    ``keep``, as the others cannot take it from the shared accept queue."""
    others = [p for p in pids if p != keep]
    deadline = time.monotonic() + TIMEOUT
    while True:
        for p in others:
            os.kill(p, signal.SIGSTOP)
        while any(_stat(str(p))[1] != "T" for p in others) and time.monotonic() < deadline:
            time.sleep(0.01)
        # One stopped inside its few microseconds holding the lock of the shared table of
        # client connections would block ``keep`` too: let it finish and stop it again.
        holders = {p for p in others if _holds_posix_lock(p)}
        if not holders or time.monotonic() > deadline:
            break
        for p in holders:
            os.kill(p, signal.SIGCONT)
        time.sleep(0.01)
    try:
        yield
    finally:
        for p in others:
            with suppress(ProcessLookupError):
                os.kill(p, signal.SIGCONT)


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


def need_swaks_tls(binary: str) -> None:
    """swaks speaks TLS only with Net::SSLeay (a Recommends, left out by --no-install-recommends):
    skip locally, fail under PYMAILTOOLS_REQUIRE_INTEROP=1, rather than fail in the handshake."""
    support = subprocess.run([binary, "--support"], capture_output=True, text=True).stdout
    if "=== TLS supported" not in support:
        missing("swaks has no TLS (apt-get install libnet-ssleay-perl libio-socket-ssl-perl)")


def swaks(port: int, *args: str, source: str | None = None,
          timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    binary = need_tool("swaks", "swaks")
    if "-tls" in args:
        need_swaks_tls(binary)
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
