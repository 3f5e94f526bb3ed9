"""Delivery outcomes and targets shared by routing, the local delivery agents and the runner."""

from typing import NamedTuple


class DeliveryError(Exception):
    """A recipient could not be delivered; ``status`` is the RFC 3463 code (4.x.x = retry)."""

    def __init__(self, reason: str, status: str = "4.3.0") -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status

    @property
    def permanent(self) -> bool:
        return self.status.startswith("5")


class Mailbox(NamedTuple):
    """Deliver to a local user's mailbox (mbox or Maildir under mail_spool_directory)."""

    user: str


class File(NamedTuple):
    """Append to a file in mbox format, with the privileges of ``uid``/``gid``."""

    path: str
    uid: int
    gid: int


class Command(NamedTuple):
    """Run ``argv`` (no shell) with the message on stdin, as ``uid``/``gid`` in ``home``."""

    argv: tuple[str, ...]
    uid: int
    gid: int
    home: str


class Remote(NamedTuple):
    """Hand the address to the SMTP transport: its domain is not delivered here."""

    address: str


Target = Mailbox | File | Command | Remote
