"""What the IMAP and POP3 clients share: s-nail's remote-folder URLs, credentials, the errors,
size limits and the per-message summary a remote folder hands to its reader."""

from __future__ import annotations

import socket
import ssl
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from pymailtools.config import Config
from pymailtools.errors import (
    EX_CONFIG,
    EX_DATAERR,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    MailError,
    UsageError,
)
from pymailtools.mua import account
from pymailtools.mua.account import SCHEMES

# The remote-folder schemes among mua.account's SCHEMES (which give port, protocol, TLS).
FOLDER_SCHEMES = ("imap", "imaps", "pop3", "pop3s")
# Seconds to wait for any single read or write before calling the connection lost.
DEFAULT_TIMEOUT = 60.0
# The header fields a one-line summary (``h``, ``-H``) shows or sorts by.
SUMMARY_FIELDS = ("FROM", "TO", "CC", "SUBJECT", "DATE", "MESSAGE-ID", "STATUS", "X-STATUS",
                  "CONTENT-TYPE")
# The most header bytes we accept for one message's summary fields.
HEADER_LIMIT = 1 << 20
# Without message_size_limit (0) a message may still not exceed this.
HARD_LIMIT = 1 << 30


class RemoteError(MailError):
    """A remote folder cannot be used: the server refused us (login, TLS, a NO answer) (69)."""

    exit_code = EX_UNAVAILABLE


class RemoteLost(RemoteError, ConnectionError):
    """Connecting failed, the connection broke or a read timed out: may work later (75)."""

    exit_code = EX_TEMPFAIL


class RemoteProtocolError(RemoteError):
    """The server's bytes break the protocol or our limits (a malformed response, a literal
    over the limit, a message count that shrinks by itself); the session is unusable (65)."""

    exit_code = EX_DATAERR


class RemoteURL(NamedTuple):
    """A parsed ``imaps://user@host[:port][/FOLDER]`` (or imap, pop3s, pop3)."""

    scheme: str
    user: str
    host: str
    port: int
    folder: str  # "" for POP3 (one mailbox) and "INBOX" when an IMAP URL names none
    password: str  # from ``user:password@``: usable, but visible in ps(1)

    @property
    def implicit_tls(self) -> bool:
        return SCHEMES[self.scheme].implicit_tls

    @property
    def protocol(self) -> str:
        return SCHEMES[self.scheme].protocol

    def account(self) -> str:
        """``user@host:port``: how s-nail names the account (password-USER@HOST:PORT)."""
        return f"{self.user}@{self.host}:{self.port}"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = "" if SCHEMES[self.scheme].port == self.port else f":{self.port}"
        user = urllib.parse.quote(self.user, safe="") + "@" if self.user else ""
        folder = "/" + urllib.parse.quote(self.folder, safe="/") if self.folder else ""
        return f"{self.scheme}://{user}{host}{port}{folder}"


def is_remote(name: str) -> bool:
    """Whether a folder name is one of our remote URLs."""
    return name.split("://", 1)[0].lower() in FOLDER_SCHEMES and "://" in name


def parse_url(text: str) -> RemoteURL:
    """Parse an s-nail remote folder URL (mua.account's parser, then the folder part); the
    user name is percent-decoded.

    Raises UsageError for anything else (unknown scheme, no host, a bad port, a folder in a
    POP3 URL), never quoting a password."""
    url = account.parse_url(text, schemes=FOLDER_SCHEMES)
    folder = urllib.parse.unquote(url.path)
    if url.scheme.startswith("pop3") and folder:
        raise UsageError(f"bad mailbox URL {url.shown}/...: a POP3 server has one mailbox, "
                         "no folders")
    if url.scheme.startswith("imap") and not folder:
        folder = "INBOX"
    if any(ord(c) < 32 or ord(c) == 127 for c in url.user + url.password + folder):
        raise UsageError(f"bad mailbox URL {url.shown}: control characters")
    return RemoteURL(url.scheme, url.user, url.host, url.port, folder, url.password)


