"""Delivery targets: where local routing sends a recipient (a mailbox, a file, a command, or
back to the queue manager as a remote address)."""

from typing import NamedTuple


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
    """A remote address an alias or .forward expands to; it becomes a recipient of its own."""

    address: str


Target = Mailbox | File | Command | Remote
