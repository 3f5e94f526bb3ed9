"""How the SMTP client talks to a next hop: TLS level, credentials, timeouts, our name.

One immutable ``Policy`` is built from the configuration (``Policy.from_config``); callers
derive variants with ``clone(**changes)`` as ``email.policy`` does, e.g.
``policy.clone(implicit_tls=True)`` for a port-465 relayhost or an ``smtps://`` server.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
import stat
from typing import Any, NamedTuple

from pymailtools.config import Config
from pymailtools.errors import ConfigError, HopError

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
    ``implicit_tls`` starts TLS on connect (port 465) and then skips STARTTLS.
    Credentials are used only when ``username`` is set and the server offers AUTH."""

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
    # certificate must match, one of them
    fingerprints: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"unknown TLS security level {self.level!r}")

    @classmethod
    def from_config(cls, cfg: Config) -> Policy:
        """The policy the configuration's smtp_* keys describe."""
        return cls(
            helo_name=cfg.myhostname,
            level=cfg.smtp_tls_security_level,
            ca_file=cfg.smtp_tls_CAfile or None,
            username=cfg.smtp_sasl_username,
            password=cfg.smtp_sasl_password,
            password_file=cfg.smtp_sasl_password_file,
            allow_plaintext=cfg.smtp_sasl_allow_plaintext,
            timeouts=Timeouts(*(float(max(getattr(cfg, f"smtp_{k}_timeout"), 1))
                                for k in Timeouts._fields)),
        )

    def clone(self, **changes: Any) -> Policy:
        """A copy with ``changes`` applied (unknown names raise TypeError)."""
        return dataclasses.replace(self, **changes)

    @property
    def verify(self) -> bool:
        """Whether the server's certificate must verify."""
        return self.level == "verify"

    def read_password(self) -> str:
        """The AUTH password; from the file only if nobody else can read or replace it.

        Raises ConfigError with a one-line reason."""
        if self.password or not self.password_file:
            return self.password
        path = self.password_file
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise ConfigError(
                f"cannot open smtp_sasl_password_file {path}: {e.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077 or \
                    st.st_uid not in (0, os.geteuid()):
                raise ConfigError(
                    f"smtp_sasl_password_file {path} must be a regular file owned by root "
                    "(or the runner's user) with mode 0600 or stricter")
            text = f.read(4096).decode("utf-8", "replace")
        return text.splitlines()[0] if text else ""

    def tls_context(self) -> ssl.SSLContext:
        """The client context for this policy's level (checked against the host name when
        verifying; SNI is sent either way)."""
        if self.verify:
            try:
                ctx = ssl.create_default_context(cafile=self.ca_file)
            except (OSError, ssl.SSLError) as e:  # a missing or unreadable CA file
                raise HopError(f"cannot load the CA file {self.ca_file}: "
                               f"{getattr(e, 'strerror', None) or e}", "4.7.5") from None
        else:
            # Opportunistic/mandatory encryption without authentication (Postfix may/encrypt):
            # self-signed certificates are the norm on MX hosts.
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx
