"""An aiosmtpd relay with SASL as providers do it: PLAIN/LOGIN for one password, XOAUTH2 and
OAUTHBEARER (RFC 7628) for one access token, the 334 error challenge with the server's JSON
on a wrong token, AUTH response lines longer than 1000 octets (RFC 4954 leaves the length of
a response line open; providers accept long tokens), TLS on connect or by STARTTLS, and
optionally a client certificate required."""

from __future__ import annotations

import base64
import json
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword

from tests.support.net import TIMEOUT, free_port

ERROR_CHALLENGE = {"status": "invalid_token", "scope": "https://mail.test/",
                   "schemes": "bearer"}


class LongLineSMTP(SMTP):
    """aiosmtpd reading lines up to 64 KiB (its default, 1001, is DATA's line limit), while
    commands keep RFC 5321's 512 octets."""

    line_length_limit = 1 << 16


@dataclass
class SaslHandler:
    """Accepts ``user`` with ``password`` (PLAIN, LOGIN) or ``token`` (XOAUTH2, OAUTHBEARER).

    ``attempts``: (mechanism, accepted); ``after_error``: what the client sent after an error
    challenge; ``commands``: every MAIL/RCPT seen; ``messages``: (sender, rcpts, login, tls)."""

    user: str
    password: str = ""
    token: str = ""
    attempts: list[tuple[str, bool]] = field(default_factory=list)
    after_error: list[bytes] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    messages: list[tuple[str, list[str], str, bool]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def check_password(self, server: Any, session: Any, envelope: Any, mechanism: str,
                       auth_data: Any) -> AuthResult:
        ok = isinstance(auth_data, LoginPassword) and bool(self.password) and \
            auth_data.login == self.user.encode() and auth_data.password == self.password.encode()
        with self.lock:
            self.attempts.append((mechanism, ok))
        return AuthResult(success=ok, handled=False, auth_data=auth_data)

    async def _initial(self, server: SMTP, args: list[str]) -> bytes | None:
        if len(args) > 1:
            return base64.b64decode(args[1], validate=True)
        got = await server.challenge_auth("")
        return None if got is MISSING else bytes(got)  # type: ignore[arg-type]

    async def _bearer(self, server: SMTP, mechanism: str, want: bytes,
                      got: bytes | None) -> AuthResult:
        ok = got is not None and bool(self.token) and got == want
        with self.lock:
            self.attempts.append((mechanism, ok))
        if ok:
            return AuthResult(success=True, auth_data=LoginPassword(self.user.encode(), b""))
        if got is None:
            return AuthResult(success=False, handled=True)
        # RFC 7628 3.2.2: the error as a 334 challenge, the client answers, then the failure
        answer = await server.challenge_auth(json.dumps(ERROR_CHALLENGE))
        with self.lock:
            self.after_error.append(b"<abort>" if answer is MISSING else bytes(answer))  # type: ignore[arg-type]
        if answer is MISSING:
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False,
                          message="535 5.7.8 Username and Password not accepted")

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        want = f"user={self.user}\x01auth=Bearer {self.token}\x01\x01".encode()
        return await self._bearer(server, "XOAUTH2", want, await self._initial(server, args))

    async def auth_OAUTHBEARER(self, server: SMTP, args: list[str]) -> AuthResult:
        want = f"n,a={self.user},\x01auth=Bearer {self.token}\x01\x01".encode()
        return await self._bearer(server, "OAUTHBEARER", want,
                                  await self._initial(server, args))

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        with self.lock:
            self.commands.append(f"MAIL {address}")
        envelope.mail_from = address
        return "250 2.1.0 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        login = session.auth_data.login.decode() if session.auth_data is not None else ""
        with self.lock:
            tls = server.transport.get_extra_info("ssl_object") is not None
            self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), login, tls))
        return "250 2.0.0 Ok: queued"


class _Controller(Controller):
    def factory(self) -> SMTP:
        return LongLineSMTP(self.handler, **self.SMTP_kwargs)


class SaslRelay:
    """The relay on 127.0.0.1 at a free port: ``implicit`` TLS (on connect) or STARTTLS with
    ``server_context``; AUTH only over TLS unless no context is given."""

    def __init__(self, handler: SaslHandler, server_context: ssl.SSLContext | None = None,
                 *, implicit: bool = False) -> None:
        self.handler = handler
        self.port = free_port(("127.0.0.1",))
        kw: dict[str, Any] = {"hostname": "127.0.0.1", "port": self.port,
                              "server_hostname": "relay.test", "ready_timeout": TIMEOUT,
                              "authenticator": handler.check_password,
                              # with TLS on connect aiosmtpd does not know it is encrypted
                              "auth_require_tls": server_context is not None and not implicit}
        if server_context is not None:
            kw["ssl_context" if implicit else "tls_context"] = server_context
        self.controller = _Controller(handler, **kw)
        self.controller.start()

    @property
    def hop(self) -> str:
        return f"[127.0.0.1]:{self.port}"

    def stop(self) -> None:
        self.controller.stop()
