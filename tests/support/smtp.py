"""SMTP peers for tests: aiosmtpd sinks with per-recipient behaviour, TLS (trustme) and AUTH,
and a byte-exact fault server that replays a script, for what aiosmtpd cannot do (drop after
".", stall, bad bytes)."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session

from tests.support.net import TIMEOUT, free_port

USER, PASSWORD = "alice", "Zp1-secret!"
"""The account ``aiosmtpd_server(auth=True)`` accepts."""


@dataclass
class Received:
    """One message as the server got it: envelope, the bytes after DATA, where from, over TLS?"""

    sender: str
    rcpts: list[str]
    content: bytes
    mail_options: list[str]
    peer: str = ""
    tls: bool = False


class Handler:
    """Accepts everything unless ``rcpt_reply(address)`` / ``data_reply(envelope)`` says
    otherwise (a reply string such as ``"550 5.1.1 no such user"``)."""

    def __init__(self, name: str = "sink") -> None:
        self.name = name
        self.messages: list[Received] = []
        self.sessions = 0
        self.rcpt_reply: Callable[[str, Envelope], str | None] = lambda a, e: None
        self.data_reply: Callable[[Envelope], str | None] = lambda e: None
        self.commands: list[str] = []
        self.lock = threading.Lock()

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        with self.lock:
            self.sessions += 1
            self.commands.append(f"EHLO {hostname}")
        session.host_name = hostname
        return responses

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        with self.lock:
            self.commands.append(f"MAIL {address} {' '.join(mail_options)}".rstrip())
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        with self.lock:
            self.commands.append(f"RCPT {address}")
        reply = self.rcpt_reply(address, envelope)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        reply = self.data_reply(envelope)
        if reply:
            return reply
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        with self.lock:
            self.messages.append(Received(envelope.mail_from or "", list(envelope.rcpt_tos),
                                          bytes(envelope.content or b""),
                                          list(envelope.mail_options), peer,
                                          session.ssl is not None))
        return "250 2.0.0 Ok: queued"

    def by_rcpt(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for m in self.messages:
            for r in m.rcpts:
                counts[r] = counts.get(r, 0) + 1
        return counts


class Server:
    """An aiosmtpd Controller on ``host``:``port`` with a Handler."""

    def __init__(self, host: str, port: int, handler: Handler | None = None,
                 **kwargs: Any) -> None:
        self.handler = handler or Handler(host)
        kwargs.setdefault("decode_data", False)
        kwargs.setdefault("enable_SMTPUTF8", True)
        kwargs.setdefault("ready_timeout", 10)
        self.controller = Controller(self.handler, hostname=host, port=port, **kwargs)
        self.controller.start()

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages

    def stop(self) -> None:
        self.controller.stop()


class Authenticator:
    """Accepts one user name and password; remembers every attempt's mechanism."""

    def __init__(self, user: str, password: str) -> None:
        self.user = user.encode()
        self.password = password.encode()
        self.attempts: list[tuple[str, bool]] = []

    def __call__(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                 auth_data: Any) -> AuthResult:
        ok = (getattr(auth_data, "login", None) == self.user
              and getattr(auth_data, "password", None) == self.password)
        self.attempts.append((mechanism, ok))
        return AuthResult(success=ok, handled=False)


# -- aiosmtpd with TLS and AUTH, per-address replies ---------------------------------------------

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
                                      list(envelope.mail_options), tls=session.ssl is not None))
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


@contextmanager
def aiosmtpd_server(sink: Sink | None = None, certs: Certs | None = None, *,
                    implicit_tls: bool = False, auth: bool = False,
                    smtputf8: bool = True, **kw: Any) -> Iterator[tuple[int, Sink]]:
    """aiosmtpd on 127.0.0.1: STARTTLS with ``certs``, TLS on connect with ``implicit_tls``,
    AUTH for ``USER``/``PASSWORD`` with ``auth``."""
    sink = sink or Sink()
    port = free_port()
    args: dict[str, Any] = {"hostname": "127.0.0.1", "port": port, "enable_SMTPUTF8": smtputf8,
                            "server_hostname": "mx.example.test", "ready_timeout": TIMEOUT}
    if certs and implicit_tls:
        args["ssl_context"] = certs.server_context()
    elif certs:
        args["tls_context"] = certs.server_context()
    if auth:
        args["authenticator"] = Authenticator(USER, PASSWORD)
        args["auth_require_tls"] = certs is not None
    args.update(kw)
    controller = Controller(sink, **args)
    controller.start()
    try:
        yield port, sink
    finally:
        controller.stop()


