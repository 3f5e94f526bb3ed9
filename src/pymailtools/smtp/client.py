"""One SMTP client for the queue and mail: session set-up on aiosmtplib, pipelining, outcomes.

aiosmtplib does what it is good at: greeting, EHLO/HELO, STARTTLS (with its defence against
injected plaintext) and AUTH, over a socket we connected ourselves (per-address connect timeout,
TCP_NODELAY, the IP for the log). Its reply reader drops replies that arrive while no command is
waiting and parses one reply per read, which rules out PIPELINING, and its sendmail() quotes
addresses its own way; so once the session is set up, the transport is handed to ``_Wire``,
which writes exactly the bytes we validated and reads every reply in order.
"""

import asyncio
import base64
import binascii
import json
import os
import socket
import ssl
from collections.abc import Callable
from typing import NamedTuple

import aiosmtplib
from aiosmtplib.errors import (
    SMTPConnectResponseError,
    SMTPException,
    SMTPHeloError,
    SMTPResponseException,
    SMTPTimeoutError,
)

from pymailtools.errors import ConfigError
from pymailtools.queue.envelope import BOUNCED, DEFERRED, SENT
from pymailtools.smtp import sasl, secret
from pymailtools.smtp.errors import HopError, Lost, ProtocolError, SMTPError
from pymailtools.smtp.mx import Hop
from pymailtools.smtp.policy import Policy
from pymailtools.smtp.reply import MAX_LINE, MAX_LINES, MAX_REPLY, Reply, line_code
from pymailtools.smtp.secret import SecretError

LINE_LIMIT = 998  # RFC 5321 4.5.3.1.6, without CRLF
MAX_BUFFER = 1 << 20  # unread reply bytes we hold before calling it a protocol error


class Outcome(NamedTuple):
    """What became of one recipient: state, RFC 3463 status, reason kept in the envelope (the
    server's reply when there is one), and the detail for the log line."""

    state: str
    dsn: str
    reason: str
    detail: str




def check_address(addr: str, what: str) -> bytes:
    """The address as it goes between < and >, or ValueError: never a byte that could end the
    command or add a parameter (aiosmtplib would silently rewrite such an address)."""
    if len(addr) > 998 or any(ord(c) < 0x20 or c in "<>\x7f" for c in addr):
        raise ValueError(f"bad {what} address syntax: {addr!r}")
    if " " in addr and not addr.startswith('"'):
        raise ValueError(f"bad {what} address syntax: {addr!r}")
    return addr.encode("utf-8")


def encode_data(raw: bytes) -> bytes:
    """The message as DATA content, terminator included.

    Order matters (SMTP smuggling): line ends are normalised first, long lines broken, and
    dot-stuffing comes last, so no ``\\n.\\r\\n`` can survive to end the message early."""
    data = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if data and not data.endswith(b"\n"):
        data += b"\n"
    if len(data) > LINE_LIMIT and max(map(len, data.split(b"\n"))) > LINE_LIMIT:
        data = _break_long_lines(data)
    data = data.replace(b"\n", b"\r\n")
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..") + b".\r\n"


def _break_long_lines(data: bytes) -> bytes:
    """Lines over 998 octets continue on a new line starting with a space (Postfix's
    smtp_line_length_limit): a header stays one folded header, a body line stays readable."""
    out = []
    for line in data.split(b"\n"):
        while len(line) > LINE_LIMIT:
            out.append(line[:LINE_LIMIT])
            line = b" " + line[LINE_LIMIT:]
        out.append(line)
    return b"\n".join(out)


def enhanced(reply: Reply, default: str) -> str:
    """The RFC 3463 code at the start of the reply text if it matches the reply's class."""
    word = reply.text.split(" ", 1)[0]
    parts = word.split(".")
    if len(parts) == 3 and all(p.isdigit() and p.isascii() for p in parts) \
            and len(parts[0]) == 1 and parts[0] == str(reply.code)[0]:
        return word
    return default


