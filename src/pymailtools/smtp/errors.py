"""The SMTP client's branch of the exception tree: a session with a next hop failed.

Its recipients are deferred with ``status``. Not in pymailtools.errors: sendmail's submission
path loads that module and never needs these.
"""

from pymailtools.errors import EX_TEMPFAIL, MailError


class SMTPError(MailError):
    """The SMTP client's session with a next hop failed; its recipients are deferred with
    ``status``."""

    exit_code = EX_TEMPFAIL
    status = "4.4.2"


class HopError(SMTPError):
    """Connecting, the greeting, EHLO, STARTTLS or AUTH failed at one address, before any
    transaction: the caller tries the next address. ``tls``: a TLS handshake failed (level
    ``may`` retries the address in plaintext)."""

    def __init__(self, reason: str, status: str = "4.4.2", *, tls: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.tls = tls


class Lost(SMTPError, ConnectionError):
    """The connection closed or timed out in the middle of a transaction."""


class ProtocolError(SMTPError):
    """The server sent something that is not an SMTP reply, or a reply over the size limits."""

    status = "4.5.0"
