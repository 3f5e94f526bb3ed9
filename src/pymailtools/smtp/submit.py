"""Handing one composed message to an SMTP server the user named (mail -t HOST, -S smtp=).

A deliberately small client on aiosmtplib: connect, EHLO, opportunistic STARTTLS, one
transaction. It stands in until the project's shared SMTP transport (client.py) lands, which
should then replace ``send`` here; the exit-code mapping below is the contract to keep.
"""

from __future__ import annotations

import socket

from pymailtools.errors import EX_NOHOST, EX_UNAVAILABLE, MailError, UsageError

DEFAULT_PORT = 25
TIMEOUT = 60.0


class SmtpSendError(MailError):
    """The server did not accept the message (69), or its name did not resolve (68)."""

    exit_code = EX_UNAVAILABLE


def parse_server(text: str) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT``, ``[v6addr]:PORT`` or ``smtp://HOST:PORT`` → (host, port)."""
    spec = text
    if "://" in spec:
        scheme, _, spec = spec.partition("://")
        if scheme.lower() != "smtp":
            raise UsageError(f"unsupported mail transfer URL (only smtp://): {text}")
        spec = spec.rstrip("/").rpartition("@")[2]  # user@ parts: no AUTH in this client
    port = DEFAULT_PORT
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise UsageError(f"bad SMTP server: {text}")
            port = _port(rest[1:], text)
    elif spec.count(":") == 1:
        host, _, p = spec.partition(":")
        port = _port(p, text)
    else:
        host = spec
    if not host or any(c.isspace() or ord(c) < 0x20 or c in "/@" for c in host):
        raise UsageError(f"bad SMTP server: {text}")
    return host, port


def _port(p: str, text: str) -> int:
    if not p.isdigit() or not 0 < int(p) < 65536:
        raise UsageError(f"bad port in SMTP server: {text}")
    return int(p)


def send(host: str, port: int, sender: str, recipients: list[str], message: bytes, *,
         helo: str, timeout: float = TIMEOUT) -> None:
    """Send or raise SmtpSendError: success means the server took it for every recipient."""
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise SmtpSendError(f"{host}: cannot resolve host name: {e.strerror}",
                            EX_NOHOST) from None
    import asyncio

    asyncio.run(_send(host, port, sender, recipients, message, helo, timeout))


async def _send(host: str, port: int, sender: str, recipients: list[str], message: bytes,
                helo: str, timeout: float) -> None:
    import aiosmtplib

    # start_tls=None: STARTTLS when offered. Certificates are not verified, as with Postfix's
    # "may" level: the alternative to an unverified TLS session here is plain text, not failure.
    client = aiosmtplib.SMTP(hostname=host, port=port, local_hostname=helo, timeout=timeout,
                             start_tls=None, validate_certs=False)
    where = f"{host}[{port}]"
    try:
        await client.connect()
    except aiosmtplib.SMTPException as e:
        raise SmtpSendError(f"cannot connect to {where}: {_reason(e)}") from None
    try:
        errors, _ = await client.sendmail(sender, recipients, message)
    except aiosmtplib.SMTPRecipientsRefused as e:
        refused = ", ".join(f"{r.recipient} ({r.code} {r.message})" for r in e.recipients)
        raise SmtpSendError(f"{where} refused all recipients: {refused}") from None
    except aiosmtplib.SMTPException as e:
        raise SmtpSendError(f"{where} did not accept the message: {_reason(e)}") from None
    finally:
        try:
            await client.quit()
        except aiosmtplib.SMTPException:
            client.close()
    if errors:
        refused = ", ".join(f"{r} ({code} {text})" for r, (code, text) in errors.items())
        raise SmtpSendError(f"{where} accepted the message for some recipients but refused "
                            f"{refused}")


def _reason(e: Exception) -> str:
    code = getattr(e, "code", None)
    text = getattr(e, "message", None) or str(e)
    text = " ".join(text.split())
    return f"{code} {text}" if code else text
