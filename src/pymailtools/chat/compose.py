"""The test message smtpchat sends: composed with the email package, or the user's own DATA."""

from __future__ import annotations

import datetime
import email.policy
import mimetypes
import os
import sys
from collections.abc import Sequence
from email.message import EmailMessage
from email.utils import format_datetime, localtime, make_msgid

from pymailtools import __version__

DEFAULT_BODY = "This is a test mailing"
X_MAILER = f"smtpchat (pymailtools {__version__})"


class ComposeError(ValueError):
    """A header, body or attachment cannot be turned into a message."""


def read_source(spec: str, stdin: bytes | None = None) -> bytes:
    """swaks' argument forms: ``@file``, ``-`` (standard input) or the literal text."""
    if spec == "-":
        if stdin is None:
            return sys.stdin.buffer.read()
        return stdin
    if spec.startswith("@"):
        try:
            with open(spec[1:], "rb") as f:
                return f.read()
        except OSError as e:
            raise ComposeError(f"cannot read {spec[1:]}: {e.strerror}") from None
    return spec.encode("utf-8")


def _split_header(spec: str) -> tuple[str, str]:
    name, colon, value = spec.partition(":")
    name = name.strip()
    if not colon or not name or any(c in name for c in " \t\r\n") or not name.isascii():
        raise ComposeError(f"not a header (Name: value): {spec!r}")
    if any(c in value for c in "\r\n\x00"):
        raise ComposeError(f"header value contains CR, LF or NUL: {spec!r}")
    return name, value.strip()


def compose(sender: str, recipients: list[str], *, subject: str | None = None,
            body: bytes | None = None, headers: Sequence[str] = (),
            add_headers: Sequence[str] = (), attachments: Sequence[str] = (),
            hostname: str = "localhost", utf8: bool = False, now: float | None = None) -> bytes:
    """The message as bytes with CRLF line ends, ready for dot-stuffing.

    ``headers`` replace a header of the same name (or add it), ``add_headers`` always add, as
    swaks' --header and --add-header do.
    """
    policy = email.policy.SMTPUTF8 if utf8 else email.policy.SMTP
    msg = EmailMessage(policy=policy)
    when = localtime() if now is None else localtime(_from_timestamp(now))
    date = format_datetime(when)
    try:
        msg["Date"] = date
        msg["To"] = ", ".join(recipients)
        msg["From"] = sender or "<>"
        msg["Subject"] = f"test {date}" if subject is None else subject
        msg["Message-ID"] = make_msgid(domain=hostname)
        msg["X-Mailer"] = X_MAILER
        for spec in headers:
            name, value = _split_header(spec)
            del msg[name]
            msg[name] = value
        for spec in add_headers:
            name, value = _split_header(spec)
            msg[name] = value
    except (ValueError, TypeError) as e:
        raise ComposeError(str(e)) from None
    text = (DEFAULT_BODY.encode() if body is None else body).decode("utf-8", "replace")
    if not text.endswith("\n"):
        text += "\n"
    msg.set_content(text)
    for path in attachments:
        data = read_source(path if path.startswith("@") or path == "-" else "@" + path)
        ctype, _ = mimetypes.guess_type(path.lstrip("@"))
        maintype, _, subtype = (ctype or "application/octet-stream").partition("/")
        filename = os.path.basename(path.lstrip("@")) if path != "-" else "stdin"
        if maintype == "text":
            msg.add_attachment(data.decode("utf-8", "replace"), subtype=subtype,
                               filename=filename)
        else:
            msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    try:
        return msg.as_bytes(policy=policy)
    except (ValueError, TypeError, UnicodeError) as e:
        raise ComposeError(str(e)) from None


def _from_timestamp(t: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(t, datetime.UTC)


def expand_tokens(data: bytes, sender: str, recipients: list[str], hostname: str,
                  now: float | None = None) -> bytes:
    """swaks' --data tokens: %FROM_ADDRESS%, %TO_ADDRESS%, %DATE%, %MESSAGEID%, %NEWLINE%."""
    date = format_datetime(localtime() if now is None else localtime(_from_timestamp(now)))
    values = {
        b"%FROM_ADDRESS%": sender.encode(), b"%TO_ADDRESS%": ", ".join(recipients).encode(),
        b"%DATE%": date.encode(), b"%MESSAGEID%": make_msgid(domain=hostname).encode(),
        b"%NEWLINE%": b"\n",
    }
    for token, value in values.items():
        data = data.replace(token, value)
    return data


def lines_of(data: bytes) -> list[bytes]:
    """Message lines without endings; CRLF, bare LF and bare CR all end a line (normalising first,
    so dot-stuffing later sees every line start, a bare CR's too)."""
    text = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if text.endswith(b"\n"):
        text = text[:-1]
    return text.split(b"\n") if text else []


def unescape(text: str) -> bytes:
    """C-style escapes of --raw-line (\\r, \\n, \\t, \\\\, \\xHH) as the bytes they name."""
    out = bytearray()
    i = 0
    raw = text.encode("utf-8")
    while i < len(raw):
        c = raw[i : i + 1]
        if c == b"\\" and i + 1 < len(raw):
            n = raw[i + 1 : i + 2]
            simple = {b"r": b"\r", b"n": b"\n", b"t": b"\t", b"\\": b"\\", b"0": b"\x00"}
            if n in simple:
                out += simple[n]
                i += 2
                continue
            if n == b"x" and i + 4 <= len(raw):
                try:
                    out.append(int(raw[i + 2 : i + 4], 16))
                    i += 4
                    continue
                except ValueError:
                    pass
        out += c
        i += 1
    return bytes(out)

