"""smtpchat's exception types; each carries the swaks exit code the session ends with."""

from pymailtools.chat import status


class ChatError(Exception):
    """Base class: ends the session with a one-line ``***`` message and ``exit_code``."""

    exit_code = status.CONNECTION_LOST

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConnectFailed(ChatError):
    """No address of the target accepted a TCP connection (or TLS on connect failed)."""

    exit_code = status.CONNECT


class ConnectionLost(ChatError):
    """The server closed the connection while a reply was expected."""


class ReplyTimeout(ChatError):
    """No complete reply within the per-step timeout."""


class ProtocolError(ChatError):
    """The server sent something that is not an SMTP reply, or one over the size limits."""


class TLSFailed(ChatError):
    """The TLS handshake failed (the connection is unusable afterwards)."""

    exit_code = status.TLS


class ResolveError(ChatError):
    """MX or address lookup of the target failed."""

    exit_code = status.CONNECT
