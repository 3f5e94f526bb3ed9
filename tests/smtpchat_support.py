"""Loopback peers for smtpchat's tests: aiosmtpd with TLS/AUTH, a byte-exact fault server,
a tiny DNS server for --mx, a pseudo-terminal driver, and a way to run the console script."""

from __future__ import annotations

import asyncio
import os
import re
import select
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import script

TIMEOUT = 60  # generous: two shared cores


def free_port(host: str = "127.0.0.1") -> int:
    # aiosmtpd's Controller cannot take port 0 (reliability.md 4.5): pick one first.
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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


# --- aiosmtpd ----------------------------------------------------------------------------------

@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    mail_options: list[str]
    tls: bool


@dataclass
class Sink:
    """aiosmtpd's handler: records messages; per-address replies for MAIL/RCPT/DATA."""

    messages: list[Received] = field(default_factory=list)
    reject_rcpt: dict[str, str] = field(default_factory=dict)
    reject_mail: str | None = None
    data_reply: str = "250 2.0.0 Ok: queued"

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        if self.reject_mail:
            return self.reject_mail
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if address in self.reject_rcpt:
            return self.reject_rcpt[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                      envelope.original_content or envelope.content,
                                      list(envelope.mail_options), session.ssl is not None))
        return self.data_reply


class Certs:
    """A trustme CA and a certificate for 127.0.0.1/localhost, as files and contexts."""

    def __init__(self, directory: Path) -> None:
        import trustme

        self.ca = trustme.CA(organization_name="smtpchat test CA")
        self.cert = self.ca.issue_cert("localhost", "127.0.0.1", common_name="mx.example.test")
        self.ca_file = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.cert.configure_cert(ctx)
        return ctx


USERS = {"alice": "Zp1-secret!"}


def authenticator(server: Any, session: Any, envelope: Any, mechanism: str,
                  auth_data: Any) -> Any:
    from aiosmtpd.smtp import AuthResult, LoginPassword

    ok = isinstance(auth_data, LoginPassword) and USERS.get(
        auth_data.login.decode()) == auth_data.password.decode()
    return AuthResult(success=ok, handled=False)


@contextmanager
def aiosmtpd_server(sink: Sink | None = None, certs: Certs | None = None, *,
                    implicit_tls: bool = False, auth: bool = False,
                    smtputf8: bool = True, **kw: Any) -> Iterator[tuple[int, Sink]]:
    """aiosmtpd on 127.0.0.1: STARTTLS with ``certs``, TLS on connect with ``implicit_tls``."""
    from aiosmtpd.controller import Controller

    sink = sink or Sink()
    port = free_port()
    args: dict[str, Any] = {"hostname": "127.0.0.1", "port": port, "enable_SMTPUTF8": smtputf8,
                            "server_hostname": "mx.example.test", "ready_timeout": TIMEOUT}
    if certs and implicit_tls:
        args["ssl_context"] = certs.server_context()
    elif certs:
        args["tls_context"] = certs.server_context()
    if auth:
        args["authenticator"] = authenticator
        args["auth_require_tls"] = certs is not None
    args.update(kw)
    controller = Controller(sink, **args)
    controller.start()
    try:
        yield port, sink
    finally:
        controller.stop()


# --- a byte-exact fault server (reliability.md 4.6) --------------------------------------------

