"""The connection to the server: TCP or TLS socket, line reading with limits, STARTTLS upgrade.

This is the only smtpchat code that touches bytes from the network.
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from typing import NamedTuple

from pymailtools.chat import certinfo
from pymailtools.chat.errors import (
    ConnectFailed,
    ConnectionLost,
    ProtocolError,
    ReplyTimeout,
    TLSFailed,
)
from pymailtools.smtp.reply import MAX_LINE, MAX_LINES, MAX_REPLY, Reply, line_code


class TLSInfo(NamedTuple):
    """What a TLS handshake negotiated and what the server's certificate says."""

    version: str
    cipher: str
    bits: int
    verified: bool
    cert: certinfo.CertInfo | None


def tls_context(verify: bool, ca_file: str | None = None, cert_file: str | None = None,
                key_file: str | None = None) -> ssl.SSLContext:
    """A client context: swaks' default is not to verify, so neither do we without --tls-verify."""
    ctx = ssl.create_default_context(cafile=ca_file)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


class Wire:
    """A connected socket with a read buffer; ``timeout`` (seconds, None = forever) is per step."""

    def __init__(self, sock: socket.socket, peer: tuple[str, int], timeout: float | None) -> None:
        self.sock: socket.socket = sock
        self.peer = peer
        self.timeout = timeout
        self.buffer = b""
        self.tls: TLSInfo | None = None
        self.closed = False
        self.eof = False
        sock.settimeout(timeout)

    @classmethod
    def connect(cls, address: str, port: int, family: int, timeout: float | None,
                source: str | None = None) -> Wire:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as e:
            reason = e.strerror or e
            raise ConnectFailed(f"Error connecting to {address}:{port}: {reason}") from None
        try:
            sock.settimeout(timeout)
            if source:
                sock.bind((source, 0))
            sock.connect((address, port))
        except TimeoutError:
            sock.close()
            raise ConnectFailed(f"Error connecting to {address}:{port}: timed out") from None
        except OSError as e:
            sock.close()
            reason = e.strerror or e
            raise ConnectFailed(f"Error connecting to {address}:{port}: {reason}") from None
        return cls(sock, (address, port), timeout)

    # --- reading ---------------------------------------------------------------------------

    def _fill(self, deadline: float | None) -> None:
        if self.eof:
            self.closed = True
            raise ConnectionLost("Remote host closed connection unexpectedly.")
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ReplyTimeout(f"Timeout ({self.timeout:g} secs) waiting for server response")
            self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise ReplyTimeout(
                f"Timeout ({self.timeout:g} secs) waiting for server response") from None
        except ssl.SSLError as e:
            self.closed = True
            raise ConnectionLost(f"TLS error while reading: {e.reason or e}") from None
        except OSError as e:
            self.closed = True
            raise ConnectionLost(f"Error reading from the server: {e.strerror or e}") from None
        if not data:
            self.closed = True
            raise ConnectionLost("Remote host closed connection unexpectedly.")
        self.buffer += data

    def read_line(self, deadline: float | None, limit: int = MAX_LINE) -> bytes:
        """One line without its ending (CRLF, or a bare LF some servers send)."""
        while True:
            nl = self.buffer.find(b"\n")
            if nl >= 0:
                line, self.buffer = self.buffer[:nl], self.buffer[nl + 1 :]
                if len(line) > limit:
                    raise ProtocolError(f"reply line longer than {limit} bytes")
                return line[:-1] if line.endswith(b"\r") else line
            if len(self.buffer) > limit:
                raise ProtocolError(f"reply line longer than {limit} bytes")
            self._fill(deadline)

    def read_exact(self, size: int, deadline: float | None) -> bytes:
        """Exactly ``size`` bytes (an IMAP literal), whatever they hold."""
        while len(self.buffer) < size:
            self._fill(deadline)
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def read_reply(self) -> Reply:
        """One complete reply; a malformed line ends it with code 0 (never mistaken for success)."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        lines: list[bytes] = []
        size = 0
        while True:
            line = self.read_line(deadline)
            lines.append(line)
            size += len(line)
            parsed = line_code(line)
            if parsed is None:
                return Reply(0, lines)
            code, last = parsed
            if last:
                return Reply(code, lines)
            if size > MAX_REPLY or len(lines) > MAX_LINES:
                raise ProtocolError(f"reply longer than {MAX_REPLY} bytes or {MAX_LINES} lines")

    def pending(self) -> bool:
        """Whether the server sent something we have not shown yet (data, or a close)."""
        if b"\n" in self.buffer or self.eof:
            return True
        ready, _, _ = select.select([self.sock], [], [], 0)
        if not ready and not (isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()):
            return False
        # Readable is not the same as "has data": TLS 1.3 session tickets arrive after the
        # handshake and carry nothing for us, so look without blocking.
        self.sock.setblocking(False)
        try:
            data = self.sock.recv(65536)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return False
        except OSError:
            data = b""
        finally:
            self.sock.settimeout(self.timeout)
        if not data:
            self.eof = True
            return True
        self.buffer += data
        return True

    # --- writing ---------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise ReplyTimeout(f"Timeout ({self.timeout:g} secs) sending to the server") from None
        except OSError as e:
            self.closed = True
            raise ConnectionLost(f"Error writing to the server: {e.strerror or e}") from None

    # --- TLS -------------------------------------------------------------------------------

    def start_tls(self, ctx: ssl.SSLContext, server_hostname: str | None) -> tuple[TLSInfo, int]:
        """Upgrade in place; returns the TLS details and the count of stray plaintext bytes dropped.

        Bytes the server sent after its 220 but before the handshake would otherwise be read as
        if they came through TLS (response injection, CVE-2020-14954): they are discarded.
        """
        dropped = len(self.buffer)
        self.buffer = b""
        deadline_timeout = self.timeout
        try:
            self.sock.settimeout(deadline_timeout)
            tls_sock = ctx.wrap_socket(self.sock, server_hostname=server_hostname or None)
        except TimeoutError:
            self.closed = True
            raise TLSFailed("TLS startup failed (handshake timed out)") from None
        except ssl.SSLCertVerificationError as e:
            self.closed = True
            raise TLSFailed(f"TLS startup failed (certificate verify failed: "
                            f"{e.verify_message or e.reason})") from None
        except (ssl.SSLError, OSError) as e:
            self.closed = True
            reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e)
            raise TLSFailed(f"TLS startup failed ({reason})") from None
        self.sock = tls_sock
        self.tls = describe_tls(tls_sock, ctx.verify_mode != ssl.CERT_NONE)
        return self.tls, dropped

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass


def describe_tls(sock: ssl.SSLSocket, verified: bool) -> TLSInfo:
    name, version, bits = sock.cipher() or ("unknown", "unknown", 0)
    der = sock.getpeercert(binary_form=True)
    cert = None
    if der:
        try:
            cert = certinfo.parse(der)
        except (ValueError, IndexError, UnicodeDecodeError):
            cert = None
    return TLSInfo(sock.version() or version, name, bits or 0, verified, cert)