class _Wire(asyncio.Protocol):
    """Replies in order, every one of them, with size limits; writes with flow control."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.buf = bytearray()
        self.closed = False
        self.error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._paused = False

    # asyncio callbacks
    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > MAX_BUFFER:
            # A server that talks without being asked: memory stays bounded.
            self.error = ProtocolError("response too long")
            del self.buf[:]
            self.transport.close()
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # our side
    def write(self, data: bytes) -> None:
        if self.closed or self.transport.is_closing():
            raise Lost("connection already closed")
        self.transport.write(data)

    async def drain(self, timeout: float) -> None:
        while self._paused and not self.closed:
            self._drain = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._drain, timeout)
            except TimeoutError:
                raise Lost("timeout") from None
        if self.closed:
            raise Lost("connection closed")

    async def reply(self, timeout: float) -> Reply:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            got = self._parse()
            if got is not None:
                return got
            if self.error is not None:
                raise self.error
            if self.closed:
                raise Lost("connection closed")
            self._waiter = loop.create_future()
            try:
                await asyncio.wait_for(self._waiter, max(deadline - loop.time(), 0))
            except TimeoutError:
                raise Lost("timeout") from None

    def _parse(self) -> Reply | None:
        pos, lines = 0, list[bytes]()
        while True:
            end = self.buf.find(b"\n", pos)
            if end < 0:
                if len(self.buf) - pos > MAX_LINE:
                    raise ProtocolError("response line too long")
                return None
            line = bytes(self.buf[pos:end]).rstrip(b"\r")
            pos = end + 1
            if len(line) > MAX_LINE or pos > MAX_REPLY or len(lines) >= MAX_LINES:
                raise ProtocolError("response too long")
            parsed = line_code(line)
            if parsed is None:
                raise ProtocolError("malformed reply: "
                                    + line[:80].decode("utf-8", "backslashreplace"))
            lines.append(line)
            code, last = parsed
            if last:
                del self.buf[:pos]
                return Reply(code, lines)


class Session:
    """An SMTP session that is set up and ready for transactions."""

    def __init__(self, hop: Hop, smtp: aiosmtplib.SMTP, policy: Policy, tls: str) -> None:
        self.hop = hop
        self.relay = hop.relay
        self.policy = policy
        self.tls = tls  # "", "Anonymous", "Untrusted" or "Verified" (Postfix's words)
        self.extensions = dict(smtp.esmtp_extensions)
        self._smtp = smtp  # kept so that its transport is not collected
        transport = smtp.transport
        assert isinstance(transport, asyncio.Transport)
        self.wire = _Wire(transport)
        transport.set_protocol(self.wire)
        self.usable = True
        self.opened = asyncio.get_running_loop().time()
        self.transactions = 0

    def _said(self, reply: Reply, stage: str) -> str:
        return f"host {self.relay} said: {reply} (in reply to {stage} command)"

    def _by_reply(self, reply: Reply, stage: str, *, rcpt: bool = False) -> Outcome:
        """Postfix's mapping: 2xx sent, 4xx (and 552 to RCPT, RFC 5321 4.5.3.1.10) deferred,
        5xx bounced."""
        if reply.code == 421:
            self.usable = False
        if reply.code < 400:
            return Outcome(SENT, enhanced(reply, "2.0.0"), str(reply), self._said(reply, stage))
        if reply.code < 500 or (rcpt and reply.code == 552):
            dsn = enhanced(reply, "4.0.0")
            dsn = "4" + dsn[1:]
            return Outcome(DEFERRED, dsn, str(reply), self._said(reply, stage))
        default = "5.3.4" if reply.code == 552 else "5.0.0"
        return Outcome(BOUNCED, enhanced(reply, default), str(reply), self._said(reply, stage))

    def _broken(self, why: str, during: str) -> Outcome:
        self.usable = False
        self.wire.transport.close()
        text = (f"conversation with {self.relay} timed out while {during}" if why == "timeout"
                else f"lost connection with {self.relay} while {during}")
        return Outcome(DEFERRED, "4.4.2", text, text)

    async def send(self, sender: str, rcpts: list[str], data: bytes, size: int,
                   ) -> tuple[dict[str, Outcome], list[str]]:
        """One transaction. Returns an outcome per recipient and the recipients the server
        turned away with 452 after accepting others: send those again, now, in a new one.

        ``data`` is encode_data()'s output; ``size`` the message size to declare."""
        out: dict[str, Outcome] = {}
        try:
            mail_from = check_address(sender, "sender")
        except ValueError as e:
            return {r: Outcome(BOUNCED, "5.1.7", str(e), str(e)) for r in rcpts}, []
        wire_rcpts: list[tuple[str, bytes]] = []
        for r in rcpts:
            try:
                wire_rcpts.append((r, check_address(r, "recipient")))
            except ValueError as e:
                out[r] = Outcome(BOUNCED, "5.1.3", str(e), str(e))
        ext = self.extensions
        utf8 = not sender.isascii() or any(not r.isascii() for r, _ in wire_rcpts)
        if utf8 and "smtputf8" not in ext:
            why = f"SMTPUTF8 is required, but was not offered by host {self.relay}"
            for r, _ in wire_rcpts:
                out[r] = Outcome(BOUNCED, "5.6.7", why, why)
            return out, []
        limit = ext.get("size", "")
        if limit.isdigit() and int(limit) and size > int(limit):
            why = f"message size {size} exceeds size limit {limit} of server {self.relay}"
            for r, _ in wire_rcpts:
                out[r] = Outcome(BOUNCED, "5.3.4", why, why)
            return out, []
        if not wire_rcpts:
            return out, []
        params = b""
        if "size" in ext:
            params += b" SIZE=%d" % size
        if not data.isascii() and ("8bitmime" in ext or "smtputf8" in ext):
            params += b" BODY=8BITMIME"
        if utf8:
            params += b" SMTPUTF8"
        self.transactions += 1
        mail = b"MAIL FROM:<" + mail_from + b">" + params + b"\r\n"
        if "pipelining" in ext:
            return await self._pipelined(mail, wire_rcpts, data, out)
        return await self._lockstep(mail, wire_rcpts, data, out)

    async def _pipelined(self, mail: bytes, rcpts: list[tuple[str, bytes]], data: bytes,
                         out: dict[str, Outcome]) -> tuple[dict[str, Outcome], list[str]]:
        t = self.policy.timeouts
        wire = self.wire
        stage = "receiving the MAIL FROM reply"
        try:
            wire.write(mail + b"".join(b"RCPT TO:<" + w + b">\r\n" for _, w in rcpts)
                       + b"DATA\r\n")
            mail_reply = await wire.reply(t.mail)
            stage = "receiving the RCPT TO reply"
            rcpt_replies = [await wire.reply(t.rcpt) for _ in rcpts]
            stage = "receiving the DATA reply"
            data_reply = await wire.reply(t.data_init)
        except (Lost, ProtocolError) as e:
            return self._all(out, rcpts, self._failed(e, stage)), []
        return await self._finish(mail_reply, rcpt_replies, data_reply, rcpts, data, out)

    async def _lockstep(self, mail: bytes, rcpts: list[tuple[str, bytes]], data: bytes,
                        out: dict[str, Outcome]) -> tuple[dict[str, Outcome], list[str]]:
        t = self.policy.timeouts
        wire = self.wire
        stage = "receiving the MAIL FROM reply"
        rcpt_replies: list[Reply] = []
        data_reply: Reply | None = None
        try:
            wire.write(mail)
            mail_reply = await wire.reply(t.mail)
            if mail_reply.code < 400:
                stage = "receiving the RCPT TO reply"
                for _, w in rcpts:
                    wire.write(b"RCPT TO:<" + w + b">\r\n")
                    rcpt_replies.append(await wire.reply(t.rcpt))
                    if rcpt_replies[-1].code == 421:
                        break
                if any(r.code < 400 for r in rcpt_replies):
                    stage = "receiving the DATA reply"
                    wire.write(b"DATA\r\n")
                    data_reply = await wire.reply(t.data_init)
        except (Lost, ProtocolError) as e:
            return self._all(out, rcpts, self._failed(e, stage)), []
        return await self._finish(mail_reply, rcpt_replies, data_reply, rcpts, data, out)

    def _failed(self, e: Lost | ProtocolError, during: str) -> Outcome:
        """The outcome of a transaction the connection broke in (``during`` a stage)."""
        return self._broken(str(e), during) if isinstance(e, Lost) else self._protocol(e)

    def _protocol(self, e: ProtocolError) -> Outcome:
        self.usable = False
        self.wire.transport.close()
        text = f"protocol error with {self.relay}: {e}"
        return Outcome(DEFERRED, "4.5.0", text, text)

    @staticmethod
    def _all(out: dict[str, Outcome], rcpts: list[tuple[str, bytes]],
             outcome: Outcome) -> dict[str, Outcome]:
        for r, _ in rcpts:
            out.setdefault(r, outcome)
        return out

    async def _finish(self, mail_reply: Reply, rcpt_replies: list[Reply],
                      data_reply: Reply | None, rcpts: list[tuple[str, bytes]], data: bytes,
                      out: dict[str, Outcome]) -> tuple[dict[str, Outcome], list[str]]:
        t = self.policy.timeouts
        if mail_reply.code >= 400:
            await self._abort(data_reply)
            return self._all(out, rcpts, self._by_reply(mail_reply, "MAIL FROM")), []
        accepted: list[str] = []
        retry: list[str] = []
        for i, (r, _) in enumerate(rcpts):
            if i >= len(rcpt_replies):
                # Not sent after a 421: the session is over, the rest waits for next time.
                why = f"lost connection with {self.relay} before RCPT TO"
                out[r] = Outcome(DEFERRED, "4.4.2", why, why)
                continue
            reply = rcpt_replies[i]
            if reply.code < 400:
                accepted.append(r)
            elif reply.code == 452 and self.usable:
                retry.append(r)  # "too many recipients": the rest go in the next transaction
            else:
                out[r] = self._by_reply(reply, "RCPT TO", rcpt=True)
        if not accepted:
            for r in retry:
                out[r] = self._by_reply(rcpt_replies[[x for x, _ in rcpts].index(r)],
                                        "RCPT TO", rcpt=True)
            await self._abort(data_reply)
            return out, []
        if data_reply is None or data_reply.code != 354:
            if data_reply is None:
                outcome = Outcome(DEFERRED, "4.4.2", "no reply to DATA", "no reply to DATA")
            else:
                outcome = self._by_reply(data_reply, "DATA")
            for r in accepted:
                out[r] = outcome
            await self._abort(None)
            return out, retry
        stage = "sending message body"
        try:
            self.wire.write(data)
            await self.wire.drain(t.data_xfer)
            stage = "sending end of data -- message may be sent more than once"
            final = await self.wire.reply(t.data_done)
        except Lost as e:
            broken = self._broken(str(e), stage)
            for r in accepted:
                out[r] = broken
            return out, retry
        except ProtocolError as e:
            for r in accepted:
                out[r] = self._protocol(e)
            return out, retry
        outcome = self._by_reply(final, "end of DATA")
        for r in accepted:
            out[r] = outcome
        return out, retry

    async def _abort(self, data_reply: Reply | None) -> None:
        """End a transaction that will not carry data, keeping the session usable."""
        if not self.usable:
            return
        try:
            if data_reply is not None and data_reply.code == 354:
                # Pipelined DATA was accepted although no recipient was: a lone "." ends it
                # without a message (RFC 2920 3.1).
                self.wire.write(b".\r\n")
                await self.wire.reply(self.policy.timeouts.data_done)
            self.wire.write(b"RSET\r\n")
            reply = await self.wire.reply(self.policy.timeouts.rset)
            if reply.code >= 400:
                self.usable = False
        except SMTPError:
            self.usable = False

    async def quit(self) -> None:
        """QUIT without waiting long: the transactions are all recorded already."""
        if self.usable and not self.wire.closed:
            try:
                self.wire.write(b"QUIT\r\n")
                await self.wire.reply(min(self.policy.timeouts.quit, 5.0))
            except SMTPError:
                pass
        self.close()

    def close(self) -> None:
        self.usable = False
        self.wire.transport.close()


