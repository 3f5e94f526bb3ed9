"""SASL client responses (PLAIN, LOGIN, XOAUTH2, OAUTHBEARER) as raw bytes, before base64:
the one encoding of each that the SMTP client, mail's IMAP/POP3 sessions and smtpchat send."""

from __future__ import annotations


def _b(text: str) -> bytes:
    # surrogate escapes stand for the bytes a name or secret was read as
    return text.encode("utf-8", "surrogateescape")


def plain(user: str, password: str) -> bytes:
    """RFC 4616 PLAIN: no authorization identity, then the user and the password."""
    return b"\0" + _b(user) + b"\0" + _b(password)


def login(user: str, password: str) -> tuple[bytes, bytes]:
    """LOGIN (draft-murchison-sasl-login): the user, then the password, each the answer to
    one server challenge."""
    return _b(user), _b(password)


def xoauth2(user: str, token: str) -> bytes:
    """Google's and Microsoft's XOAUTH2."""
    return b"user=" + _b(user) + b"\x01auth=Bearer " + _b(token) + b"\x01\x01"


def saslname(user: str) -> bytes:
    """RFC 5801's saslname, as RFC 7628's GS2 header carries the user: "=" and "," escaped."""
    return _b(user).replace(b"=", b"=3D").replace(b",", b"=2C")


def oauthbearer(user: str, token: str, host: str | None = None,
                port: int | None = None) -> bytes:
    """RFC 7628 OAUTHBEARER: the GS2 header (no channel binding, the user as authorization
    identity), then host and port when given, then the token."""
    pairs = b""
    if host is not None:
        pairs += b"host=" + _b(host) + b"\x01"
    if port is not None:
        pairs += b"port=" + str(port).encode() + b"\x01"
    return (b"n,a=" + saslname(user) + b",\x01" + pairs + b"auth=Bearer " + _b(token)
            + b"\x01\x01")
