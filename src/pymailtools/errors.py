"""Exception types, each carrying the sysexits.h code a command exits with."""

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_NOUSER = 67
EX_NOHOST = 68
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_OSERR = 71
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78


class MailError(Exception):
    """Base class: a failure a command reports as one line and an exit code."""

    exit_code = EX_SOFTWARE

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(MailError):
    """Bad option, option argument or mode combination (64)."""

    exit_code = EX_USAGE


class AddressError(UsageError):
    """An address is malformed or unsafe (CR, LF, NUL, leading '-') (64)."""


class DataError(MailError):
    """The message cannot be parsed where parsing is required (65)."""

    exit_code = EX_DATAERR


class TooBigError(MailError):
    """The message exceeds message_size_limit (69, as Postfix's cleanup reports it)."""

    exit_code = EX_UNAVAILABLE


class QueueWriteError(MailError):
    """The queue file could not be created (73) or written, synced, renamed (74)."""

    exit_code = EX_IOERR


class ConfigError(MailError):
    """A configuration file or value is invalid (78)."""

    exit_code = EX_CONFIG


class PermissionDenied(MailError):
    """The caller may not do this (77)."""

    exit_code = EX_NOPERM


class InvalidQueueId(UsageError):
    """A queue id is not 1-32 ASCII letters and digits (64)."""