async def _connect(hop: Hop, timeout: float) -> socket.socket:
    family = socket.AF_INET6 if ":" in hop.address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    # The final "." goes in one write with the data anyway; no delayed-ACK stall either way.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(
            sock, (hop.address, hop.port)), timeout)
    except TimeoutError:
        sock.close()
        raise HopError(f"connect to {hop.relay}: Connection timed out", "4.4.1") from None
    except OSError as e:
        sock.close()
        why = os.strerror(e.errno) if e.errno else str(e)
        raise HopError(f"connect to {hop.relay}: {why}", "4.4.1") from None
    return sock


async def open_session(hop: Hop, policy: Policy, *, plaintext: bool = False) -> Session:
    """Connect, read the greeting, EHLO (HELO), STARTTLS and AUTH as the policy says.

    Raises HopError for every failure: the caller tries the next address."""
    t = policy.timeouts
    implicit = policy.implicit_tls
    context = policy.tls_context() if implicit else None  # before connecting: it may fail
    sock = await _connect(hop, t.connect)
    smtp = aiosmtplib.SMTP(hostname=hop.host, sock=sock, local_hostname=policy.helo_name,
                           timeout=t.helo, start_tls=False, use_tls=implicit,
                           tls_context=context)
    try:
        return await _setup(smtp, hop, policy, plaintext)
    except BaseException:
        smtp.close()
        raise


