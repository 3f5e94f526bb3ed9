"""The package's exception tree: every error a command reports derives from MailError.

Each class says when it is raised and carries what its callers need: the sysexits.h code a
command exits with (``exit_code``), and for delivery and SMTP failures the RFC 3463 status
(``status``; 4.x.x means the message stays queued). Classes that stand for a broken connection
or a timeout also derive from the built-in ConnectionError / TimeoutError, as aiosmtplib's do,
so generic OS-level handlers recognise them.

    MailError
     +-- UsageError                    64
     |    +-- AddressError, InvalidQueueId
     +-- DataError                     65
     +-- TooBigError                   69
     +-- QueueWriteError               73/74
     +-- ConfigError                   78  (smtpd.passwd.PasswordFileError)
     +-- PermissionDenied              77
     +-- DeliveryError                 69/75 by ``status``
     +-- smtp.errors.SMTPError         75  the SMTP client's session failures
     |    +-- HopError                 before any transaction: try the next address
     |    +-- Lost (ConnectionError)   mid-transaction
     |    +-- ProtocolError            the server's bytes are not SMTP
     +-- chat.errors.ChatError         smtpchat: swaks' exit codes
     +-- errors of one package: queue.store (QueueNotSetUp, EntryBusy, EntryNotFound),
         local.lock.MailboxBusy, mua.compose.AttachmentError, mua.folder.FolderError,
         tables.TableError (75: a lookup that cannot be answered now)

No imports here: sendmail's submission path loads this module, and each class costs its
start-up time, so the branches only one package raises live in that package.
"""

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


class DeliveryError(MailError):
    """Routing or local delivery of one recipient failed; ``status`` is the RFC 3463 code
    (4.x.x: the message stays queued and is retried; 5.x.x: it bounces)."""

    def __init__(self, reason: str, status: str = "4.3.0") -> None:
        super().__init__(reason, EX_UNAVAILABLE if status.startswith("5") else EX_TEMPFAIL)
        self.reason = reason
        self.status = status

    @property
    def permanent(self) -> bool:
        return self.status.startswith("5")