class FaultServer:
    """Plays ``steps`` to each client: ("send", bytes), ("expect", prefix), ("sleep", s),
    ("read_until", marker), ("close", None). Records every byte received."""

    def __init__(self, steps: list[tuple[str, Any]]) -> None:
        self.steps = steps
        self.received = b""
        self.errors: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._main, daemon=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for kind, arg in self.steps:
                if kind == "send":
                    writer.write(arg)
                    await writer.drain()
                elif kind == "sleep":
                    await asyncio.sleep(arg)
                elif kind == "expect":
                    line = await asyncio.wait_for(reader.readuntil(b"\n"), TIMEOUT)
                    self.received += line
                    if not line.upper().startswith(arg.upper()):
                        self.errors.append(f"expected {arg!r}, got {line!r}")
                elif kind == "read_until":
                    data = await asyncio.wait_for(reader.readuntil(arg), TIMEOUT)
                    self.received += data
                elif kind == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError) as e:
            self.errors.append(repr(e))
        finally:
            writer.close()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self.server = server
        self.ready.set()
        self.loop.run_forever()

    def __enter__(self) -> FaultServer:
        self.thread.start()
        self.ready.wait(TIMEOUT)
        return self

    def __exit__(self, *exc: object) -> None:
        async def shutdown() -> None:
            # Cancel clients still in a step (a long sleep) while the loop can close them.
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(TIMEOUT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()


# --- a tiny DNS server for --mx ----------------------------------------------------------------

class DNSServer:
    """Answers MX and A queries from a dict over UDP on 127.0.0.1 (dnspython does the wire)."""

    def __init__(self, mx: dict[str, list[tuple[int, str]]], a: dict[str, list[str]]) -> None:
        self.mx, self.a = mx, a
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.running = True

    def _serve(self) -> None:
        import dns.message
        import dns.rcode
        import dns.rdataclass
        import dns.rdatatype
        import dns.rrset

        while self.running:
            ready, _, _ = select.select([self.sock], [], [], 0.2)
            if not ready:
                continue
            data, peer = self.sock.recvfrom(4096)
            query = dns.message.from_wire(data)
            response = dns.message.make_response(query)
            q = query.question[0]
            name = q.name.to_text(omit_final_dot=True).lower()
            if q.rdtype == dns.rdatatype.MX and name in self.mx:
                response.answer.append(dns.rrset.from_text_list(
                    q.name, 60, "IN", "MX", [f"{p} {h}." for p, h in self.mx[name]]))
            elif q.rdtype == dns.rdatatype.A and name in self.a:
                response.answer.append(dns.rrset.from_text_list(q.name, 60, "IN", "A",
                                                                self.a[name]))
            elif name not in self.mx and name not in self.a:
                response.set_rcode(dns.rcode.NXDOMAIN)
            self.sock.sendto(response.to_wire(), peer)

    def __enter__(self) -> DNSServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join(TIMEOUT)
        self.sock.close()


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


# --- Postfix: a private instance and smtp-sink, loopback only -----------------------------------

def wait_for_port(port: int, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


@contextmanager
def smtp_sink(binary: str) -> Iterator[int]:
    """Postfix's smtp-sink test server (it needs -u to drop privileges when run as root)."""
    port = free_port()
    argv = [binary, *(["-u", "nobody"] if os.geteuid() == 0 else []), f"127.0.0.1:{port}", "10"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(TIMEOUT)


@contextmanager
def postfix_instance(certs: Certs, extra: str = "") -> Iterator[int]:
    """A real Postfix (master + smtpd) with its own config and queue, listening on loopback,
    delivering everything to discard(8). Needs root, as Postfix's master does."""
    import grp
    import pwd
    import shutil
    import tempfile

    postfix = "/usr/sbin/postfix"
    port = free_port()
    # Not under pytest's tmp_path: its root-only parents would keep the postfix user out.
    directory = Path(tempfile.mkdtemp(prefix="smtpchat-postfix-"))
    directory.chmod(0o755)
    etc, queue, data = directory / "etc", directory / "queue", directory / "data"
    for d in (etc, queue, data):
        d.mkdir()
    os.chown(data, pwd.getpwnam("postfix").pw_uid, grp.getgrnam("postfix").gr_gid)
    key = etc / "key.pem"
    certs.cert.private_key_and_cert_chain_pem.write_to_path(str(key))
    sources = [Path("/etc/postfix/master.cf.proto"), Path("/etc/postfix/master.cf"),
               Path("/usr/share/postfix/master.cf.dist")]
    master = next(p for p in sources if p.exists()).read_text()
    master = re.sub(r"(?m)^smtp\s+inet\s.*$", f"127.0.0.1:{port} inet n - n - - smtpd", master)
    (etc / "master.cf").write_text(master)
    (etc / "main.cf").write_text(f"""\
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
myhostname = mx.example.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
default_transport = discard
relay_transport = discard
alias_maps =
alias_database =
smtputf8_enable = yes
smtpd_tls_chain_files = {key}
smtpd_tls_security_level = may
maillog_file = {directory}/maillog
maillog_file_prefixes = {directory}
{extra}""")
    started = subprocess.run([postfix, "-c", str(etc), "start"], check=False, timeout=TIMEOUT,
                             capture_output=True)
    try:
        if started.returncode:
            log = directory / "maillog"
            raise AssertionError("postfix did not start: "
                                 + (log.read_text() if log.exists() else started.stderr.decode()))
        wait_for_port(port)
        yield port
    finally:
        subprocess.run([postfix, "-c", str(etc), "stop"], check=False, timeout=TIMEOUT,
                       capture_output=True)
        shutil.rmtree(directory, ignore_errors=True)