async def _setup(smtp: aiosmtplib.SMTP, hop: Hop, policy: Policy, plaintext: bool) -> Session:
    t = policy.timeouts
    relay = hop.relay
    tls = ""
    try:
        await smtp.connect()
    except SMTPConnectResponseError as e:
        # Even a 5xx greeting only ends this session (Postfix smtp_skip_5xx_greeting).
        raise HopError(f"host {relay} refused to talk to me: {e.code} {e.message}",
                       "4.0.0" if e.code < 500 else "4.3.0") from None
    except (SMTPTimeoutError, TimeoutError):
        raise HopError(f"conversation with {relay} timed out while receiving the initial "
                       "server greeting") from None
    except ssl.SSLError as e:
        raise HopError(f"TLS handshake with {relay} failed: {e.reason or e}", "4.7.5",
                       tls=True) from None
    except (SMTPException, OSError) as e:
        raise HopError(f"lost connection with {relay} while receiving the initial server "
                       f"greeting: {e}") from None
    if policy.implicit_tls:
        tls = _tls_established(smtp, policy, relay)
    await _hello(smtp, relay, t.helo)
    want_tls = policy.level != "none" and not policy.implicit_tls and not plaintext
    if want_tls and smtp.supports_extension("starttls"):
        try:
            await smtp.starttls(server_hostname=hop.host, tls_context=policy.tls_context(),
                                timeout=t.starttls)
        except SMTPResponseException as e:
            raise HopError(f"host {relay} refused STARTTLS: {e.code} {e.message}",
                           "4.7.5", tls=True) from None
        except (ssl.SSLError, SMTPException, OSError, TimeoutError) as e:
            what = "Server certificate not verified" if isinstance(
                e, ssl.SSLCertVerificationError) else "TLS handshake failed"
            raise HopError(f"{what} with {relay}: {getattr(e, 'reason', None) or e}",
                           "4.7.5", tls=True) from None
        tls = _tls_established(smtp, policy, relay)
        await _hello(smtp, relay, t.helo)
    elif policy.tls_required and not policy.implicit_tls:
        raise HopError(f"TLS is required, but was not offered by host {relay}", "4.7.4")
    if policy.username or policy.token_command:
        if tls:
            plain_why = ""
        elif policy.level == "none":
            plain_why = "TLS is off (smtp_tls_security_level = none)"
        elif plaintext:
            plain_why = f"the TLS handshake with {relay} failed"
        else:
            plain_why = f"host {relay} offers no STARTTLS"
        await _auth(smtp, relay, policy, plain_why)
    return Session(hop, smtp, policy, tls)