def account_settings(config: Config, url_text: str, variables: Mapping[str, str], *,
                     login: str, warn: Callable[[str], None]
                     ) -> tuple[RemoteURL, Credentials, Connection]:
    """The URL, the credentials and the connection settings of a remote mailbox, from mail's
    s-nail variables through mua.account (user and password chains, .netrc, tls-* into the
    TLS context of a Policy). ``login`` is the user when neither the URL nor the variables
    name one. A password in the URL and unchecked certificates are reported through
    ``warn``."""
    url = parse_url(url_text)
    if url.password:
        warn(f"the password in {url} is visible to every user in ps(1); "
             "set password-USER@HOST in ~/.mailrc, or netrc-lookup, instead")
    user = url.user or account.account_user(variables, url.protocol, "", url.host,
                                            url.port) or login
    url = url._replace(user=user)
    policy = account.server_policy(config, variables, scheme=url.scheme, user=user,
                                   host=url.host, port=url.port, url_password=url.password)
    if account.unverified(variables, user, url.host, url.port):
        warn(f"{url.host}: tls-verify is set: the server's certificate is not checked")
    token = bool(policy.token_command) or bool({"xoauth2", "oauthbearer"} & set(policy.mechanisms))

    def secret() -> str:
        """Run only when the server asks for credentials (a password command may prompt)."""
        from pymailtools.smtp import secret as commands

        proto = url.protocol
        if policy.token_command:
            return commands.token(policy.token_command, policy.command_timeout,
                                  f"{proto}-auth-oauth2-token-command")
        if not policy.password and policy.password_command:
            return commands.password(policy.password_command, policy.command_timeout,
                                     f"{proto}-auth-password-command")
        return policy.read_password()

    try:
        tls = policy.tls_context()
    except MailError as e:  # an unreadable tls-ca-file
        raise MailError(str(e), EX_CONFIG) from None
    return url, Credentials(policy.username or user, secret, token=token), \
        Connection.for_url(url, tls)


@dataclass(frozen=True)
class Credentials:
    """Who logs in, and how the secret is obtained (only when the server asks for it).

    ``secret`` returns the password, or with ``token`` an OAuth2 access token (used with
    XOAUTH2 / OAUTHBEARER). ``allow_plaintext`` lets a password travel without TLS."""

    user: str
    secret: Callable[[], str] = field(repr=False)
    token: bool = False
    allow_plaintext: bool = False


@dataclass(frozen=True)
class Connection:
    """Where and how to connect: host, port, TLS from the first byte or by STARTTLS/STLS, the
    TLS context that checks the server's certificate, and the timeout of each read."""

    host: str
    port: int
    implicit_tls: bool
    tls: ssl.SSLContext
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def for_url(cls, url: RemoteURL, tls: ssl.SSLContext,
                timeout: float = DEFAULT_TIMEOUT) -> Connection:
        return cls(url.host, url.port, url.implicit_tls, tls, timeout)


class MessageInfo(NamedTuple):
    """One remote message as a folder summary needs it: its lasting ``uid`` (IMAP UID as
    text, POP3 UIDL), its number in this session, size, flags (IMAP system flags such as
    ``\\Seen``; empty for POP3) and the summary header fields (raw, CRLF)."""

    uid: str
    number: int
    size: int
    flags: frozenset[str]
    header: bytes
    arrived: str = ""  # IMAP INTERNALDATE ("06-Dec-2026 12:38:00 +0000"); "" when not given


def message_limit(config: Config) -> int:
    """The most bytes we read of one remote message: message_size_limit, as for mail that
    arrives by SMTP."""
    return config.message_size_limit or HARD_LIMIT


def crlf_to_lf(data: bytes) -> bytes:
    """Wire text (CRLF) as the local mailbox stores it (LF)."""
    return data.replace(b"\r\n", b"\n")


def describe_tls_error(host: str, e: ssl.SSLError | ssl.CertificateError) -> str:
    """One line for a failed TLS handshake, naming the certificate problem when it is one."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"{host}: TLS certificate not trusted: {e.verify_message or e.reason or e}"
    return f"{host}: TLS handshake failed: {getattr(e, 'reason', None) or e}"


def connection_error(host: str, e: BaseException) -> RemoteError:
    """A socket or TLS failure as one line: TLS trouble is ours to fix (69), the rest may
    pass (75)."""
    if isinstance(e, RemoteError):
        return e
    if isinstance(e, (ssl.SSLError, ssl.CertificateError)):
        return RemoteError(describe_tls_error(host, e))
    if isinstance(e, TimeoutError):
        return RemoteLost(f"{host}: timed out waiting for the server")
    if isinstance(e, ConnectionRefusedError):
        return RemoteLost(f"{host}: connection refused")
    if isinstance(e, socket.gaierror):
        return RemoteLost(f"{host}: cannot resolve host: {e.strerror}")
    if isinstance(e, EOFError):
        return RemoteLost(f"{host}: connection closed by the server")
    if isinstance(e, OSError):
        return RemoteLost(f"{host}: {e.strerror or e}")
    return RemoteLost(f"{host}: {e}")
