"""smtpchat's branch of the exception tree; each carries the swaks exit code the session ends
with (chat.status), not a sysexits.h code."""

from pymailtools.chat import status
from pymailtools.errors import MailError


class ChatError(MailError):
    """Base class: ends the session with a one-line ``***`` message and ``exit_code``."""

    exit_code = status.CONNECTION_LOST


class ConnectFailed(ChatError, ConnectionError):
    """No address of the target accepted a TCP connection (or TLS on connect failed)."""

    exit_code = status.CONNECT


class ConnectionLost(ChatError, ConnectionError):
    """The server closed the connection while a reply was expected."""


class ReplyTimeout(ChatError, TimeoutError):
    """No complete reply within the per-step timeout."""


class ProtocolError(ChatError):
    """The server sent something that is not an SMTP reply, or one over the size limits."""


class TLSFailed(ChatError):
    """The TLS handshake failed (the connection is unusable afterwards)."""

    exit_code = status.TLS


class ResolveError(ChatError):
    """MX or address lookup of the target failed."""

    exit_code = status.CONNECT