def _tls_established(smtp: aiosmtplib.SMTP, policy: Policy, relay: str) -> str:
    """How the TLS session just set up is trusted ("Verified" or "Anonymous"). At level
    ``fingerprint`` the certificate must be a pinned one, checked before anything else is
    said (no AUTH, no MAIL FROM to an impostor)."""
    if policy.level != "fingerprint":
        return "Verified" if policy.verify else "Anonymous"
    transport = smtp.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    policy.check_fingerprint(der, relay)
    return "Verified"


async def _hello(smtp: aiosmtplib.SMTP, relay: str, timeout: float) -> None:
    try:
        try:
            await smtp.ehlo(timeout=timeout)
        except SMTPHeloError as e:
            if e.code == 421 or not smtp.is_connected:
                raise
            await smtp.helo(timeout=timeout)  # very old servers: no ESMTP
    except SMTPResponseException as e:
        raise HopError(f"host {relay} refused to talk to me: {e.code} {e.message} "
                       "(in reply to EHLO command)") from None
    except (SMTPTimeoutError, TimeoutError):
        raise HopError(f"conversation with {relay} timed out while performing the EHLO "
                       "handshake") from None
    except (SMTPException, OSError) as e:
        raise HopError(f"lost connection with {relay} while performing the EHLO handshake: "
                       f"{e}") from None