# -- the fault server ----------------------------------------------------------------------------

Step = tuple[str, Any]


class FaultServer:
    """Replays a script per connection and records the exact bytes each connection sent.

    Steps: ("send", bytes); ("expect", b"MAIL") reads one line that must start with that
    (case-insensitive) or the connection is dropped; ("read_until", b"\\r\\n.\\r\\n");
    ("read_bytes", n); ("sleep", seconds); ("close", None); ("tls", SSLContext) wraps the
    socket (server side); ("garbage", bytes) sends and closes. For tagged protocols (IMAP):
    ("command", b"LOGIN") reads one line whose text after the first word must start with that
    and remembers that first word, the tag; ("tagged", b"OK done\\r\\n") sends that after the tag.
    Connection i uses ``scripts[min(i, len(scripts) - 1)]``. ``port`` 0 picks a free one (see
    ``port``); ``stop`` (or leaving a ``with`` block) also ends connections still sleeping in
    their script."""

    def __init__(self, *scripts: list[Step], host: str = "127.0.0.1", port: int = 0) -> None:
        self.scripts = scripts
        self.received: list[bytes] = []
        self.errors: list[str] = []
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = int(self.sock.getsockname()[1])
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def connections(self) -> int:
        return len(self.received)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            n = len(self.received)
            self.received.append(b"")
            script = self.scripts[min(n, len(self.scripts) - 1)]
            threading.Thread(target=self._run, args=(conn, n, script), daemon=True).start()

    def _run(self, conn: socket.socket, n: int, script: list[Step]) -> None:
        conn.settimeout(30)
        buf = b""
        tag = b"*"

        def record(data: bytes) -> None:
            self.received[n] += data

        def more() -> bytes:
            data = conn.recv(65536)
            if not data:
                raise EOFError
            record(data)
            return data

        try:
            for op, arg in script:
                if op == "send":
                    conn.sendall(arg)
                elif op == "expect":
                    while b"\n" not in buf:
                        buf += more()
                    line, buf = buf.split(b"\n", 1)
                    if not line.upper().startswith(arg.upper()):
                        self.errors.append(f"expected {arg!r}, got {line!r}")
                        return
                elif op == "command":
                    while b"\n" not in buf:
                        buf += more()
                    line, buf = buf.split(b"\n", 1)
                    words = line.split(None, 1)
                    if len(words) < 2 or not words[1].upper().startswith(arg.upper()):
                        self.errors.append(f"expected command {arg!r}, got {line!r}")
                        return
                    tag = words[0]
                elif op == "tagged":
                    conn.sendall(tag + b" " + arg)
                elif op == "read_until":
                    while arg not in buf:
                        buf += more()
                    buf = buf.split(arg, 1)[1]
                elif op == "read_bytes":
                    while len(buf) < arg:
                        buf += more()
                    buf = buf[arg:]
                elif op == "sleep":
                    if self._stop.wait(arg):
                        return
                elif op == "close":
                    return
                elif op == "garbage":
                    conn.sendall(arg)
                    return
                elif op == "tls":
                    assert isinstance(arg, ssl.SSLContext)
                    conn = arg.wrap_socket(conn, server_side=True)
                    buf = b""
            # script done: swallow the rest (QUIT) politely
            conn.settimeout(2)
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                record(data)
                if b"QUIT" in data.upper():
                    conn.sendall(b"221 bye\r\n")
                    break
        except (OSError, EOFError, ssl.SSLError):
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sock.close()

    def __enter__(self) -> FaultServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


GREETING: list[Step] = [("send", b"220 fault.test ESMTP\r\n"), ("expect", b"EHLO"),
                        ("send", b"250-fault.test\r\n250 8BITMIME\r\n")]
"""Greeting and EHLO without PIPELINING: the client then goes in lock-step."""


def accept_until_data(rcpts: int = 1) -> list[Step]:
    """MAIL, ``rcpts`` RCPTs and DATA accepted, in lock-step."""
    steps: list[Step] = [("expect", b"MAIL FROM:"), ("send", b"250 ok\r\n")]
    for _ in range(rcpts):
        steps += [("expect", b"RCPT TO:"), ("send", b"250 ok\r\n")]
    return steps + [("expect", b"DATA"), ("send", b"354 go ahead\r\n")]


def delivered(rcpts: int = 1) -> list[Step]:
    """A complete, successful lock-step transaction."""
    return GREETING + accept_until_data(rcpts) + [
        ("read_until", b"\r\n.\r\n"), ("send", b"250 2.0.0 accepted\r\n")]
