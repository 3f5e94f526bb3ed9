"""Scripted mode: one swaks-like SMTP transaction, shown as a transcript, ending in an exit code."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pymailtools.chat import status, target
from pymailtools.chat.compose import lines_of
from pymailtools.chat.errors import (
    ChatError,
    ConnectFailed,
    ConnectionLost,
    ProtocolError,
    ReplyTimeout,
)
from pymailtools.chat.transcript import MASK, Transcript
from pymailtools.chat.wire import Wire, tls_context
from pymailtools.smtp import sasl
from pymailtools.smtp.reply import Reply, extensions

# --quit-after names (swaks' and ours) -> the point after which the session stops.
QUIT_POINTS = {
    "connect": "banner", "banner": "banner", "first-helo": "first-ehlo", "first-ehlo": "first-ehlo",
    "first-lhlo": "first-ehlo", "helo": "ehlo", "ehlo": "ehlo", "lhlo": "ehlo", "tls": "tls",
    "starttls": "tls", "auth": "auth", "mail": "mail", "from": "mail", "rcpt": "rcpt",
    "to": "rcpt", "data": "data",
}
AUTH_PREFERENCE = ["PLAIN", "LOGIN", "CRAM-MD5"]


@dataclass
class Options:
    """Everything a scripted session needs, already validated by the command line."""

    server: str | None = None
    port: int | None = None
    mx_domain: str | None = None
    family: int = 0
    source: str | None = None
    resolver: str | None = None
    to: list[str] = field(default_factory=list)
    sender: str = ""
    ehlo: str = "localhost"
    tls: str = ""  # "", "required", "optional" or "on-connect"
    tls_verify: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_sni: str | None = None
    auth: list[str] | None = None  # mechanisms to try; [] = any we know
    auth_user: str = ""
    auth_password: str = ""
    auth_plaintext: bool = False
    show_secrets: bool = False  # AUTH payloads in the transcript as sent, not masked
    message: bytes = b""  # CRLF lines, not yet dot-stuffed
    no_fixup: bool = False  # send message bytes exactly as given
    line_ending: bytes = b"\r\n"
    raw_lines: list[bytes] = field(default_factory=list)
    quit_after: str | None = None
    pipeline: bool = False
    chunking: bool = False
    chunk_size: int = 65536
    smtputf8: bool = False
    timeout: float | None = 30.0
    suppress_data: bool = False
    commands: list[str] = field(default_factory=list)  # POP3/IMAP commands of scripted mode


class Stop(Exception):
    """Ends the transaction early with an exit code (after QUIT, unless ``quit`` is False)."""

    def __init__(self, code: int, quit: bool = True) -> None:
        super().__init__(code)
        self.code = code
        self.quit = quit


def wire_lines(opts: Options) -> list[bytes]:
    """The message as sent inside DATA: line ends per --bare-lf/--bare-cr, dots stuffed last."""
    if opts.no_fixup:
        return [opts.message] if opts.message else []
    return [(b"." + ln if ln.startswith(b".") else ln) + opts.line_ending
            for ln in lines_of(opts.message)]


def needs_utf8(opts: Options) -> bool:
    return opts.smtputf8 or not opts.sender.isascii() or not all(r.isascii() for r in opts.to)


class Session:
    """One connection and transaction; ``run()`` returns swaks' exit code."""

    def __init__(self, opts: Options, transcript: Transcript) -> None:
        self.opts = opts
        self.t = transcript
        self.wire: Wire | None = None
        self.stage = "connect"
        self.ext: dict[str, str] = {}
        self.error: str | None = None
        self.server: target.Address | None = None
        self.code: int | None = None
        self.quit_point = QUIT_POINTS.get(opts.quit_after or "", None)

    # --- plumbing --------------------------------------------------------------------------

    def _send(self, line: str, shown: str | None = None) -> None:
        assert self.wire is not None
        self.wire.send(line.encode("utf-8") + b"\r\n")
        self.t.sent(line if shown is None or self.opts.show_secrets else shown)

    def read_reply(self) -> Reply:
        assert self.wire is not None
        reply = self.wire.read_reply()
        self.t.received(reply, expected=reply.ok)
        return reply

    def _cmd(self, line: str, shown: str | None = None) -> Reply:
        self._send(line, shown)
        return self.read_reply()

    def _fail(self, code: int, message: str | None = None, quit: bool = True) -> Stop:
        if message:
            self.t.error(message)
            self.error = message
        return Stop(code, quit)

    def _stop_after(self, point: str) -> None:
        if self.quit_point == point:
            raise Stop(status.OK)

    # --- connecting ------------------------------------------------------------------------

    def _candidates(self) -> Iterator[target.Address]:
        o = self.opts
        default_port = o.port or (465 if o.tls == "on-connect" else 25)
        if o.mx_domain:
            resolver = target.make_resolver(o.resolver, o.timeout)
            hosts = target.mx_hosts(o.mx_domain, resolver)
            self.t.info(f"MX hosts of {o.mx_domain}: {', '.join(hosts)}")
            for host in hosts:
                addrs = target.dns_addresses(host, default_port, o.family, resolver)
                if not addrs:
                    self.t.error(f"No address for MX host {host}")
                yield from addrs
        else:
            host, port = target.parse_server(o.server or "localhost", default_port)
            yield from target.system_addresses(host, port, o.family)

    def connect(self) -> Reply:
        """Connect to the first address that gives a 2xx banner (all MX hosts with --mx)."""
        o = self.opts
        last_error: ChatError | None = None
        for addr in self._candidates():
            # swaks' "Trying 127.0.0.1:25...", with a name shown as Postfix logs it: host[ip].
            if addr.host == addr.ip:
                shown = f"[{addr.ip}]" if ":" in addr.ip else addr.ip
            else:
                shown = f"{addr.host}[{addr.ip}]"
            self.t.tls = False  # a previous MX host's TLS session is gone
            self.t.info(f"Trying {shown}:{addr.port}...")
            try:
                self.wire = Wire.connect(addr.ip, addr.port, addr.family, o.timeout, o.source)
            except ConnectFailed as e:
                self.t.error(str(e))
                last_error = e
                continue
            self.server = addr
            self.t.info(f"Connected to {addr.ip}.")
            try:
                if o.tls == "on-connect":
                    self.handshake(addr.host)
                self.stage = "banner"
                banner = self.read_reply()
            except ChatError as e:
                self.t.error(str(e))
                self.wire.close()
                last_error = ChatError(str(e), e.exit_code if e.exit_code == status.TLS
                                       else status.BANNER)
                if o.mx_domain:
                    continue
                raise Stop(last_error.exit_code, quit=False) from None
            if banner.positive or not o.mx_domain:
                return banner
            # A 4xx/5xx greeting: try the next MX host, as Postfix does (smtp_skip_5xx_greeting).
            self.t.info("Greeting refused; trying the next host")
            self._quit()
            self.wire.close()
            last_error = ChatError("no host accepted the connection", status.BANNER)
        if last_error is None:
            raise self._fail(status.CONNECT, "No address to connect to", quit=False)
        raise Stop(last_error.exit_code, quit=False)

    def handshake(self, host: str) -> None:
        o = self.opts
        assert self.wire is not None
        ctx = tls_context(o.tls_verify, o.tls_ca, o.tls_cert, o.tls_key)
        # An IP literal is not sent as SNI, but verification still checks it against the SANs.
        sni = o.tls_sni or host
        info, dropped = self.wire.start_tls(ctx, sni)
        self.t.tls = True
        if dropped:
            self.t.error(f"Discarded {dropped} bytes the server sent after its 220 to STARTTLS "
                         "(possible response injection)")
        self.t.info(f"TLS started with cipher {info.version}:{info.cipher}:{info.bits}")
        self.t.info("TLS certificate verified" if info.verified
                    else "TLS certificate not verified (use --tls-verify)")
        if info.cert:
            self.t.info(f'TLS peer DN="{info.cert.subject}"')
            self.t.info(f'TLS issuer DN="{info.cert.issuer}"')
            self.t.info(f"TLS peer certificate valid {info.cert.not_before} "
                        f"to {info.cert.not_after}")

    # --- the stages ------------------------------------------------------------------------

    def _ehlo(self, after_tls: bool) -> None:
        self.stage = "ehlo"
        reply = self._cmd(f"EHLO {self.opts.ehlo}")
        if reply.positive:
            self.ext = extensions(reply)
            return
        if reply.code != 421 and 500 <= reply.code < 600:
            reply = self._cmd(f"HELO {self.opts.ehlo}")
            if reply.positive:
                self.ext = {}
                return
        raise self._fail(status.HELO_AFTER_TLS if after_tls else status.HELO)

    def _starttls(self) -> None:
        o = self.opts
        self.stage = "tls"
        if "STARTTLS" not in self.ext:
            if o.tls == "optional":
                self.t.info("Host did not advertise STARTTLS; continuing without TLS")
                return
            raise self._fail(status.TLS, "Host did not advertise STARTTLS")
        reply = self._cmd("STARTTLS")
        if reply.code != 220:
            if o.tls == "optional":
                return
            raise self._fail(status.TLS, "STARTTLS attempted but failed")
        assert self.server is not None
        self.handshake(self.server.host)
        self._stop_after("tls")
        self._ehlo(after_tls=True)

    def _auth_mechanisms(self) -> list[str]:
        offered: list[str] = []
        for key, value in self.ext.items():
            if key == "AUTH":
                offered += value.upper().split()
            elif key.startswith("AUTH="):  # pre-RFC 4954 servers
                offered += (key[5:] + " " + value).upper().split()
        wanted = self.opts.auth or AUTH_PREFERENCE
        return [m for m in wanted if m in offered]

    def _auth(self) -> None:
        o = self.opts
        self.stage = "auth"
        if not self.ext.keys() & {"AUTH"} and not any(k.startswith("AUTH=") for k in self.ext):
            raise self._fail(status.AUTH, "Host did not advertise authentication")
        mechanisms = self._auth_mechanisms()
        if not mechanisms:
            raise self._fail(status.AUTH, "Host did not advertise a requested authentication "
                             "type (" + ", ".join(o.auth or AUTH_PREFERENCE) + ")")
        if not self.t.tls and not o.auth_plaintext:
            raise self._fail(status.AUTH, "Refusing to send credentials without TLS "
                             "(use --tls, or --auth-plaintext to allow it)")
        for mech in mechanisms:
            if authenticate(self._cmd, mech, o.auth_user, o.auth_password):
                return
        raise self._fail(status.AUTH, "No authentication type succeeded")

    def _mail_command(self, size: int, eight_bit: bool) -> str:
        o = self.opts
        params = []
        if "SIZE" in self.ext:
            params.append(f"SIZE={size}")
        if eight_bit and "8BITMIME" in self.ext:
            params.append("BODY=8BITMIME")
        if needs_utf8(o):
            params.append("SMTPUTF8")
        return " ".join([f"MAIL FROM:<{o.sender}>", *params])

    def _check_extensions(self) -> None:
        o = self.opts
        if needs_utf8(o) and "SMTPUTF8" not in self.ext:
            self.stage = "mail"
            raise self._fail(status.MAIL, "Host did not advertise SMTPUTF8")
        if o.chunking and "CHUNKING" not in self.ext and self.quit_point not in ("mail", "rcpt"):
            self.stage = "data"
            raise self._fail(status.DATA, "Host did not advertise CHUNKING")

    def _envelope(self, payload: list[bytes]) -> bool:
        """MAIL, RCPT... and (with DATA) DATA, pipelined if asked; True if DATA got 354."""
        o = self.opts
        size = sum(map(len, payload))
        mail = self._mail_command(size, any(not p.isascii() for p in payload))
        stop_at = self.quit_point
        with_data = not o.chunking and stop_at not in ("mail", "rcpt")
        commands = [mail] + ([f"RCPT TO:<{r}>" for r in o.to] if stop_at != "mail" else [])
        commands += ["DATA"] if with_data else []
        pipelined = o.pipeline and "PIPELINING" in self.ext
        if o.pipeline and not pipelined:
            self.t.info("Host did not advertise PIPELINING; sending commands one at a time")
        if pipelined:
            assert self.wire is not None
            self.wire.send(b"".join(c.encode("utf-8") + b"\r\n" for c in commands))
            for c in commands:
                self.t.sent(c)
            replies = [self.read_reply() for _ in commands]
        else:
            replies = []
            for c in commands:
                if c == "DATA" and not any(r.positive for r in replies[1:]):
                    break  # no recipient accepted: never send DATA
                reply = self._cmd(c)
                replies.append(reply)
                if c.startswith("MAIL") and not reply.positive:
                    break
        self.stage = "mail"
        if not replies[0].positive:
            self._end_pipelined_data(commands, replies)
            raise self._fail(status.MAIL)
        self._stop_after("mail")
        self.stage = "rcpt"
        rcpt_replies = replies[1 : 1 + len(o.to)]
        if not any(r.positive for r in rcpt_replies):
            self._end_pipelined_data(commands, replies)
            raise self._fail(status.RCPT)
        self._stop_after("rcpt")
        if not with_data:
            return False
        self.stage = "data"
        if replies[-1].code != 354:
            raise self._fail(status.DATA)
        return True

    def _end_pipelined_data(self, commands: list[str], replies: list[Reply]) -> None:
        # A pipelined DATA may get 354 although nothing was accepted: end it with an empty
        # message so the server is ready for QUIT.
        if commands[-1] == "DATA" and len(replies) == len(commands) and replies[-1].code == 354:
            assert self.wire is not None
            self._cmd(".")

    def _data(self, payload: list[bytes]) -> None:
        o = self.opts
        assert self.wire is not None
        if self.quit_point == "data":
            self.t.info("Closing the connection without sending the message (--quit-after data)")
            raise Stop(status.OK, quit=False)
        body = b"".join(payload) + b"".join(o.raw_lines)
        if body and not body.endswith(b"\r\n"):
            body += b"\r\n"  # the end-of-data marker needs a CRLF before the dot
        self.wire.send(body + b".\r\n")
        self._show_data(payload)
        if not o.suppress_data:  # swaks' -n count stands for the dot too
            self.t.sent(".")
        self.stage = "dot"
        if not self.read_reply().positive:
            raise self._fail(status.DOT)

    def _show_data(self, payload: list[bytes]) -> None:
        o = self.opts
        if o.suppress_data:
            count = sum(p.count(b"\n") for p in payload)
            self.t.sent(f"{count} lines sent")
        elif o.no_fixup:
            for line in b"".join(payload).split(b"\r\n")[:-1] if payload else []:
                self.t.sent(line, odd=b"\r" in line or b"\n" in line)
        else:
            for line in payload:
                odd = not line.endswith(b"\r\n")
                self.t.sent(line if odd else line[:-2], odd=odd)
        for raw in o.raw_lines:
            self.t.sent(raw, odd=True)

    def _bdat(self, payload: list[bytes]) -> None:
        o = self.opts
        assert self.wire is not None
        self.stage = "data"
        # BDAT carries the message as is: no dot-stuffing (RFC 3030).
        if o.no_fixup:
            message = o.message
        else:
            message = b"".join(ln + o.line_ending for ln in lines_of(o.message))
        message += b"".join(o.raw_lines)
        if self.quit_point == "data":
            self.t.info("Closing the connection without sending the message (--quit-after data)")
            raise Stop(status.OK, quit=False)
        chunks = [message[i : i + o.chunk_size]
                  for i in range(0, len(message), o.chunk_size)] or [b""]
        for n, chunk in enumerate(chunks):
            last = n == len(chunks) - 1
            command = f"BDAT {len(chunk)}" + (" LAST" if last else "")
            self.wire.send(command.encode() + b"\r\n" + chunk)
            self.t.sent(command)
            if o.suppress_data:
                self.t.sent(f"{len(chunk)} bytes sent")
            else:
                for line in chunk.split(b"\r\n")[: -1 if chunk.endswith(b"\r\n") else None]:
                    self.t.sent(line, odd=b"\r" in line or b"\n" in line)
            if last:
                self.stage = "dot"
            if not self.read_reply().positive:
                raise self._fail(status.DOT if last else status.DATA)

    def _quit(self) -> Reply | None:
        try:
            return self._cmd("QUIT")
        except ChatError:
            return None

    # --- the whole session -----------------------------------------------------------------

    def run(self) -> int:
        code = status.OK
        try:
            code = self._run()
        except Stop as stop:
            code = stop.code
            if stop.quit and self.wire is not None and not self.wire.closed:
                self._quit()
        except ChatError as e:
            self.t.error(str(e))
            self.error = str(e)
            code = e.exit_code
            if isinstance(e, ConnectionLost | ReplyTimeout) and self.stage == "banner":
                code = status.BANNER
        except OSError as e:  # e.g. the TLS key file cannot be read
            self.t.error(str(e))
            self.error = str(e)
            code = status.CONNECT
        finally:
            if self.wire is not None:
                self.wire.close()
                self.t.info("Connection closed with remote host.")
        self.code = code
        return code

    def _run(self) -> int:
        o = self.opts
        banner = self.connect()
        if not banner.positive:
            raise self._fail(status.BANNER)
        self._stop_after("banner")
        self._ehlo(after_tls=o.tls == "on-connect")
        if o.tls in ("required", "optional"):
            self._stop_after("first-ehlo")
            self._starttls()
        self._stop_after("first-ehlo")
        self._stop_after("tls")
        self._stop_after("ehlo")
        if o.auth is not None:
            self._auth()
        self._stop_after("auth")
        payload = wire_lines(o)
        self._check_extensions()
        data_ok = self._envelope(payload)
        if o.chunking:
            self._bdat(payload)
        elif data_ok:
            self._data(payload)
        self.stage = "quit"
        reply = self._quit()
        if reply is not None and reply.code != 221:
            # Anything but 221 here means the server is out of step with us: it answered
            # something we never sent as a command (e.g. smuggled lines inside DATA).
            self.error = "Unexpected reply to QUIT: the server and smtpchat are out of step"
            self.t.error(self.error)
            return status.QUIT
        return status.OK

    def outcome(self) -> dict[str, Any]:
        """The result for --json: exit code, stage reached, server, TLS details."""
        tls = self.wire.tls if self.wire is not None else None
        server = self.server
        return {
            "exit_code": self.code,
            "stage": self.stage,
            "error": self.error,
            "server": None if server is None else {
                "host": server.host, "address": server.ip, "port": server.port},
            "tls": None if tls is None else {
                "version": tls.version, "cipher": tls.cipher, "bits": tls.bits,
                "verified": tls.verified,
                "certificate": None if tls.cert is None else tls.cert._asdict()},
        }