# SASL mechanisms we speak, by the credential each needs
PASSWORD_MECHANISMS = ("plain", "login")
TOKEN_MECHANISMS = ("xoauth2", "oauthbearer")
COMMAND_LIMIT = 512  # RFC 5321 4.5.3.1.4, CRLF included: longer initial responses go after 334


def allowed_mechanisms(policy: Policy) -> tuple[str, ...]:
    """The mechanisms we may use, in order: the policy's ``mechanisms``
    (smtp_sasl_mechanism_filter), else xoauth2 and oauthbearer with a token command and plain
    and login with a password; a mechanism only when its credential is configured."""
    have_token = bool(policy.token_command)
    have_password = bool(policy.password or policy.password_command or policy.password_file)
    usable = (TOKEN_MECHANISMS if have_token else ()) + \
        (PASSWORD_MECHANISMS if have_password or not have_token else ())
    return tuple(m for m in policy.mechanisms or usable if m in usable)


def choose_mechanism(policy: Policy, offered: list[str]) -> str | None:
    """The first of ``allowed_mechanisms`` the server offers."""
    return next((m for m in allowed_mechanisms(policy) if m in offered), None)


async def _auth(smtp: aiosmtplib.SMTP, relay: str, policy: Policy, plain_why: str) -> None:
    """AUTH with the policy's credentials; ``plain_why`` says why the connection is not
    encrypted ("" when it is). Raises HopError (a deferral, never a bounce)."""
    methods = smtp.server_auth_methods
    if not methods:
        return  # nothing offered: the server does not want it (Postfix sends none either)
    if plain_why and not policy.allow_plaintext:
        raise HopError(f"{plain_why}; not sending credentials over an unencrypted connection "
                       "(smtp_sasl_allow_plaintext = false)", "4.7.0")
    mech = choose_mechanism(policy, methods)
    if mech is None:
        allowed = ", ".join(allowed_mechanisms(policy)) or "none with the credentials given"
        raise HopError(f"host {relay} offers no AUTH mechanism we may use (it offers "
                       f"{' '.join(methods)}; we may use {allowed})", "4.7.0")
    try:
        if mech in TOKEN_MECHANISMS:
            credential = await asyncio.to_thread(policy.read_token)
        else:
            credential = await asyncio.to_thread(policy.read_password)
    except (ConfigError, SecretError) as e:
        raise HopError(str(e), "4.7.0") from None
    user, key = policy.username, credential
    timeout = policy.timeouts.helo
    try:
        if mech == "plain":
            reply = await _sasl(smtp, b"PLAIN", [sasl.plain(user, key)], timeout)
        elif mech == "login":
            reply = await _sasl(smtp, b"LOGIN", list(sasl.login(user, key)), timeout)
        elif mech == "xoauth2":
            reply = await _sasl(smtp, b"XOAUTH2", [sasl.xoauth2(user, key)], timeout,
                                after_error=b"")
        else:
            reply = await _sasl(smtp, b"OAUTHBEARER", [sasl.oauthbearer(user, key)], timeout,
                                after_error=b"\x01")
    except (SMTPTimeoutError, TimeoutError):
        raise HopError(f"conversation with {relay} timed out during AUTH") from None
    except SMTPResponseException as e:
        # Never bounce for this: wrong credentials are our configuration, not the mail.
        raise HopError(f"SASL authentication failed; server {relay} said: {e.code} "
                       f"{e.message}", "4.7.8") from None
    except (SMTPException, OSError, ValueError) as e:
        raise HopError(f"lost connection with {relay} during AUTH: {e}") from None
    if reply.code != 235:
        if mech in TOKEN_MECHANISMS:
            secret.forget_token(policy.token_command)  # the next session asks for a new one
        why = f", OAuth2 error {reply.oauth2}" if reply.oauth2 else ""
        status = "4.7.8" if reply.code in (535, 435) or reply.oauth2 else "4.7.0"
        raise HopError(f"SASL authentication failed; server {relay} said: {reply.code} "
                       f"{reply.message} (mechanism {mech.upper()}{why})", status)


