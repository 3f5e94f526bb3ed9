"""A POP3 client session for mail: STLS or TLS, USER/PASS or AUTH PLAIN/XOAUTH2, LIST, UIDL,
TOP for summaries, RETR streamed to a file under a size limit, DELE committed only by QUIT.

Written on a socket rather than poplib: poplib refuses lines over 2048 bytes (real mail has
longer ones), keeps a whole message in memory as a list of lines, and offers no size limit on
what a server sends; here every multi-line answer is streamed with a bound on each line and on
the total."""

from __future__ import annotations

import base64
import socket
from typing import BinaryIO

from pymailtools.mua import remote
from pymailtools.smtp import sasl

# The longest line we accept from the server (RFC 1939 allows 512 for responses; message
# lines may run to RFC 5322's 998 and beyond in real mail).
LINE_LIMIT = 1 << 16


class Pop3Session:
    """One logged-in POP3 connection. Open with ``Pop3Session.open``.

    Deletions (``dele``) take effect only when ``quit`` succeeds; ``close`` drops the
    connection without QUIT, so the server deletes nothing. Raises RemoteLost (connection
    broken or timed out), RemoteProtocolError (not POP3, or over a limit) and RemoteError (the
    server said -ERR), all from mua.remote; after the first two the session is dead."""

    def __init__(self, sock: socket.socket, conn: remote.Connection) -> None:
        self.sock = sock
        self.file = sock.makefile("rb")
        self.conn = conn
        self.host = conn.host
        self.capabilities: set[str] = set()
        self.dead = False

    # -- connecting ------------------------------------------------------------------------

    @classmethod
    def open(cls, conn: remote.Connection, creds: remote.Credentials) -> Pop3Session:
        """Connect, secure the connection (TLS or STLS), log in."""
        try:
            sock = socket.create_connection((conn.host, conn.port), conn.timeout)
        except OSError as e:
            raise remote.connection_error(conn.host, e) from None
        session = cls(sock, conn)
        try:
            if conn.implicit_tls:
                session._wrap()
            session._reply("greeting")
            session.capabilities = session._capa()
            if not conn.implicit_tls:
                if "STLS" in session.capabilities:
                    session.command("STLS")
                    session._wrap()
                    session.capabilities = session._capa()
                elif not creds.allow_plaintext:
                    raise remote.RemoteError(f"{conn.host}: server offers no STLS; refusing to "
                                             "send credentials in plaintext (use pop3s://)")
            session._login(creds)
        except BaseException:
            session.close()
            raise
        return session

    def _wrap(self) -> None:
        try:
            self.file.close()
            self.sock = self.conn.tls.wrap_socket(self.sock, server_hostname=self.host)
        except OSError as e:  # ssl.SSLError and the certificate's verification among them
            self.dead = True
            raise remote.connection_error(self.host, e) from None
        self.file = self.sock.makefile("rb")

    def _capa(self) -> set[str]:
        try:
            self.command("CAPA")
        except remote.RemoteLost:
            raise
        except remote.RemoteError:
            return set()  # an old server without CAPA
        caps: set[str] = set()
        for line in self._lines(remote.HEADER_LIMIT, "CAPA"):
            words = line.decode("ascii", "replace").upper().split()
            if words:
                caps.add(words[0])
                if words[0] == "SASL":
                    caps.update("AUTH=" + w for w in words[1:])
        return caps

    def _login(self, creds: remote.Credentials) -> None:
        secret = creds.secret()
        if creds.token:
            if "AUTH=XOAUTH2" not in self.capabilities:
                raise remote.RemoteError(f"{self.host}: server offers no AUTH XOAUTH2 for the "
                                  "OAuth2 token")
            self._auth("XOAUTH2", sasl.xoauth2(creds.user, secret))
        elif "AUTH=PLAIN" in self.capabilities:
            self._auth("PLAIN", sasl.plain(creds.user, secret))
        else:
            self.command(f"USER {_arg(creds.user)}")
            self.command(f"PASS {_arg(secret)}", secret=True)

    def _auth(self, mech: str, initial: bytes) -> None:
        self._send(f"AUTH {mech}")
        line = self._line()
        if line.startswith(b"+"):
            self._send(base64.b64encode(initial).decode("ascii"))
            line = self._line()
            if line.startswith(b"+ ") or line == b"+":
                self._send("")  # the OAuth2 error challenge: end it, the -ERR follows
                line = self._line()
        if not line.startswith(b"+OK"):
            raise remote.RemoteError(f"{self.host}: AUTH {mech} failed: {_text(line)}")

    def close(self) -> None:
        """Drop the connection without QUIT: nothing marked with DELE is deleted."""
        self.dead = True
        for thing in (self.file, self.sock):
            try:
                thing.close()
            except OSError:
                pass

    def quit(self) -> None:
        """QUIT: the server deletes what DELE marked. Raises when it did not confirm (then
        nothing may have been deleted)."""
        try:
            self.command("QUIT")
        finally:
            self.close()

    # -- the wire --------------------------------------------------------------------------

    def _send(self, text: str) -> None:
        if self.dead:
            raise remote.RemoteLost(f"{self.host}: connection already lost")
        try:
            self.sock.sendall(text.encode("utf-8") + b"\r\n")
        except OSError as e:
            self.dead = True
            raise remote.connection_error(self.host, e) from None

    def _line(self, limit: int = LINE_LIMIT) -> bytes:
        try:
            line = self.file.readline(limit + 1)
        except OSError as e:  # a timeout and ssl.SSLError among them
            self.dead = True
            raise remote.connection_error(self.host, e) from None
        if not line:
            self.dead = True
            raise remote.RemoteLost(f"{self.host}: connection closed by the server")
        if len(line) > limit:
            self.dead = True
            raise remote.RemoteProtocolError(f"{self.host}: server sent a line over {limit} bytes")
        if not line.endswith(b"\n"):
            self.dead = True
            raise remote.RemoteLost(f"{self.host}: connection closed by the server mid-line")
        return line.rstrip(b"\r\n")

    def _reply(self, what: str) -> bytes:
        line = self._line(4096)
        if line.startswith(b"+OK"):
            return line[3:].strip()
        if line.startswith(b"-ERR"):
            raise remote.RemoteError(f"{self.host}: {what} failed: {_text(line)}")
        self.dead = True
        raise remote.RemoteProtocolError(f"{self.host}: not a POP3 reply to {what}: {_text(line)}")

    def command(self, text: str, *, secret: bool = False) -> bytes:
        """Send one command; the text after +OK (remote.RemoteError on -ERR)."""
        self._send(text)
        return self._reply(text.split(" ", 1)[0] if secret else text)

    def _lines(self, limit: int, what: str) -> list[bytes]:
        out: list[bytes] = []
        total = 0
        while True:
            line = self._line()
            if line == b".":
                return out
            total += len(line) + 2
            if total > limit:
                self.dead = True
                raise remote.RemoteProtocolError(f"{self.host}: {what} answer over {limit} bytes")
            out.append(line[1:] if line.startswith(b".") else line)

    def _stream(self, out: BinaryIO, limit: int, what: str) -> int:
        """Copy a multi-line answer to ``out`` (dot-unstuffed, LF line ends); its size."""
        total = 0
        while True:
            line = self._line()
            if line == b".":
                return total
            if line.startswith(b"."):
                line = line[1:]
            total += len(line) + 1
            if total > limit:
                self.dead = True
                raise remote.RemoteProtocolError(
                    f"{self.host}: {what} sent more than {limit} bytes")
            out.write(line + b"\n")

    # -- messages --------------------------------------------------------------------------

    def sizes(self) -> dict[int, int]:
        """LIST: message number -> size in octets, as the server claims it."""
        self.command("LIST")
        return {n: int(v) for n, v in self._pairs("LIST")}

    def uidl(self) -> dict[int, str]:
        """UIDL: message number -> unique id (remote.RemoteError when the server has no UIDL)."""
        self.command("UIDL")
        out: dict[int, str] = {}
        for n, uid in self._pairs("UIDL"):
            if not (0 < len(uid) <= 70) or not all(0x21 <= ord(c) <= 0x7E for c in uid):
                self.dead = True
                raise remote.RemoteProtocolError(f"{self.host}: malformed UIDL {uid!r}")
            if uid in out.values():
                self.dead = True
                raise remote.RemoteProtocolError(f"{self.host}: UIDL {uid} given to two messages")
            out[n] = uid
        return out

    def _pairs(self, what: str) -> list[tuple[int, str]]:
        out = []
        for line in self._lines(1 << 24, what):
            words = line.decode("ascii", "replace").split()
            try:
                out.append((int(words[0]), words[1]))
                if len(words) != 2 or out[-1][0] <= 0:
                    raise ValueError
            except (IndexError, ValueError):
                self.dead = True
                raise remote.RemoteProtocolError(f"{self.host}: malformed {what} line: "
                                          f"{_text(line)}") from None
        return out

    def header(self, number: int) -> bytes:
        """TOP ``number`` 0: the message's header (CRLF line ends)."""
        self.command(f"TOP {number} 0")
        return b"\r\n".join(self._lines(remote.HEADER_LIMIT, f"TOP {number}")) + b"\r\n"

    def retr(self, number: int, out: BinaryIO, limit: int) -> int:
        """RETR message ``number`` into ``out`` (LF line ends); its size. remote.RemoteProtocolError
        when the server sends more than ``limit`` bytes (the session is then dead)."""
        self.command(f"RETR {number}")
        return self._stream(out, limit, f"RETR {number}")

    def dele(self, number: int) -> None:
        """Mark message ``number`` deleted; it goes when ``quit`` succeeds."""
        self.command(f"DELE {number}")


def _arg(text: str) -> str:
    if any(c in text for c in "\r\n\0"):
        raise remote.RemoteError("user name or password contains a line break or NUL")
    return text


def _text(line: bytes) -> str:
    return line.decode("utf-8", "replace")[:200]
