"""How the SMTP client talks to a next hop: TLS level, credentials, timeouts, our name.

One immutable ``Policy`` is built from the configuration (``Policy.from_config``); callers
derive variants with ``clone(**changes)`` as ``email.policy`` does, e.g.
``policy.clone(implicit_tls=True)`` for a port-465 relayhost or an ``smtps://`` server.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import ssl
from typing import Any, NamedTuple

from pymailtools.config import Config
from pymailtools.errors import ConfigError
from pymailtools.fileio import not_private
from pymailtools.smtp import secret
from pymailtools.smtp.errors import HopError

# Postfix's smtp_tls_security_level words
LEVELS = ("none", "may", "encrypt", "verify", "fingerprint")


class Timeouts(NamedTuple):
    """Seconds to wait for each step (Postfix's smtp_*_timeout)."""

    connect: float
    helo: float
    starttls: float
    mail: float
    rcpt: float
    data_init: float
    data_xfer: float
    data_done: float
    rset: float
    quit: float


DEFAULT_TIMEOUTS = Timeouts(30, 300, 300, 300, 300, 120, 180, 600, 20, 300)


@dataclasses.dataclass(frozen=True)
class Policy:
    """Settings of SMTP client sessions. Immutable: derive a variant with ``clone``.

    ``level`` is ``none`` (no TLS), ``may`` (STARTTLS when offered, certificate not checked),
    ``encrypt`` (STARTTLS required, not checked) or ``verify`` (STARTTLS required and the
    certificate must verify against ``ca_file`` or the system's CAs for the host name).
    ``fingerprint`` (STARTTLS required, the SHA-256 digest of the certificate or of its public
    key must be one of ``fingerprints``). ``implicit_tls`` starts TLS on connect (port 465, or
    smtp_tls_wrappermode) and then skips STARTTLS.
    Credentials are used only when ``username`` (or a token command) is set and the server
    offers AUTH."""

    helo_name: str = "localhost"
    level: str = "may"
    ca_file: str | None = None
    implicit_tls: bool = False
    username: str = ""
    password: str = dataclasses.field(default="", repr=False)  # never in a log line
    password_file: str = ""
    allow_plaintext: bool = False
    timeouts: Timeouts = DEFAULT_TIMEOUTS
    # A command whose first output line is the AUTH password (instead of password/-file).
    password_command: str = ""
    # A command that prints an OAuth2 access token, for the xoauth2/oauthbearer mechanisms.
    token_command: str = ""
    # SASL mechanisms we may use, lower case, in order of preference; () = plain, then login.
    mechanisms: tuple[str, ...] = ()
    ca_path: str | None = None  # a directory of hashed CA certificates (c_rehash)
    ca_defaults: bool = True  # also trust the system's CAs when verifying
    cert_file: str = ""  # our client certificate (PEM), with key_file or the key inside
    key_file: str = ""
    # level "fingerprint": the SHA-256 digests (hex, colons optional) the server's
    # certificate or its public key must match, one of them
    fingerprints: tuple[str, ...] = ()
    command_timeout: float = secret.DEFAULT_TIMEOUT  # for password_command and token_command

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"unknown TLS security level {self.level!r}")

    @classmethod
    def from_config(cls, cfg: Config) -> Policy:
        """The policy the configuration's smtp_* keys describe. Raises ConfigError for a
        fingerprint setting that cannot be used."""
        if cfg.smtp_tls_fingerprint_digest.lower() != "sha256":
            raise ConfigError(f"smtp_tls_fingerprint_digest: only sha256 is supported, got "
                              f"{cfg.smtp_tls_fingerprint_digest!r}")
        for item in cfg.smtp_tls_fingerprint_cert_match:
            digits = item.replace(":", "").lower()
            if len(digits) != 64 or any(c not in "0123456789abcdef" for c in digits):
                raise ConfigError(f"smtp_tls_fingerprint_cert_match: not a SHA-256 fingerprint "
                                  f"(64 hex digits, colons allowed): {item!r}")
        return cls(
            helo_name=cfg.myhostname,
            level=cfg.smtp_tls_security_level,
            ca_file=cfg.smtp_tls_CAfile or None,
            username=cfg.smtp_sasl_username,
            password=cfg.smtp_sasl_password,
            password_file=cfg.smtp_sasl_password_file,
            allow_plaintext=cfg.smtp_sasl_allow_plaintext,
            password_command=cfg.smtp_sasl_password_command,
            token_command=cfg.smtp_sasl_oauth2_token_command,
            mechanisms=tuple(m.lower() for m in cfg.smtp_sasl_mechanism_filter),
            implicit_tls=cfg.smtp_tls_wrappermode,
            ca_path=cfg.smtp_tls_CApath or None,
            # Postfix (tls_append_default_CA = no): a configured CA file or directory is
            # the whole trust; the system's CAs only when neither is set
            ca_defaults=not (cfg.smtp_tls_CAfile or cfg.smtp_tls_CApath),
            cert_file=cfg.smtp_tls_cert_file,
            key_file=cfg.smtp_tls_key_file,
            fingerprints=tuple(cfg.smtp_tls_fingerprint_cert_match),
            command_timeout=float(max(cfg.smtp_sasl_command_timeout, 1)),
            timeouts=Timeouts(*(float(max(getattr(cfg, f"smtp_{k}_timeout"), 1))
                                for k in Timeouts._fields)),
        )

    def clone(self, **changes: Any) -> Policy:
        """A copy with ``changes`` applied (unknown names raise TypeError)."""
        return dataclasses.replace(self, **changes)

    def without_credentials(self) -> Policy:
        """A copy with no account: no user, password (given, file or command), token command;
        the site's relay account is never offered to a server it is not for."""
        return dataclasses.replace(self, username="", password="", password_file="",
                                   password_command="", token_command="")

    @property
    def verify(self) -> bool:
        """Whether the server's certificate must verify against the CAs."""
        return self.level == "verify"

    @property
    def tls_required(self) -> bool:
        """Whether the session must not go on without TLS."""
        return self.level in ("encrypt", "verify", "fingerprint")

    def read_password(self) -> str:
        """The AUTH password: given, printed by ``password_command``, or read from
        ``password_file`` only if nobody else can read or replace it.

        Raises ConfigError or secret.SecretError with a one-line reason (never the secret)."""
        if self.password:
            return self.password
        if self.password_command:
            return secret.password(self.password_command, self.command_timeout,
                                   "smtp_sasl_password_command")
        if not self.password_file:
            return ""
        path = self.password_file
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise ConfigError(
                f"cannot open smtp_sasl_password_file {path}: {e.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            if not_private(os.fstat(f.fileno())):
                raise ConfigError(
                    f"smtp_sasl_password_file {path} must be a regular file owned by root "
                    "(or the runner's user) with mode 0600 or stricter")
            text = f.read(4096).decode("utf-8", "replace")
        return text.splitlines()[0] if text else ""

    def read_token(self) -> str:
        """The OAuth2 access token ``token_command`` prints (kept while it is valid).
        Raises secret.SecretError."""
        return secret.token(self.token_command, self.command_timeout,
                            "smtp_sasl_oauth2_token_command")

    def tls_context(self) -> ssl.SSLContext:
        """The client context for this policy's level (checked against the host name when
        verifying; SNI is sent either way), with our client certificate if there is one.
        Raises HopError (a deferral reason) when a CA, certificate or key cannot be used."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.verify:
            try:
                if self.ca_defaults:
                    ctx.load_default_certs()
                if self.ca_file or self.ca_path:
                    ctx.load_verify_locations(cafile=self.ca_file, capath=self.ca_path)
            except (OSError, ssl.SSLError) as e:  # a missing or unreadable CA file
                where = " and ".join(x for x in (self.ca_file, self.ca_path) if x)
                raise HopError(f"cannot load the CA file {where}: "
                               f"{getattr(e, 'strerror', None) or e}", "4.7.5") from None
        else:
            # Opportunistic/mandatory encryption without authentication (Postfix may/encrypt),
            # or pinning, which looks at the certificate itself after the handshake:
            # self-signed certificates are the norm on MX hosts.
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            if self.level == "fingerprint" and not self.fingerprints:
                raise HopError("smtp_tls_security_level = fingerprint needs "
                               "smtp_tls_fingerprint_cert_match", "4.7.5")
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file:
            self._load_client_cert(ctx)
        return ctx

    def _load_client_cert(self, ctx: ssl.SSLContext) -> None:
        key = self.key_file or self.cert_file  # the key may be in the certificate file
        try:
            st = os.stat(key)
        except OSError as e:
            raise HopError(f"cannot use the client key {key}: {e.strerror}", "4.7.5") from None
        if not_private(st):
            raise HopError(f"the client key {key} must be a regular file owned by root "
                           "(or the runner's user) with mode 0600 or stricter", "4.7.5")
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file or None)
        except (OSError, ssl.SSLError) as e:
            raise HopError(f"cannot load the client certificate {self.cert_file}: "
                           f"{getattr(e, 'strerror', None) or e}", "4.7.5") from None

    def check_fingerprint(self, der: bytes | None, relay: str) -> None:
        """At level ``fingerprint``: raise HopError unless the certificate (DER) or its public
        key has one of the configured SHA-256 digests (Postfix matches either)."""
        if self.level != "fingerprint":
            return
        if der is None:
            raise HopError(f"host {relay} sent no certificate to match", "4.7.5")
        got = hashlib.sha256(der).hexdigest()
        key = public_key_info(der)
        wanted = {f.replace(":", "").strip().lower() for f in self.fingerprints}
        if got not in wanted and (key is None or hashlib.sha256(key).hexdigest() not in wanted):
            shown = ":".join(got[i:i + 2] for i in range(0, len(got), 2)).upper()
            raise HopError(f"Server certificate not verified: the fingerprint of {relay}'s "
                           f"certificate ({shown}) matches no smtp_tls_fingerprint_cert_match",
                           "4.7.5")


def _der_item(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of the contents, end) of the DER item at ``pos``; ValueError if cut short."""
    tag, length = data[pos], data[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if not 0 < n <= 4:
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos:pos + n], "big")
        pos += n
    if pos + length > len(data):
        raise ValueError("DER item runs past the end")
    return tag, pos, pos + length


def public_key_info(cert: bytes) -> bytes | None:
    """The DER SubjectPublicKeyInfo of a DER X.509 certificate (what a public key
    fingerprint is taken of), or None when the certificate cannot be read."""
    try:
        _, start, _ = _der_item(cert, 0)  # Certificate
        _, pos, end = _der_item(cert, start)  # TBSCertificate
        if cert[pos] == 0xA0:  # [0] version
            pos = _der_item(cert, pos)[2]
        # serialNumber, signature, issuer, validity, subject, then subjectPublicKeyInfo
        for _ in range(5):
            pos = _der_item(cert, pos)[2]
        tag, _, item_end = _der_item(cert, pos)
    except (ValueError, IndexError):
        return None
    return cert[pos:item_end] if tag == 0x30 and item_end <= end else None