class _SASLReply(NamedTuple):
    code: int
    message: str
    oauth2: str  # the server's OAuth2 error (status, scope) from a 334 error challenge


async def _sasl(smtp: aiosmtplib.SMTP, mech: bytes, responses: list[bytes], timeout: float,
                after_error: bytes | None = None) -> _SASLReply:
    """One AUTH exchange: the first response as the initial response when the command stays
    within 512 octets (RFC 4954 4), else after the server's first 334; each further response
    after a 334. With ``after_error`` (OAuth2), a 334 after the last response is an error
    challenge: its JSON is kept and ``after_error`` sent, as RFC 7628 3.2.3 asks, to get the
    final reply."""
    first = base64.b64encode(responses[0]) or b"="
    if len(b"AUTH " + mech + b" " + first) + 2 <= COMMAND_LIMIT:
        reply = await smtp.execute_command(b"AUTH", mech, first, timeout=timeout)
    else:
        # No length limit of ours: a long OAuth2 token goes on a line of its own.
        reply = await smtp.execute_command(b"AUTH", mech, timeout=timeout)
        if reply.code == 334:
            reply = await smtp.execute_command(first, timeout=timeout)
    for more in responses[1:]:
        if reply.code != 334:
            break
        reply = await smtp.execute_command(base64.b64encode(more), timeout=timeout)
    oauth2 = ""
    if reply.code == 334:
        oauth2 = _oauth2_error(reply.message)
        if after_error is None:
            await smtp.execute_command(b"*", timeout=timeout)  # RFC 4954 4: cancel
            return _SASLReply(535, f"unexpected challenge {reply.message[:80]}", "")
        reply = await smtp.execute_command(base64.b64encode(after_error), timeout=timeout)
    return _SASLReply(reply.code, reply.message, oauth2)


def _oauth2_error(challenge: str) -> str:
    """The server's reason from an OAuth2 error challenge (base64 JSON, RFC 7628 3.2.2):
    "status=invalid_token scope=…", or "" when it says nothing we can read."""
    try:
        obj = json.loads(base64.b64decode(challenge.strip(), validate=True))
    except (ValueError, binascii.Error):
        return ""
    if not isinstance(obj, dict):
        return ""
    parts = [f"{k}={obj[k]}" for k in ("status", "scope", "schemes")
             if isinstance(obj.get(k), str | int)]
    return " ".join(parts)[:200]


async def connect(hop: Hop, policy: Policy,
                  note: Callable[[str], None] | None = None) -> Session:
    """open_session, and at level ``may`` once more in plaintext after a failed TLS
    handshake (Postfix's retry_plain: opportunistic TLS must not stop the mail).

    ``note`` hears why the plaintext retry happens. Raises HopError."""
    try:
        return await open_session(hop, policy)
    except HopError as e:
        if not (e.tls and policy.level == "may" and not policy.implicit_tls):
            raise
        if note is not None:
            note(f"{e.reason}; trying {hop.relay} again without TLS")
    return await open_session(hop, policy, plaintext=True)


async def send_message(hops: list[Hop], policy: Policy, sender: str, rcpts: list[str],
                       message: bytes) -> tuple[str, dict[str, Outcome]]:
    """One message over one session with the first address that works: the relay used
    (``host[ip]:port``) and an outcome per recipient. Raises the last HopError when no
    address gave a session."""
    if not hops:
        raise HopError("no address to connect to", "4.4.1")
    session: Session | None = None
    last: HopError | None = None
    for hop in hops:
        try:
            session = await connect(hop, policy)
            break
        except HopError as e:
            last = e
    if session is None:
        assert last is not None
        raise last
    data = encode_data(message)
    outcomes: dict[str, Outcome] = {}
    pending = list(rcpts)
    try:
        while pending:
            results, retry = await session.send(sender, pending, data, len(data))
            outcomes.update(results)
            if retry and not session.usable:
                why = f"host {session.relay} took none of the remaining recipients"
                for r in retry:
                    outcomes[r] = Outcome(DEFERRED, "4.5.3", why, why)
                break
            pending = retry
    finally:
        await session.quit()
    return session.relay, outcomes