def authenticate(cmd: Callable[[str, str | None], Reply], mech: str, user: str,
                 password: str) -> bool:
    """One AUTH exchange through ``cmd(line, shown)``; the password (or its digest) never shown."""
    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode("ascii")

    u, p = user.encode("utf-8"), password.encode("utf-8")
    if mech == "PLAIN":
        initial = b64(sasl.plain(user, password))
        reply = cmd(f"AUTH PLAIN {initial}", f"AUTH PLAIN {MASK}")
    elif mech == "LOGIN":
        answers = sasl.login(user, password)
        reply = cmd("AUTH LOGIN", None)
        if reply.code == 334:
            reply = cmd(b64(answers[0]), None)
        if reply.code == 334:
            reply = cmd(b64(answers[1]), MASK)
    elif mech == "CRAM-MD5":
        reply = cmd("AUTH CRAM-MD5", None)
        if reply.code == 334:
            try:
                challenge = base64.b64decode(reply.lines[0][4:], validate=True)
            except ValueError:
                challenge = b""
            digest = hmac.new(p, challenge, hashlib.md5).hexdigest()
            reply = cmd(b64(u + b" " + digest.encode()), MASK)
    else:
        return False
    if reply.code == 334:  # the server wants more than we have: cancel the exchange
        if cmd("*", None).code == 334:
            # not cancelled: whatever we sent next (another AUTH, QUIT) would be an answer
            raise ProtocolError(f"The server went on with AUTH {mech} after it was cancelled")
        return False
    return reply.positive
